"""What the methods that wrap linear layers share (LoRA, DoRA, IA³, VeRA, LoHa, LoKr), written once:

    FrozenLinear        an nn.Linear over the base layer's own weight and bias: the same tensors under the
                        same keys (`weight`, `bias`), frozen. A method's wrapper subclasses it and adds its own
                        parameters beside them, so a wrapped model still loads a plain checkpoint.
    wrap(model, targets, make)
                        replace every targeted linear layer of every block by make(layer), by setattr on its
                        parent (targets.py names the layers).
    DeltaMerge          merge/unmerge for wrappers whose update is an added weight ΔW (W ← W ± ΔW).
    DeltaLinear         h = x (W + ΔW)ᵀ + b for updates built as a whole weight from small factors (LoHa, LoKr).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import targets as linear_targets


class FrozenLinear(nn.Linear):
    """A linear layer over `base`'s weight and bias (the same Parameters, not copies). Subclasses add a
    method's parameters; `changes_base` says whether creating it rewrote the base weight (PiSSA does)."""

    changes_base = False

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias

    def base_layer(self) -> "FrozenLinear":
        """This layer without the method: a plain FrozenLinear over the same weight and bias (disable.py)."""
        return FrozenLinear(self)


def wrap(model, targets, make) -> None:
    """setattr(parent, name, make(layer)) for every targeted linear layer of every block."""
    for parent, attr in linear_targets.find(model, targets):
        setattr(parent, attr, make(getattr(parent, attr)))


class DeltaMerge:
    """merge / unmerge for a FrozenLinear whose update is a weight ΔW = self.delta_weight() added to W."""

    merged = False

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight()
            self.merged = False


class DeltaLinear(DeltaMerge, FrozenLinear):
    """A wrapper whose update is a whole weight ΔW = self.delta_weight() built from small trained factors
    (LoHa, LoKr): h = x (W + ΔW)ᵀ + b in one matmul, ΔW rebuilt every forward pass."""

    def forward(self, x):  # (…, in) -> (…, out)
        weight = self.weight if self.merged else self.weight + self.delta_weight()
        return F.linear(x, weight, self.bias)

    def saved_activations(self, ledger, x: str, n: int, grad: bool):
        """For the memory ledger: the input (ΔW's gradient is dyᵀx), W + ΔW when x needs a gradient, and
        what building ΔW keeps (`delta_saved`, in elements)."""
        ledger.keep(x, n * self.in_features)
        if grad:
            ledger.keep(f"{x}@{id(self)}.weight", self.in_features * self.out_features)
        ledger.keep(f"{id(self)}.delta", self.delta_saved())

    def delta_saved(self) -> int:
        return 0

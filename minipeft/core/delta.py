"""What the wrappers whose update is an added weight ΔW share (VeRA, LoHa, LoKr), written once:

    DeltaMerge          merge/unmerge: W ← W ± ΔW
    DeltaLinear         h = x (W + ΔW)ᵀ + b for updates built as a whole weight from small factors (LoHa, LoKr)
"""
import torch
import torch.nn.functional as F

from .lora import FrozenLinear


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

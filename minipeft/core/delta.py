"""What the wrappers whose update is an added weight ΔW (VeRA, LoHa, LoKr) share, written once."""
import torch.nn.functional as F

from .lora import FrozenLinear, LoRALinear


class DeltaMerge:
    """merge / unmerge for a FrozenLinear whose update is a weight ΔW = self.delta_weight() added to W."""
    merged = False
    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge  # W ← W ± ΔW, as LoRA's W ± s·BA


class DeltaLinear(DeltaMerge, FrozenLinear):
    """h = x (W + ΔW)ᵀ + b in one matmul, ΔW = self.delta_weight() rebuilt from small trained factors (LoHa,
    LoKr) every forward pass."""

    def forward(self, x):  # (…, in) -> (…, out)
        weight = self.weight if self.merged else self.weight + self.delta_weight()
        return F.linear(x, weight, self.bias)

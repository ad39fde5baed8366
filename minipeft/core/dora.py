"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

A weight is a magnitude times a direction. DoRA learns the magnitude m (one number per output row) and
updates the direction with LoRA (lora.py):

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖          ‖·‖: the L2 norm of each output row (out,)
    h  = x W'ᵀ + b

The norm is a constant in backward (detached), as in the paper (section 4.3) and peft: it keeps nothing for
backward. As an addition to the frozen layer's output, with g = m / ‖W + s·BA‖ (out,) and d the LoRA input
path's dropout:

    h = (x Wᵀ + b) + (g − 1)·(d(x) Wᵀ) + g·s·(d(x) Aᵀ Bᵀ)

which is W'x + b when d is the identity (evaluation, or dropout 0) and peft's arithmetic in training.

Initialization: LoRA's (A Kaiming-uniform, B = 0) and m = ‖W‖, so g = 1 and the model starts exactly as the
pretrained one. Trainable parameters: r·(in + out) + out per adapted layer (LoRA's plus the magnitude).
Merging: W ← g·(W + s·BA), with g from the unmerged weight, kept for unmerge: W ← W/g − s·BA.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import targets as linear_targets
from .lora import LORA_OPTIONS, RSLORA, LoRALinear, lora_parameter_count
from .registry import Method, register


class DoRALinear(LoRALinear):
    """LoRA's layer (lora.py: the frozen W and b, A, B, s, dropout) with a trained magnitude m per output row."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__(base, rank, alpha, dropout, rslora)
        self.magnitude = nn.Parameter(self.weight.norm(dim=1).detach().clone())  # m = ‖W‖ per row (out,)

    def direction_norm(self) -> torch.Tensor:  # ‖W + s·BA‖ per output row (out,), a constant: no gradient
        with torch.no_grad():
            return (self.weight + self.delta_weight()).norm(dim=1)

    def forward(self, x):  # (…, in) -> (…, out)
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        g = self.magnitude / self.direction_norm()  # (out,)
        dropped = self.lora_dropout(x)
        base = y if self.bias is None else y - self.bias  # x Wᵀ
        if dropped is not x:  # training with dropout: the W path of the update sees d(x), as in peft
            base = F.linear(dropped, self.weight)
        update = F.linear(F.linear(dropped, self.lora_A), self.lora_B) * self.scale  # s·d(x) Aᵀ Bᵀ
        h = y + (g - 1) * (base + update) + update  # = y + (g − 1)·base + g·update; exact at init
        return h.to(y.dtype)  # an fp32 m (bf16-mixed) must not turn the output, and all after it, fp32 (peft's)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.merge_factor = (self.magnitude / self.direction_norm())[:, None]  # g (out, 1)
            self.weight.copy_(self.merge_factor * (self.weight + self.delta_weight()))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_(self.weight / self.merge_factor - self.delta_weight())
            self.merged = False


def apply_dora(model, rank: int, alpha: float, dropout: float, targets: list[str], rslora: bool = False):
    linear_targets.wrap(model, targets, lambda layer: DoRALinear(layer, rank, alpha, dropout, rslora))


def dora_parameter_count(cfg, rank: int, targets: list[str], **_) -> int:
    magnitudes = cfg.n_layer * sum(linear_targets.shape(cfg, t)[1] for t in linear_targets.validate(cfg, targets))
    return lora_parameter_count(cfg, rank, targets) + magnitudes


register(Method(
    "dora", "magnitude and LoRA-updated direction of each weight row (Liu et al. 2024)",
    apply_dora, dora_parameter_count, LORA_OPTIONS + (RSLORA,), mergeable=True,
    side_by_side=True, examples=({}, {"rank": 2, "alpha": 2.0, "dropout": 0.1, "targets": ["all"], "rslora": True})))

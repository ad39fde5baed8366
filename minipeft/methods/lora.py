"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen linear layer W (out × in) learns only a low-rank update:

    h = x Wᵀ + b  +  (α / r) · dropout(x) Aᵀ Bᵀ          A: (r × in), B: (out × r), r ≪ min(in, out)

              x ──────────────► W (frozen) ─────────┐
              │                                      + ──► h
              └─► dropout ─► A (r×in) ─► B (out×r) ─► × α/r

Initialization: A ~ Kaiming-uniform (as nn.Linear initializes its weight), B = 0, so BA = 0 and the
model starts exactly as the pretrained one. The scale α/r keeps the update's size roughly independent
of the rank, so a learning rate tuned at one rank carries over.

Trainable parameters: r · (in + out) per adapted layer. Examples: r=4 on a 1000×1000 weight: 8,000;
r=4 on q and v of a GPT-2-medium shape (24 layers, d=1024): 24 · 2 · 4 · 2048 = 393,216.

Merging: W ← W + (α/r) B A gives the same outputs with no extra inference cost; `unmerge` subtracts it
again (the base comes back up to float rounding of the subtraction). Merging is explicit (mp.merge),
never a side effect of `.eval()`.

`LoRALinear` *is* an nn.Linear (it keeps the base `weight`/`bias` keys, as torchtune does), with
`lora_A` and `lora_B` beside them; it replaces the wrapped layer by setattr on its parent.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import Dropout
from . import targets as linear_targets
from .registry import Method, Option, register


class LowRankUpdate:
    """The LoRA path, shared by LoRALinear and the 4-bit QLoRALinear (qlora.py): adds lora_A, lora_B
    to `self`."""

    def init_lora(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if rank > min(in_features, out_features):
            raise ValueError(f"LoRA rank {rank} is larger than the layer ({out_features}×{in_features}); "
                             f"use a rank <= {min(in_features, out_features)}")
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init
        self.lora_dropout = Dropout(dropout)
        self.merged = False

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """(…, in) -> (…, out): (α/r) · dropout(x) Aᵀ Bᵀ, never forming the out×in product."""
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    def saved_activations(self, ledger, x: str, n: int, grad: bool):
        """For the memory ledger (memory.py): what autograd keeps of the LoRA path for n tokens of the
        input named `x` (`grad`: x needs a gradient): dropout's mask and output, or x itself; A's output."""
        me = f"{x}@{id(self)}"
        if self.lora_dropout.p > 0:  # each LoRA layer draws its own mask
            ledger.dropout(self.lora_dropout.p, f"{me}.lora_dropout", n * self.in_features, grad)
            ledger.keep(f"{me}.lora_dropout.out", n * self.in_features)
        else:
            ledger.keep(x, n * self.in_features)
        ledger.keep(f"{me}.lora_A.out", n * self.rank)


class LoRALinear(LowRankUpdate, nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same frozen tensors, same keys
        self.init_lora(base.in_features, base.out_features, rank, alpha, dropout)
        self.to(base.weight.device)

    def forward(self, x):  # (…, in) -> (…, out)
        y = F.linear(x, self.weight, self.bias)
        return y if self.merged else y + self.lora_update(x)

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

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def apply_lora(model, rank: int, alpha: float, dropout: float, targets: list[str]):
    """Wrap every targeted linear layer of every block in a LoRALinear (the registry froze the base)."""
    for parent, attr in linear_targets.find(model, targets):
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))


def lora_parameter_count(cfg, rank: int, targets: list[str], **_) -> int:
    """n_layer · Σ_targets r · (in + out)."""
    return cfg.n_layer * sum(rank * sum(linear_targets.shape(cfg, t))
                             for t in linear_targets.validate(cfg, targets))


# the options LoRA and QLoRA share
LORA_OPTIONS = (
    Option("rank", int, 8, "LoRA rank r (>= 1)"),
    Option("alpha", float, 16.0, "LoRA scale numerator: the update is multiplied by alpha / rank"),
    Option("dropout", float, 0.0, "dropout on the LoRA input path (the model's own dropout is --model-dropout)"),
    Option("targets", list, ["q", "v"], "comma-separated linear layers to adapt: q,k,v,o,up,gate,down or 'all'"),
)

register(Method(
    "lora", "low-rank updates BA on the targeted linear layers (Hu et al. 2021)",
    apply_lora, lora_parameter_count, LORA_OPTIONS, mergeable=True,
    examples=({}, {"rank": 2, "alpha": 4.0, "dropout": 0.1, "targets": ["all"]},
              {"rank": 4, "targets": ["k", "o", "down"]})))

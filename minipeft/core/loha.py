"""LoHa: low-rank Hadamard product (FedPara, Hyeon-Woo et al. 2022, https://arxiv.org/abs/2108.06098; as in
LyCORIS, Yeh et al. 2024, https://arxiv.org/abs/2309.14859).

The update of a frozen weight W (out × in) is the elementwise (Hadamard) product of two rank-r products,
which can reach rank r² with the parameters of two rank-r LoRAs:

    ΔW = (α/r) · (W1a W1b) ⊙ (W2a W2b)        W1a, W2a: (out × r),  W1b, W2b: (r × in)
    h  = x (W + ΔW)ᵀ + b                       ΔW formed in full each forward pass (delta.py)

Initialization (peft's): W1a, W1b, W2a Kaiming-uniform (nn.Linear's init), W2b = 0, so ΔW = 0 and the
model starts exactly as the pretrained one. Trainable parameters: 2r · (in + out) per adapted layer (twice
LoRA's at the same r); r=8 on q and v of a 12-layer d=768 model: 12 · 2 · 2 · 8 · 1536 = 589,824.
Merging: W ← W + ΔW.
"""
import math

import torch
import torch.nn as nn

from . import targets as linear_targets
from .registry import Method, Option, register
from .delta import DeltaLinear


class LoHaLinear(DeltaLinear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base)
        if rank < 1:
            raise ValueError(f"LoHa rank must be >= 1, got {rank}")
        out_features, in_features, device = base.out_features, base.in_features, base.weight.device
        self.rank, self.scale = rank, alpha / rank
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, rank, device=device))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, rank, device=device))
        self.hada_w2_b = nn.Parameter(torch.zeros(rank, in_features, device=device))  # ΔW = 0 at init
        for factor in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(factor, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scale


def apply_loha(model, rank: int, alpha: float, targets: list[str]):
    linear_targets.wrap(model, targets, lambda layer: LoHaLinear(layer, rank, alpha))


def loha_parameter_count(cfg, rank: int, targets: list[str], **_) -> int:
    targets = linear_targets.validate(cfg, targets)
    return cfg.n_layer * sum(2 * rank * sum(linear_targets.shape(cfg, t)) for t in targets)


register(Method(
    "loha", "Hadamard product of two low-rank updates (FedPara / LyCORIS LoHa)",
    apply_loha, loha_parameter_count,
    (Option("rank", int, 8, "rank r of each of the two low-rank factors"),
     Option("alpha", float, 8.0, "LoHa scale numerator: the update is multiplied by alpha / rank"),
     Option("targets", list, ["q", "v"], "comma-separated linear layers to adapt: q,k,v,o,up,gate,down or 'all'")),
    mergeable=True, side_by_side=True, examples=({},)))

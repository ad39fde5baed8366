"""LoKr: low-rank Kronecker product (KronA, Edalati et al. 2022, https://arxiv.org/abs/2212.10650; as in
LyCORIS, Yeh et al. 2024, https://arxiv.org/abs/2309.14859).

The update of a frozen weight W (out × in) is a Kronecker product of a small matrix and a (possibly
low-rank) larger one. With out = a·b and in = c·d (a ≤ b, c ≤ d, from `factorization`):

    ΔW = (α/r) · W1 ⊗ W2         W1: (a × c),  W2: (b × d), or W2 = W2a W2b (b × r)(r × d) when r < max(b, d)/2
    h  = x (W + ΔW)ᵀ + b

    W1 ⊗ W2 repeats W2 in an a × c grid of blocks, block (i, j) scaled by W1[i, j]:

        ┌ W1[0,0]·W2  W1[0,1]·W2  … ┐
        │ W1[1,0]·W2  W1[1,1]·W2  … │   (a·b) × (c·d) = out × in
        └ …                         ┘

`decompose_both` factors W1 too (W1a W1b, rank r) when r < max(a, c)/2; `decompose_factor`: see `factorization`.

Initialization (peft's): W1 = 0 (W1a = 0 when decomposed), W2's factors Kaiming-uniform, so ΔW = 0: the
model starts exactly as the pretrained one. Trainable parameters per adapted layer: a·c (or r·(a + c))
+ b·d (or r·(b + d)); for a 768 × 768 weight at r = 8, 768 = 24·32 gives W1 (24 × 24) and, as 8 < 32/2,
W2 = (32 × 8)(8 × 32): 576 + 512 = 1,088 (LoRA r=8: 12,288). Merging: W ← W + ΔW.
"""
import math

import torch
import torch.nn as nn

from . import targets as linear_targets
from .registry import Method, Option, register
from .delta import DeltaLinear


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """dimension = m · n with m ≤ n: (factor, dimension / factor) when factor > 0 divides it, else m the
    largest divisor ≤ √dimension (and ≤ factor, when factor > 0). 768 -> (24, 32); 128, factor 4 -> (4, 32)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = math.isqrt(dimension) if factor == -1 else min(factor, math.isqrt(dimension))
    m = max(k for k in range(1, max(limit, 1) + 1) if dimension % k == 0)
    return m, dimension // m


def lokr_shapes(out_features: int, in_features: int, rank: int, decompose_both: bool, factor: int) -> dict:
    """{parameter name: shape} of a LoKr layer: W1 (a, c) or its factors, W2 (b, d) or its factors."""
    (a, b), (c, d) = factorization(out_features, factor), factorization(in_features, factor)
    if decompose_both and rank < max(a, c) / 2:
        shapes = {"lokr_w1_a": (a, rank), "lokr_w1_b": (rank, c)}
    else:
        shapes = {"lokr_w1": (a, c)}
    if rank < max(b, d) / 2:
        return shapes | {"lokr_w2_a": (b, rank), "lokr_w2_b": (rank, d)}
    return shapes | {"lokr_w2": (b, d)}


class LoKrLinear(DeltaLinear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, decompose_both: bool, decompose_factor: int):
        super().__init__(base)
        self.rank, self.scale = rank, alpha / rank
        shapes = lokr_shapes(base.out_features, base.in_features, rank, decompose_both, decompose_factor)
        for name, shape in shapes.items():  # W1 (or W1a) = 0, so ΔW = 0 at init; the other factors Kaiming-uniform
            weight = nn.Parameter(torch.zeros(shape, device=base.weight.device))
            if name not in ("lokr_w1", "lokr_w1_a"):
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            setattr(self, name, weight)

    def factor(self, which: str) -> torch.Tensor:  # W1 or W2, as it is or as the product of its two factors
        if hasattr(self, f"lokr_{which}"):
            return getattr(self, f"lokr_{which}")
        return getattr(self, f"lokr_{which}_a") @ getattr(self, f"lokr_{which}_b")

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        return torch.kron(self.factor("w1"), self.factor("w2")) * self.scale


def apply_lokr(model, rank: int, alpha: float, targets: list[str], decompose_both: bool, decompose_factor: int):
    if rank < 1:
        raise ValueError(f"LoKr rank must be >= 1, got {rank}")
    if decompose_factor != -1 and decompose_factor < 1:
        raise ValueError(f"decompose_factor must be -1 (near √dim) or >= 1, got {decompose_factor}")
    linear_targets.wrap(model, targets, lambda layer: LoKrLinear(layer, rank, alpha, decompose_both, decompose_factor))


def lokr_parameter_count(cfg, rank: int, targets: list[str], decompose_both: bool, decompose_factor: int, **_) -> int:
    layers = [lokr_shapes(*reversed(linear_targets.shape(cfg, t)), rank, decompose_both, decompose_factor)
              for t in linear_targets.validate(cfg, targets)]
    return cfg.n_layer * sum(math.prod(shape) for shapes in layers for shape in shapes.values())


register(Method(
    "lokr", "Kronecker product of a small and a low-rank matrix (KronA / LyCORIS LoKr)",
    apply_lokr, lokr_parameter_count,
    (Option("rank", int, 8, "rank r of W2's factors (used when r < max(b, d)/2; else W2 is full)"),
     Option("alpha", float, 8.0, "LoKr scale numerator: the update is multiplied by alpha / rank"),
     Option("targets", list, ["q", "v"], "comma-separated linear layers to adapt: q,k,v,o,up,gate,down or 'all'"),
     Option("decompose_both", bool, False, "factor W1 into rank-r factors too"),
     Option("decompose_factor", int, -1, "Kronecker factor size f (-1: the divisor pair nearest √dim)")),
    mergeable=True, side_by_side=True,
    examples=({}, {"rank": 1, "targets": ["all"], "decompose_both": True, "decompose_factor": 4})))

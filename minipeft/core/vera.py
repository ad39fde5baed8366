"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454).

LoRA with its two matrices frozen, random and shared by every layer; each layer trains two vectors:

    h = x Wᵀ + b  +  λ_b ⊙ (B (λ_d ⊙ (A dropout(x))))        A: (r × in), B: (out × r) frozen, shared
                                                              λ_d: (r,), λ_b: (out,) trained, per layer

A and B are drawn once, for the largest (out, in) among the targeted layers: A (r × max in), B (max out × r),
and every layer uses their top-left corner, A[:, :in] and B[:out]. Both are Kaiming-uniform (bound
√(6 / fan_in)), drawn from a torch.Generator seeded with `projection_seed`, A first: exactly as peft draws
them from its projection_prng_key, so one seed gives both libraries the same matrices and an adapter (its
λ vectors) moves between them unchanged. They are buffers (not saved: the seed makes them again).

Initialization: λ_b = 0 and λ_d = d_initial (0.1), so the update starts at zero: exactly the base model.
Trainable parameters: n_layer · Σ_targets (r + out); on q and v of a 12-layer d=768 model with r=256:
12 · 2 · (256 + 768) = 24,576, a twelfth of LoRA r=8's 294,912, however large r is.
Merging: W ← W + (λ_b ⊙ B)(λ_d ⊙ A) (VeRA has no α/r scale).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import Dropout
from . import targets as linear_targets
from .registry import Method, Option, register
from .delta import DeltaMerge
from .lora import FrozenLinear


class SharedProjections(nn.Module):
    """The frozen random A (r × max in) and B (max out × r), one pair held by every VeRALinear of the model.
    They stay fp32 in every precision (`keeps_fp32`: set_precision leaves them be), as peft keeps them: bf16
    copies would merge into other weights than peft's, and be saved as matrices the seed does not draw."""
    keeps_fp32 = True

    def __init__(self, rank: int, max_in: int, max_out: int, seed: int, device=None):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        A = nn.init.kaiming_uniform_(torch.empty(rank, max_in, device="cpu"), a=0, generator=generator)
        B = nn.init.kaiming_uniform_(torch.empty(max_out, rank, device="cpu"), a=0, generator=generator)
        self.register_buffer("A", A.to(device), persistent=False)
        self.register_buffer("B", B.to(device), persistent=False)


class VeRALinear(DeltaMerge, FrozenLinear):
    def __init__(self, base: nn.Linear, projections: SharedProjections, dropout: float, d_initial: float):
        super().__init__(base)
        self.projections = projections
        rank, device = projections.A.shape[0], base.weight.device
        self.vera_lambda_d = nn.Parameter(torch.full((rank,), d_initial, device=device))  # λ_d (r,)
        self.vera_lambda_b = nn.Parameter(torch.zeros(base.out_features, device=device))  # λ_b (out,)
        self.vera_dropout = Dropout(dropout)

    def corners(self) -> tuple[torch.Tensor, torch.Tensor]:  # this layer's A (r, in) and B (out, r)
        return self.projections.A[:, :self.in_features], self.projections.B[:self.out_features]

    def forward(self, x):  # (…, in) -> (…, out)
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        A, B = self.corners()
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(self.vera_dropout(x), A), B)
        return y + update.to(y.dtype)  # fp32 λ (bf16-mixed) must not turn the output fp32

    def delta_weight(self) -> torch.Tensor:
        A, B = self.corners()
        return (self.vera_lambda_b[:, None] * B) @ (self.vera_lambda_d[:, None] * A)  # (out, in)


def apply_vera(model, rank: int, targets: list[str], dropout: float, d_initial: float, projection_seed: int):
    if rank < 1:
        raise ValueError(f"VeRA rank must be >= 1, got {rank}")
    shapes = [linear_targets.shape(model.cfg, t) for t in linear_targets.validate(model.cfg, targets)]
    projections = SharedProjections(rank, max(i for i, _ in shapes), max(o for _, o in shapes), projection_seed,
                                    model.tok_emb.weight.device)
    linear_targets.wrap(model, targets, lambda layer: VeRALinear(layer, projections, dropout, d_initial))


def vera_parameter_count(cfg, rank: int, targets: list[str], **_) -> int:
    return cfg.n_layer * sum(rank + linear_targets.shape(cfg, t)[1] for t in linear_targets.validate(cfg, targets))


register(Method(
    "vera", "frozen shared random low-rank matrices, trained scaling vectors (Kopiczko et al. 2024)",
    apply_vera, vera_parameter_count,
    (Option("rank", int, 256, "rank r of the shared random matrices A (r × in) and B (out × r)"),
     Option("targets", list, ["q", "v"], "comma-separated linear layers to adapt: q,k,v,o,up,gate,down or 'all'"),
     Option("dropout", float, 0.0, "dropout on the VeRA input path (the model's own dropout is --model-dropout)"),
     Option("d_initial", float, 0.1, "initial value of every λ_d"),
     Option("projection_seed", int, 0, "seed of the shared random matrices (peft's projection_prng_key)")),
    lr=1e-2, mergeable=True, side_by_side=True,
    examples=({}, {"rank": 4, "targets": ["all"], "dropout": 0.1, "projection_seed": 7})))

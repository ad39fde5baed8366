"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen linear layer W (out × in) learns only a low-rank update:

    h = x Wᵀ + b  +  s · dropout(x) Aᵀ Bᵀ          A: (r × in), B: (out × r), r ≪ min(in, out)

              x ──────────────► W (frozen) ─────────┐
              │                                      + ──► h
              └─► dropout ─► A (r×in) ─► B (out×r) ─► × s

The scale s is α/r, or α/√r with `rslora` (rank-stabilized LoRA, Kalajdzievski 2023,
https://arxiv.org/abs/2312.03732: under α/r a higher rank learns more slowly, α/√r keeps it stable as r grows).

Initialization (`init`), each as peft has it:
    kaiming   A ~ Kaiming-uniform (nn.Linear's init), B = 0: BA = 0, the model starts exactly as the pretrained one.
    gaussian  A ~ N(0, 1/r²), B = 0: exact at init too.
    pissa     PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): W = U S Vᵀ; the top-r singular triplets
              move into the adapter, A = √(S_r/s) V_rᵀ, B = U_r √(S_r/s): it trains the principal directions of W.
    olora     OLoRA (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775): W = QR; A = R[:r], B = Q[:, :r].
PiSSA and OLoRA leave the frozen base weight the residual W − s·B₀A₀, so W + s·BA equals the pretrained W at
init only up to float rounding, and a saved adapter means "on the residual of this base" (loading it computes
the same residual again).

LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): `lr_ratio` gives B a learning rate lr_ratio ×
A's (the paper suggests 16), in its own AdamW parameter group (`lr_factors`).

Trainable parameters: r · (in + out) per adapted layer; r=4 on q and v of GPT-2 medium (24 layers, d=1024):
24 · 2 · 4 · 2048 = 393,216.

Merging (mp.merge, never a side effect of `.eval()`): W ← W + s·BA, the same outputs at no extra inference cost.

`LoRALinear` *is* an nn.Linear (a FrozenLinear: the base's own `weight` and `bias` under their keys), with
`lora_A` and `lora_B` beside them; it replaces the wrapped layer on its parent. Other methods reuse its pieces.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import Dropout
from . import targets as linear_targets
from .registry import Method, Option, register

INITS = ("kaiming", "gaussian", "pissa", "olora")
RESIDUAL_INITS = ("pissa", "olora")  # these move part of W into the adapter


def add_lora(layer: nn.Module, rank: int, alpha: float, dropout: float, rslora: bool = False) -> None:
    """Give `layer` LoRA's trained pair A (r, in), B = 0 (out, r), its scale s and its input path's dropout."""
    in_features, out_features = layer.in_features, layer.out_features
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if rank > min(in_features, out_features):
        raise ValueError(f"LoRA rank {rank} is larger than the layer ({out_features}×{in_features}); "
                         f"use a rank <= {min(in_features, out_features)}")
    layer.rank, layer.alpha = rank, alpha
    layer.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    layer.lora_A = nn.Parameter(torch.empty(rank, in_features))  # (r, in)
    layer.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # (out, r)
    nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))  # nn.Linear's own init
    layer.lora_dropout = Dropout(dropout)
    layer.merged = False


def residual_init(weight: torch.Tensor, rank: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA / OLoRA: the factors A₀ (r, in), B₀ (out, r) of the part of `weight` (out, in) an adapter of
    scale s takes over; the layer keeps weight − s·B₀A₀."""
    weight = weight.detach().float()
    if init == "pissa":  # W = U S Vᵀ: the top-r singular triplets, S_r split evenly between B and A
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        root = (S[:rank] / scale).sqrt()  # (r,)
        return root[:, None] * Vh[:rank], U[:, :rank] * root
    Q, R = torch.linalg.qr(weight)  # olora: W = QR, Q with orthonormal columns
    return R[:rank].contiguous(), Q[:, :rank].contiguous()


class FrozenLinear(nn.Linear):
    """A linear layer over `base`'s weight and bias (the same Parameters, not copies). Subclasses add a
    method's parameters; `changes_base` says whether creating it rewrote the base weight (PiSSA does)."""
    changes_base = False

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias

    def base_layer(self) -> "FrozenLinear":
        """This layer without the method: a plain FrozenLinear over the same weight and bias (extras/disable.py)."""
        return FrozenLinear(self)


class LoRALinear(FrozenLinear):
    """h = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ: the frozen base's `weight` and `bias`, `lora_A` and `lora_B`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "kaiming"):
        super().__init__(base)  # self.weight, self.bias = base.weight, base.bias
        add_lora(self, rank, alpha, dropout, rslora)
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / rank)
        elif init in RESIDUAL_INITS:
            self.changes_base = True
            with torch.no_grad():
                A, B = residual_init(self.weight, rank, self.scale, init)
                self.lora_A.copy_(A)
                self.lora_B.copy_(B)
                residual = self.weight.float() - self.delta_weight()  # W keeps the residual, rounded once (peft's)
                self.weight.copy_(residual.to(self.weight.dtype))
        self.to(base.weight.device)

    def forward(self, x):  # (…, in) -> (…, out)
        y = F.linear(x, self.weight, self.bias)
        return y if self.merged else y + self.lora_update(x)

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """(…, in) -> (…, out): s · dropout(x) Aᵀ Bᵀ, never forming the out×in product."""
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    @torch.no_grad()
    def merge(self):  # W ← W + s·BA
        if not self.merged:
            self.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):  # W ← W − s·BA
        if self.merged:
            self.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def apply_lora(model, rank: int, alpha: float, dropout: float, targets: list[str], rslora: bool = False,
               init: str = "kaiming", lr_ratio: float = 1.0):
    """Wrap every targeted linear layer of every block in a LoRALinear (the registry froze the base)."""
    if lr_ratio <= 0:
        raise ValueError(f"lr_ratio must be > 0, got {lr_ratio}")
    linear_targets.wrap(model, targets, lambda layer: LoRALinear(layer, rank, alpha, dropout, rslora, init))


def lora_parameter_count(cfg, rank: int, targets: list[str], **_) -> int:
    """n_layer · Σ_targets r · (in + out)."""
    return cfg.n_layer * sum(rank * sum(linear_targets.shape(cfg, t))
                             for t in linear_targets.validate(cfg, targets))


def lora_lr_factors(model, lr_ratio: float = 1.0, **_) -> dict[str, float]:
    """LoRA+: every B learns lr_ratio times faster than the rest (none is listed when lr_ratio is 1)."""
    return {name: lr_ratio for name, _ in model.named_parameters() if name.endswith("lora_B") and lr_ratio != 1.0}


# the options LoRA and QLoRA share, and LoRA's own
LORA_OPTIONS = (
    Option("rank", int, 8, "LoRA rank r (>= 1)"),
    Option("alpha", float, 16.0, "LoRA scale numerator: the update is multiplied by alpha / rank"),
    Option("dropout", float, 0.0, "dropout on the LoRA input path (the model's own dropout is --model-dropout)"),
    Option("targets", list, ["q", "v"], "comma-separated linear layers to adapt: q,k,v,o,up,gate,down or 'all'"))
RSLORA = Option("rslora", bool, False, "rank-stabilized scale alpha / sqrt(rank) instead of alpha / rank")
LORA_ONLY_OPTIONS = (
    RSLORA,
    Option("init", str, "kaiming", "initialization: kaiming or gaussian A with B = 0 (exact at init); pissa "
           "(top singular triplets of W) or olora (QR of W), which leave W the residual", choices=INITS),
    Option("lr_ratio", float, 1.0, "LoRA+: B's learning rate is lr_ratio times A's (the paper suggests 16)"))

register(Method(
    "lora", "low-rank updates BA on the targeted linear layers (Hu et al. 2021; rsLoRA, PiSSA, OLoRA, LoRA+)",
    apply_lora, lora_parameter_count, LORA_OPTIONS + LORA_ONLY_OPTIONS, mergeable=True, lr_factors=lora_lr_factors,
    side_by_side=True, changes_base=lambda init="kaiming", **_: init in RESIDUAL_INITS,
    lr=2e-3,  # the headline run (README): test accuracy 0.811 / 0.822 / 0.819 over seeds 0-2, 0.802 at 1e-3
    examples=({}, {"rank": 2, "alpha": 2.0, "dropout": 0.1, "targets": ["all"], "rslora": True, "lr_ratio": 16.0},
              {"rank": 4, "targets": ["k", "o", "down"]})))

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

QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) is the same update on a base whose
linear layers are all stored in 4 bits (quant.py) and dequantized for each matmul:

    h = x dequant(W_4bit)ᵀ + b  +  (α / r) · dropout(x) Aᵀ Bᵀ          A, B in full precision

`QLoRALinear` *is* a Linear4bit (same buffers) with the same A and B. Every linear layer of every
block is quantized; LoRA goes on the targets; embeddings, norms and the head stay in full precision.
Its trainable parameters are LoRA's. It is not mergeable: folding BA into 4-bit codes would round it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import Dropout
from .quant import Linear4bit, quantize_blocks

# short target names -> where they live inside a block; the same in every flavour
TARGETS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o",
           "up": "mlp.up", "gate": "mlp.gate", "down": "mlp.down"}


class LowRankUpdate:
    """The LoRA path, shared by LoRALinear and the 4-bit QLoRA layer: adds lora_A, lora_B to `self`."""

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


class QLoRALinear(LowRankUpdate, Linear4bit):
    def __init__(self, base: Linear4bit, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.quant_type, self.blocksize, self.double_quant = base.quant_type, base.blocksize, base.double_quant
        for name, buffer in base.named_buffers(recurse=False):  # the same 4-bit codes, state and bias
            self.register_buffer(name, buffer)
        if base.bias is None:
            self.register_buffer("bias", None)
        self.init_lora(base.in_features, base.out_features, rank, alpha, dropout)
        self.to(base.weight_codes.device)

    def forward(self, x):  # (…, in) -> (…, out)
        return Linear4bit.forward(self, x) + self.lora_update(x)


def target_shape(cfg, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a target in a model of this config."""
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    return {"q": (d, cfg.n_head * hd), "k": (d, cfg.n_kv_head * hd), "v": (d, cfg.n_kv_head * hd),
            "o": (cfg.n_head * hd, d), "up": (d, f), "gate": (d, f), "down": (f, d)}[target]


def parse_targets(cfg, targets) -> tuple[str, ...]:
    """"q,v", ("q", "v") or "all" -> validated short names present in this flavour."""
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    present = tuple(t for t in TARGETS if t != "gate" or cfg.flavor == "llama")
    if tuple(targets) == ("all",):
        return present
    wrong = [t for t in targets if t not in present]
    if wrong or not targets:
        raise ValueError(f"unknown target(s) {wrong or '(none given)'} for a {cfg.flavor} model; "
                         f"valid targets are: {', '.join(present)} (or 'all')")
    return tuple(targets)


def find_targets(model, targets) -> list[tuple[nn.Module, str]]:
    """[(parent module, attribute name)] of every targeted linear layer in every block."""
    found = []
    for block in model.blocks:
        for t in parse_targets(model.cfg, targets):
            parent_name, attr = TARGETS[t].split(".")
            found.append((getattr(block, parent_name), attr))
    return found


def apply_lora(model, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets=("q", "v")):
    """Wrap every targeted linear layer of every block in a LoRALinear (the caller froze the base)."""
    for parent, attr in find_targets(model, targets):
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))


def lora_parameter_count(cfg, rank: int = 8, targets=("q", "v"), **_) -> int:
    """n_layer · Σ_targets r · (in + out)."""
    return cfg.n_layer * sum(rank * sum(target_shape(cfg, t)) for t in parse_targets(cfg, targets))


def apply_qlora(model, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets=("q", "v"),
                quant: str = "nf4", blocksize: int = 64, double_quant: bool = True):
    """Quantize every linear layer of every block to 4 bits (unless from_pretrained(..., quantize=)
    did already), then put LoRA on the targets."""
    quantize_blocks(model, quant, blocksize, double_quant)
    for parent, attr in find_targets(model, targets):
        setattr(parent, attr, QLoRALinear(getattr(parent, attr), rank, alpha, dropout))

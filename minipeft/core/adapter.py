"""Bottleneck adapters (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751; the one-adapter
variant of Pfeiffer et al. 2020, https://arxiv.org/abs/2005.00247).

A small residual MLP follows a sublayer's output projection, before the block's residual add:

    h = W x + b                                         the frozen projection (attn.o or mlp.down)
    h' = h + W_up · act(W_down · h + b_down) + b_up     W_down: (m × d), W_up: (d × m), m ≪ d

        x ─► [attn.o / mlp.down] ─► h ─┬──────────────────────────────────┬─► + ─► h' ─► residual add
                                       └─► down (d→m) ─► GELU ─► up (m→d) ─┘

houlsby: two per block, after attn.o and mlp.down; the layer norms (ln1, ln2, and ln_f or the embedding
norm) train too, as in the paper. pfeiffer: one per block, after mlp.down; nothing else trains.

Initialization: W_down Kaiming-uniform (nn.Linear's), W_up = 0 and b_up = 0: every adapter starts as the
identity. Trainable parameters: 2md + m + d per adapter (Houlsby's example: m=64, d=1024 → 132,160; two per
layer of a 24-layer BERT-large → 6,343,680), plus houlsby's layer norms. Non-linear, so not mergeable.
"""
import torch.nn as nn
import torch.nn.functional as F

from .registry import Method, Option, register
from .lora import FrozenLinear


class AdapterLinear(FrozenLinear):
    """The frozen projection (its weight and bias, under their keys) followed by a residual bottleneck adapter."""

    def __init__(self, base: nn.Linear, size: int):
        super().__init__(base)
        self.adapter_down = nn.Linear(base.out_features, size)  # (m, d)
        self.adapter_up = nn.Linear(size, base.out_features)  # (d, m)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.to(base.weight.device)

    def forward(self, x):  # (…, in) -> (…, out)
        h = F.linear(x, self.weight, self.bias)
        return h + self.adapter_up(F.gelu(self.adapter_down(h)))


def apply_adapter(model, size: int, kind: str):
    if size < 1:
        raise ValueError(f"adapter size must be >= 1, got {size}")
    for block in model.blocks:  # the new adapters train; mp.apply froze everything else
        block.mlp.down = AdapterLinear(block.mlp.down, size)
        if kind == "houlsby":
            block.attn.o = AdapterLinear(block.attn.o, size)
            block.ln1.requires_grad_(True)
            block.ln2.requires_grad_(True)
    if kind == "houlsby":
        (model.ln_f if model.ln_f is not None else model.emb_ln).requires_grad_(True)


def adapter_parameter_count(cfg, size: int, kind: str, **_) -> int:
    m, d = size, cfg.d_model
    per_adapter = 2 * m * d + m + d
    if kind == "pfeiffer":
        return cfg.n_layer * per_adapter
    norm = 2 * d if cfg.norm == "layernorm" else d  # RMSNorm has no bias
    return cfg.n_layer * (2 * per_adapter + 2 * norm) + norm


register(Method(
    "adapter", "bottleneck MLPs after attention and FFN outputs (Houlsby 2019 / Pfeiffer 2020)",
    apply_adapter, adapter_parameter_count,
    (Option("size", int, 64, "adapter bottleneck width m"),
     Option("kind", str, "houlsby", "houlsby: two per block + layer norms; pfeiffer: one, after the FFN",
            choices=("houlsby", "pfeiffer"))),
    examples=({}, {"size": 4, "kind": "pfeiffer"})))

"""LLaMA-Adapter (Zhang et al. 2023, https://arxiv.org/abs/2303.16199): zero-initialized attention.

In each of the top L layers, K learnable "adaption prompt" vectors are projected by the layer's own
(frozen) key and value projections, attended to with a *separate* softmax, and the result enters the
layer through a gate that starts at zero:

    y = softmax(q Kᵀ/√d_h) V  +  g ⊙ softmax(q K_pᵀ/√d_h) V_p        K_p = W_k A,  V_p = W_v A,  A: (K × d)

        q ─┬─► attention over the real tokens ──────────────────────────┐
           └─► attention over the K adaption prompts ─► × gate (0 init) ─┴─► + ─► o

The gate g (one per head) is exactly zero at initialization, so the model starts as the base model and
random prompts do not disturb early training; they matter only as the gate opens. The prompts carry no
position (no RoPE), so caching is unaffected.

Initialization: A ~ N(0, 0.02²), g = 0. Trainable parameters: L · (K · d + n_head). Not mergeable.
"""
import math

import torch
import torch.nn as nn

from .registry import Method, Option, register


class AdaptionPrompt(nn.Module):
    def __init__(self, cfg, length: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.prompt = nn.Parameter(0.02 * torch.randn(length, cfg.d_model))  # (K, d)
        self.gate = nn.Parameter(torch.zeros(cfg.n_head))  # (H,)

    def forward(self, q, k_proj, v_proj):  # q (B, H, T, hd) -> gated attention over the prompts (B, H, T, hd)
        group = self.n_head // self.n_kv_head  # grouped-query attention: heads sharing a kv head
        keys, values = (proj(self.prompt).view(-1, self.n_kv_head, self.head_dim).transpose(0, 1)
                        .repeat_interleave(group, dim=0) for proj in (k_proj, v_proj))  # each (H, K, hd)
        scores = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)  # (B, H, T, K)
        return (self.gate.view(1, -1, 1, 1) * (scores @ values)).to(q.dtype)  # an fp32 gate keeps bf16 y bf16


def apply_llama_adapter(model, length: int, layers: int | None):
    layers = model.cfg.n_layer if layers is None else layers
    if not 1 <= layers <= model.cfg.n_layer:
        raise ValueError(f"llama_adapter needs 1 <= layers <= {model.cfg.n_layer}, got {layers}")
    if length < 1:
        raise ValueError(f"adaption prompt length must be >= 1, got {length}")
    for block in model.blocks[-layers:]:
        block.attn.adaption = AdaptionPrompt(model.cfg, length).to(model.tok_emb.weight.device)


def llama_adapter_parameter_count(cfg, length: int, layers: int | None, **_) -> int:
    layers = cfg.n_layer if layers is None else layers
    return layers * (length * cfg.d_model + cfg.n_head)


register(Method(
    "llama_adapter", "gated adaption prompts in the top layers (Zhang et al. 2023)", apply_llama_adapter,
    llama_adapter_parameter_count,
    (Option("length", int, 10, "adaption prompt vectors K per layer"),
     Option("layers", int, None, "how many of the top blocks get an adaption prompt (default: all)")),
    lr=1e-2, examples=({}, {"length": 3, "layers": 1})))

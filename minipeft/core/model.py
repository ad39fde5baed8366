"""One transformer, many families: GPT-2, BERT, Llama, Gemma and the others are the same stack of
blocks with different choices for positions, normalization, activation and attention. Each choice is a
named switch of `ModelConfig`, and a family is a row of switches (`FAMILIES`): the code below reads
switches, never family names, so adding a family adds a row (and, in pretrained.py, its weight names).

    idx (B, T) ──tok_emb (× √d: emb_scale)──┬─ + pos_emb (learned positions) + type_emb ─ emb_ln (emb_norm)
                                            │
                ┌───────────────────────────▼───────────────────────────┐  × n_layer
                │ attn: q k v (→ q_norm, k_norm) → RoPE → attention → o  │
                │ mlp:  up (and gate) → act → down                       │
                └───────────────────────────┬───────────────────────────┘
                             ln_f (pre-norm families) ── head: LM logits (B, T, vocab) or class logits

    norm_place  pre:       x = x + attn(ln1(x));            x = x + mlp(ln2(x))
                post:      x = ln1(x + attn(x));            x = ln2(x + mlp(x))
                sandwich:  x = x + ln1_post(attn(ln1(x)));  x = x + ln2_post(mlp(ln2(x)))

The families (`-` = off; sizes such as head_dim, the window length or the RoPE base come from each
checkpoint's config):

| family     | positions | pos_offset | type_vocab_size | emb_norm | emb_scale | norm      | norm_place |
|------------|-----------|------------|-----------------|----------|-----------|-----------|------------|
| gpt2       | learned   | 0          | 0               | -        | -         | layernorm | pre        |
| bert       | learned   | 0          | 2               | yes      | -         | layernorm | post       |
| roberta    | learned   | 2          | 1               | yes      | -         | layernorm | post       |
| distilbert | learned   | 0          | 0               | yes      | -         | layernorm | post       |
| llama      | rope      | 0          | 0               | -        | -         | rmsnorm   | pre        |
| mistral    | rope      | 0          | 0               | -        | -         | rmsnorm   | pre        |
| qwen2      | rope      | 0          | 0               | -        | -         | rmsnorm   | pre        |
| qwen3      | rope      | 0          | 0               | -        | -         | rmsnorm   | pre        |
| phi3       | rope      | 0          | 0               | -        | -         | rmsnorm   | pre        |
| gemma      | rope      | 0          | 0               | -        | yes       | rmsnorm+1 | pre        |
| gemma2     | rope      | 0          | 0               | -        | yes       | rmsnorm+1 | sandwich   |
| gemma3     | rope      | 0          | 0               | -        | yes       | rmsnorm+1 | sandwich   |

| family     | act       | gated | causal | qkv_bias | o_bias | mlp_bias | qk_norm |
|------------|-----------|-------|--------|----------|--------|----------|---------|
| gpt2       | gelu_tanh | -     | yes    | yes      | yes    | yes      | -       |
| bert       | gelu      | -     | -      | yes      | yes    | yes      | -       |
| roberta    | gelu      | -     | -      | yes      | yes    | yes      | -       |
| distilbert | gelu      | -     | -      | yes      | yes    | yes      | -       |
| llama      | silu      | yes   | yes    | -        | -      | -        | -       |
| mistral    | silu      | yes   | yes    | -        | -      | -        | -       |
| qwen2      | silu      | yes   | yes    | yes      | -      | -        | -       |
| qwen3      | silu      | yes   | yes    | -        | -      | -        | yes     |
| phi3       | silu      | yes   | yes    | -        | -      | -        | -       |
| gemma      | gelu_tanh | yes   | yes    | -        | -      | -        | -       |
| gemma2     | gelu_tanh | yes   | yes    | -        | -      | -        | -       |
| gemma3     | gelu_tanh | yes   | yes    | -        | -      | -        | yes     |

| family     | layer_pattern | attn_softcap | final_softcap | rope_local_theta |
|------------|---------------|--------------|---------------|------------------|
| gpt2       | F             | -            | -             | -                |
| bert       | F             | -            | -             | -                |
| roberta    | F             | -            | -             | -                |
| distilbert | F             | -            | -             | -                |
| llama      | F             | -            | -             | -                |
| mistral    | S             | -            | -             | -                |
| qwen2      | F             | -            | -             | -                |
| qwen3      | F             | -            | -             | -                |
| phi3       | S             | -            | -             | -                |
| gemma      | F             | -            | -             | -                |
| gemma2     | SF            | 50           | 30            | -                |
| gemma3     | SSSSSF        | -            | -             | 10000            |

So Llama vs Gemma 2: Gemma 2 scales the embeddings by √d_model, normalizes with x/rms · (1 + w), puts a
second norm on each sub-layer's output (sandwich), gates with tanh-GELU instead of SiLU, alternates
sliding-window and full layers, and soft-caps attention logits (tanh(s/50)·50) and final logits
(tanh(z/30)·30); it also scales queries by query_pre_attn_scalar^-0.5 (attn_scale), from its config.

What each switch does:
    positions         "learned": a table pos_emb of max_seq_len (+ pos_offset) rows; "rope": rotary
                      embeddings (Su et al. 2021) on q and k, base rope_theta, on the first rope_fraction
                      of each head (Phi-3), optionally scaled (rope_scaling: linear, or Llama 3's)
    pos_offset        learned positions start at this row (RoBERTa: padding_idx + 1)
    type_vocab_size   token-type (segment) embeddings; 0 = none
    emb_norm          a norm right after the embeddings (post-norm encoders)
    emb_scale         token embeddings × √d_model (Gemma)
    norm              "layernorm" (with bias), "rmsnorm" (x/rms · w) or "rmsnorm+1" (x/rms · (1 + w), w = 0
                      at init, computed in fp32: Gemma)
    norm_place        "pre", "post" or "sandwich" (the diagram above)
    act, gated        MLP: down(act(up(x))), or gated: down(act(gate(x)) · up(x)) (SwiGLU, GeGLU)
    causal            a token sees only earlier tokens (decoders) or all of them (encoders)
    qkv_bias, o_bias, mlp_bias   bias terms of q/k/v, of o, of the MLP's linear layers
    qk_norm           a norm over head_dim on every query and key head, before RoPE (Qwen3, Gemma 3)
    layer_pattern     repeated over the layers: "S" = sliding-window layer (keys at most sliding_window - 1
                      positions back), "F" = full attention; without a sliding_window every layer is full
    attn_softcap      attention logits s -> tanh(s / c) · c before the mask (Gemma 2); 0 = off
    final_softcap     LM logits z -> tanh(z / c) · c (Gemma 2); 0 = off
    rope_local_theta  sliding layers use their own (unscaled) RoPE with this base (Gemma 3: 10k local, 1M global)
    attn_scale        q·k is scaled by attn_scale^-0.5 (Gemma 2/3: query_pre_attn_scalar); None = head_dim
    head_dim          set independently of d_model (Gemma, Qwen3); None = d_model / n_head
Grouped-query attention (n_kv_head < n_head) and a tied head (tie_embeddings) are settings of every family.

Module names are the same in every family (`blocks[i].attn.{q,k,v,o}`, `blocks[i].mlp.{up,gate,down}`,
`blocks[i].{ln1,ln2}`, `tok_emb`, `pos_emb`, `ln_f`, `head`; sandwich blocks add `ln1_post`, `ln2_post`,
qk_norm adds `attn.q_norm`, `attn.k_norm`), so a PEFT method that targets "q" finds the same projection
in all of them. PEFT methods never edit the math here: LoRA and adapters replace `nn.Linear` modules by
name, and the slots `Attention.prefix`, `Attention.adaption` and `Transformer.prompt` (all `None` by
default) are where prefix tuning, LLaMA-Adapter and prompt tuning plug in (see their files in
methods/). Training with dropout (or with attention soft-capping, which SDPA cannot do), attention is
written out (`attention_with_dropout`), and every dropout is `Dropout`, which draws its masks four
elements per random number.

Parameters (gpt2/bert, d = d_model, f = d_ff, V = vocab, P = positions):
    V·d + P·d + n_layer·(4d² + 4d  +  2fd + f + d  +  4d) + 2d        (+ types and emb_ln for bert)
"""
import functools
import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .generate import greedy
from .kv_cache import KVCache
from minipeft.fast.losses import lm_loss
from minipeft.scale.precision import compute, precision_of

# Llama's row; every other family is written as what differs from it
LLAMA = dict(positions="rope", pos_offset=0, type_vocab_size=0, emb_norm=False, emb_scale=False, norm="rmsnorm",
             norm_place="pre", act="silu", gated=True, causal=True, qkv_bias=False, o_bias=False, mlp_bias=False,
             qk_norm=False, layer_pattern="F", attn_softcap=None, final_softcap=None, rope_local_theta=None)
_ENCODER = dict(positions="learned", emb_norm=True, norm="layernorm", norm_place="post", act="gelu", gated=False,
                causal=False, qkv_bias=True, o_bias=True, mlp_bias=True)
_GEMMA = dict(emb_scale=True, norm="rmsnorm+1", act="gelu_tanh")
FAMILIES = {name: {**LLAMA, **differences} for name, differences in {
    "gpt2": dict(positions="learned", norm="layernorm", act="gelu_tanh", gated=False, qkv_bias=True, o_bias=True,
                 mlp_bias=True),
    "bert": dict(_ENCODER, type_vocab_size=2),
    "roberta": dict(_ENCODER, type_vocab_size=1, pos_offset=2),
    "distilbert": _ENCODER,
    "llama": {},
    "mistral": dict(layer_pattern="S"),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
    "phi3": dict(layer_pattern="S"),
    "gemma": _GEMMA,
    "gemma2": dict(_GEMMA, norm_place="sandwich", layer_pattern="SF", attn_softcap=50.0, final_softcap=30.0),
    "gemma3": dict(_GEMMA, norm_place="sandwich", layer_pattern="SSSSSF", qk_norm=True, rope_local_theta=10_000.0),
}.items()}
FLAVORS = tuple(FAMILIES)  # the name older code and the public API use for a family

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "silu": F.silu}
CHOICES = {"positions": ("learned", "rope"), "norm": ("layernorm", "rmsnorm", "rmsnorm+1"),
           "norm_place": ("pre", "post", "sandwich"), "act": tuple(ACTIVATIONS)}
ROPE_SCALINGS = ("linear", "llama3")


@dataclass
class ModelConfig:
    flavor: str = "gpt2"  # the family: FAMILIES[flavor] fills every switch left at None
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 2
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    d_model: int = 64
    d_ff: int | None = None  # None = 4 · d_model
    head_dim: int | None = None  # None = d_model / n_head
    max_seq_len: int = 512  # positions: the learned table or the RoPE cache
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # RoPE on the first rope_fraction of each head's dimensions (Phi-3)
    rope_scaling: dict | None = None  # {"rope_type": "linear", "factor"} or Llama 3's {"rope_type": "llama3", ...}
    sliding_window: int | None = None  # the window of "S" layers (layer_pattern); None = every layer full
    attn_scale: float | None = None  # scores q·k / √attn_scale; None = head_dim
    tie_embeddings: bool = True  # head.weight is tok_emb.weight (LM head only)
    dropout: float = 0.0  # residual, embedding and attention dropout
    n_classes: int | None = None  # set: forward returns class logits from a fresh linear head
    pool: str = "mean"  # encoder classifier pooling: "cls" or "mean" (causal models: the last real token)
    pad_token_id: int = 0
    # the family's switches (see the module docstring); None = the family's value
    positions: str | None = None
    pos_offset: int | None = None
    type_vocab_size: int | None = None
    emb_norm: bool | None = None
    emb_scale: bool | None = None
    norm: str | None = None
    norm_place: str | None = None
    act: str | None = None
    gated: bool | None = None
    causal: bool | None = None
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    mlp_bias: bool | None = None
    qk_norm: bool | None = None
    layer_pattern: str | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    rope_local_theta: float | None = None
    extra: dict = field(default_factory=dict)  # provenance (source name, token ids) — not used by the math

    def __post_init__(self):
        if self.flavor not in FAMILIES:
            raise ValueError(f"unknown flavor {self.flavor!r}; choose one of {', '.join(FAMILIES)}")
        for switch, value in FAMILIES[self.flavor].items():
            if getattr(self, switch) is None:
                setattr(self, switch, value)
        self.n_kv_head = self.n_kv_head or self.n_head
        self.d_ff = self.d_ff or 4 * self.d_model
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must divide by n_head ({self.n_head}), or set head_dim")
        self.head_dim = self.head_dim or self.d_model // self.n_head
        self._check()

    def _check(self):
        """One sentence per contradiction (ValueError)."""
        for switch, choices in CHOICES.items():
            if getattr(self, switch) not in choices:
                raise ValueError(f"{switch} must be one of {', '.join(choices)}, not {getattr(self, switch)!r}")
        problems = [
            (self.n_head % self.n_kv_head, f"n_head ({self.n_head}) must divide by n_kv_head ({self.n_kv_head})"),
            (self.pool not in ("cls", "mean"), f"pool must be 'cls' or 'mean', not {self.pool!r}"),
            (not self.layer_pattern or set(self.layer_pattern) - set("SF"),
             f"layer_pattern is a string of S (sliding) and F (full), not {self.layer_pattern!r}"),
            (self.sliding_window is not None and self.sliding_window < 1,
             f"sliding_window must be >= 1, not {self.sliding_window}"),
            (self.sliding_window and "S" in self.layer_pattern and not self.causal,
             "a sliding window needs causal attention, but causal is off"),
            (self.positions == "learned" and (self.rope_fraction != 1 or self.rope_scaling or self.rope_local_theta),
             "RoPE settings (rope_fraction, rope_scaling, rope_local_theta) contradict learned positions"),
            (self.positions == "rope" and self.pos_offset, "pos_offset is for learned positions, not rope"),
            (self.positions == "rope" and self.rotary_dim % 2,
             f"RoPE needs an even number of rotated dimensions, not {self.rotary_dim}"),
            (any(c is not None and c < 0 for c in (self.attn_softcap, self.final_softcap)),
             "soft-caps must be positive (0 = off)"),
        ]
        for failed, message in problems:
            if failed:
                raise ValueError(message)
        rope_type = (self.rope_scaling or {}).get("rope_type")
        if self.rope_scaling and rope_type not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling {rope_type!r} is not supported; supported: {', '.join(ROPE_SCALINGS)}")

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the first ones)."""
        return int(self.head_dim * self.rope_fraction)

    @property
    def has_biases(self) -> bool:
        """Whether the model has any bias term (linear layers or LayerNorms)."""
        return self.qkv_bias or self.o_bias or self.mlp_bias or self.norm == "layernorm"

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None for full attention."""
        sliding = self.layer_pattern[layer % len(self.layer_pattern)] == "S"
        return self.sliding_window if sliding else None

    def switches_changed(self) -> dict:
        """The switches set to something other than the family's row (empty for a plain family)."""
        return {k: getattr(self, k) for k, v in FAMILIES[self.flavor].items() if getattr(self, k) != v}


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The rotation speeds (rotary_dim/2,) of rotate-half RoPE: pair j turns by theta^(-2j/rotary_dim)
    per position. Scaled RoPE slows them down for longer contexts: "linear" divides every speed by
    `factor`; "llama3" (Llama 3.1) divides only the slow ones (wavelength above original / low_freq_factor),
    keeps the fast ones (below original / high_freq_factor) and blends linearly in between."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    kept = ((scaling["original_max_position_embeddings"] / wavelength - low) / (high - low)).clamp(0, 1)
    return (1 - kept) * inv_freq / factor + kept * inv_freq


def rope_tables(rotary_dim: int, max_seq_len: int, theta: float, scaling: dict | None = None):
    """cos/sin tables (max_seq_len, rotary_dim) for rotate-half rotary embeddings (Su et al. 2021)."""
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32),
                         rope_inv_freq(rotary_dim, theta, scaling))  # (S, rotary_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, rotary_dim): both halves rotate by the same angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd) rotated pairwise: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), halves paired.
    With tables narrower than hd (partial RoPE, Phi-3) only the first cos.shape[-1] dimensions turn."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]], dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # the tables are fp32; bf16 activations stay bf16
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Dropout(nn.Module):
    """Dropout (Srivastava et al. 2014): in training, zero each element with probability p and scale the
    others by 1/(1 - p), so the expected value is unchanged; the identity in eval mode.

    The same function as nn.Dropout, drawn faster. PyTorch's CPU dropout asks its Mersenne Twister for
    one random number per element, which costs more than the matmuls around it (a fifth of a MiniLM
    LoRA step). Here one 64-bit draw serves four elements: each gets 15 of its bits, a uniform integer
    u in [0, 2^15), and is kept when u >= round(p · 2^15). So the drop rate is p rounded to a multiple
    of 2^-15 (0.1 → 0.100006) and the scale uses that rate, keeping the expectation exact."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return x * dropout_mask(x.shape, self.p, x.dtype, x.device)

    def extra_repr(self):
        return f"p={self.p}"


def dropout_mask(shape, p: float, dtype, device) -> torch.Tensor:
    """A tensor of `shape`: 0 with probability ≈ p, else 1 / (1 - p') (see Dropout)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # 63 random bits each
    # four 16-bit pieces per word; the top bit of each piece is dropped (the word's top bit is always 0)
    bits = words.view(torch.int16)[:n].view(shape).bitwise_and_(0x7FFF)  # uniform in [0, 2^15)
    cut = round(p * 2**15)
    return bits.ge(cut).to(dtype).mul_(2**15 / (2**15 - cut))


def attention_with_dropout(q, k, v, mask, is_causal: bool, drop: Dropout, scale: float | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v with dropout on the attention weights, written out: what
    F.scaled_dot_product_attention computes, whose CPU kernels have no dropout (with dropout_p > 0 it
    falls back to these same steps, drawing its mask the slow way) and no soft-capping (Gemma 2's
    s -> tanh(s / softcap) · softcap, before the mask). q (B, H, T, hd); k, v (B, Hkv, S, hd);
    mask: boolean (B or 1, 1, T, S), True = may attend; scale: default 1/√hd. Returns (B, H, T, hd)."""
    if k.shape[1] != q.shape[1]:  # grouped-query: each key/value head serves H / Hkv query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:  # added, not masked_fill: an addition keeps nothing for backward
        scores = scores + torch.zeros(mask.shape, dtype=scores.dtype, device=q.device).masked_fill_(
            ~mask, float("-inf"))
    return drop(scores.softmax(dim=-1)) @ v  # (B, H, T, hd)


class LayerNorm(nn.LayerNorm):
    """LayerNorm (Ba et al. 2016) in the input's dtype, its weight and bias cast to it: under bf16-mixed a
    trainable fp32 bias (bitfit) meets a frozen bf16 weight and bf16 activations (in fp32 the same as
    nn.LayerNorm; the kernel accumulates its statistics in fp32 either way)."""

    def forward(self, x):
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """RMSNorm (Zhang & Sennrich 2019): x / rms(x) · w, normalized in fp32 whatever x's dtype and cast back
    before the weight multiplies, as transformers' Llama does (in fp32 the same as nn.RMSNorm)."""

    def forward(self, x):
        return F.rms_norm(x.float(), self.normalized_shape, None, self.eps).type_as(x) * self.weight


class OffsetRMSNorm(nn.RMSNorm):
    """Gemma's RMSNorm: x / rms(x) · (1 + w), with w = 0 at init, computed in fp32 whatever x's dtype."""

    def reset_parameters(self):
        nn.init.zeros_(self.weight)

    def forward(self, x):
        return F.rms_norm(x.float(), self.normalized_shape, 1 + self.weight.float(), self.eps).type_as(x)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The family's norm over the last `dim` (default d_model) features."""
    dim = dim or cfg.d_model
    if cfg.norm == "layernorm":
        return LayerNorm(dim, eps=cfg.norm_eps)
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, eps=cfg.norm_eps)
    return OffsetRMSNorm(dim, eps=cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None = None):
        super().__init__()
        self.cfg, self.window = cfg, window  # window: keys at most window - 1 positions back (None: all)
        d, hd = cfg.d_model, cfg.head_dim
        self.q = nn.Linear(d, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.k = nn.Linear(d, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.v = nn.Linear(d, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.n_head * hd, d, bias=cfg.o_bias)
        if cfg.qk_norm:  # one norm over head_dim, shared by the heads (Qwen3, Gemma 3)
            self.q_norm, self.k_norm = make_norm(cfg, hd), make_norm(cfg, hd)
        self.scale = (cfg.attn_scale or hd) ** -0.5
        self.attn_drop = Dropout(cfg.dropout)  # on the attention weights
        # slots filled by PEFT methods (None = plain attention):
        self.prefix = None  # methods/prefix.py: callable(batch) -> key/value prefixes, each (B, Hkv, P, hd)
        self.adaption = None  # methods/llama_adapter.py: module(q, k_proj, v_proj) -> gated extra output

    def forward(self, x, mask, rope=None, cache=None, layer_idx=0):
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # every head's vector normalized over head_dim
        if rope is not None:
            cos, sin = rope  # (T, rotary_dim) each, already offset to these tokens' positions
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.prefix is not None and (cache is None or cache.layers[layer_idx] is None):
            prefix_k, prefix_v = self.prefix(B)  # (B, Hkv, P, hd): keys/values of P virtual tokens
            k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, Hkv, T_past + T, hd)
        is_causal = mask is None and cfg.causal and k.shape[2] == T
        if cfg.attn_softcap or (self.training and cfg.dropout > 0):
            y = attention_with_dropout(q, k, v, mask, is_causal, self.attn_drop, self.scale,
                                       cfg.attn_softcap)  # (B, H, T, hd)
        else:  # one fused kernel (flash attention on CPU)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                                               enable_gqa=cfg.n_kv_head != cfg.n_head)  # (B, H, T, hd)
        if self.adaption is not None:
            y = y + self.adaption(q, self.k, self.v)  # (B, H, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))  # (B, T, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated, self.act = cfg.gated, ACTIVATIONS[cfg.act]
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        if cfg.gated:
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        if self.gated:  # SwiGLU (silu), GeGLU (gelu)
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = cfg.norm_place != "post"
        self.layer_idx, self.window = layer_idx, cfg.window(layer_idx)
        self.ln1, self.attn = make_norm(cfg), Attention(cfg, self.window)
        self.ln2, self.mlp = make_norm(cfg), MLP(cfg)
        sandwich = cfg.norm_place == "sandwich"  # Gemma 2/3: each sub-layer's output is normalized too
        self.ln1_post = make_norm(cfg) if sandwich else nn.Identity()
        self.ln2_post = make_norm(cfg) if sandwich else nn.Identity()
        self.drop = Dropout(cfg.dropout)

    def forward(self, x, mask=None, rope=None, cache=None):  # (B, T, d) -> (B, T, d)
        # each sub-layer's output joins the residual stream in the stream's dtype: under bf16-mixed an fp32
        # parameter of a method (an adapter's, IA³'s) must not turn the stream into fp32
        if self.pre_norm:
            x = x + self.drop(self.ln1_post(self.attn(self.ln1(x), mask, rope, cache, self.layer_idx))).to(x.dtype)
            return x + self.drop(self.ln2_post(self.mlp(self.ln2(x)))).to(x.dtype)
        x = self.ln1(x + self.drop(self.attn(x, mask, rope, cache, self.layer_idx)).to(x.dtype))
        return self.ln2(x + self.drop(self.mlp(x)).to(x.dtype))


class Embedding(nn.Embedding):
    """nn.Embedding, without its random init on the meta device (pretrained.py builds models there and
    loads the weights in): meta tensors hold no values, and torch's normal_ on them imports ≈ 70 MiB of
    decompositions the rest of a run never needs."""

    def reset_parameters(self):
        if not self.weight.is_meta:
            super().reset_parameters()


def in_compute_dtype(forward):
    """Run a forward method under the model's precision: autocast to its compute dtype unless it is fp32
    (precision.compute), on the device of the token ids."""
    @functools.wraps(forward)
    def run(self, idx, *args, **kwargs):
        with compute(self, idx.device):
            return forward(self, idx, *args, **kwargs)
    return run


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok_emb = Embedding(cfg.vocab_size, d)
        if cfg.positions == "learned":
            self.pos_emb = Embedding(cfg.pos_offset + cfg.max_seq_len, d)
        if cfg.type_vocab_size:
            self.type_emb = Embedding(cfg.type_vocab_size, d)
        if cfg.emb_norm:
            self.emb_ln = make_norm(cfg)
        self.reset_buffers()
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg) if cfg.norm_place != "post" else None
        self.apply(self._init_weights)  # the trunk first, so its weights do not depend on the head
        if cfg.n_classes:
            self.add_classifier(cfg.n_classes)
        else:
            self.head = nn.Linear(d, cfg.vocab_size, bias=False)
            self._init_weights(self.head)
            if cfg.tie_embeddings:
                self.head.weight = self.tok_emb.weight
        self.prompt = None  # methods/prompt.py: module inserting soft tokens into the embeddings (B, T, d)
        self.adapters = None  # methods/multi.py: adapters side by side, routed per row by adapter_names
        self.checkpointing = False  # recompute each block's activations in backward
        # set by mp.apply: {"method", "options", "base_fingerprint"}; None for a plain base model
        self.peft_config: dict | None = None
        self.precision = "fp32"  # a name of precision.PRECISIONS, set by precision.set_precision

    def reset_buffers(self):
        """Compute the buffers no checkpoint holds, the RoPE tables (max_seq_len, rotary_dim): at build
        time, and again for a model built on the meta device (pretrained.py loads weights into one)."""
        cfg = self.cfg
        tables = {"rope": (cfg.rope_theta, cfg.rope_scaling)} if cfg.positions == "rope" else {}
        if cfg.positions == "rope" and cfg.rope_local_theta:  # sliding layers' own RoPE (Gemma 3)
            tables["rope_local"] = (cfg.rope_local_theta, None)
        for name, (theta, scaling) in tables.items():
            if self.tok_emb.weight.is_meta:  # shapes only: no arithmetic on the meta device (see Embedding)
                cos = sin = torch.empty(cfg.max_seq_len, cfg.rotary_dim, device="meta")
            else:
                cos, sin = rope_tables(cfg.rotary_dim, cfg.max_seq_len, theta, scaling)
            self.register_buffer(f"{name}_cos", cos, persistent=False)
            self.register_buffer(f"{name}_sin", sin, persistent=False)

    def add_classifier(self, n_classes: int):
        """Replace the LM head by a fresh (n_classes × d_model) classifier head."""
        self.cfg.n_classes = n_classes
        self.head = nn.Linear(self.cfg.d_model, n_classes, device=self.tok_emb.weight.device,
                              dtype=precision_of(self).trainable)  # it trains
        self._init_weights(self.head)
        return self

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)) and not module.weight.is_meta:
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def prompt_length(self) -> int:
        """Soft-prompt tokens the `prompt` slot inserts into the sequence (0 without one)."""
        return self.prompt.length if self.prompt is not None else 0

    @property
    def prefix_length(self) -> int:
        """Virtual tokens every layer's `prefix` slot puts before the keys and values (0 without one)."""
        prefix = self.blocks[0].attn.prefix
        return prefix.length if prefix is not None else 0

    @property
    def virtual_tokens(self) -> int:
        """Positions a method's virtual tokens take from max_seq_len: soft prompt + prefix."""
        return self.prompt_length + self.prefix_length

    def _attention_mask(self, attention_mask, T, past, window=None, document_ids=None):
        """Boolean (B or 1, 1, T, past + T) mask where True = may attend, or None when SDPA's own causal
        path (or no mask at all) gives the same answer. `past` keys (cached tokens or prefix virtual
        tokens) come before the T current ones and are always real. A sliding `window` hides keys
        window or more positions back; `document_ids` (B, T) (packed rows) hide other documents' tokens."""
        cfg = self.cfg
        if attention_mask is not None and not attention_mask.is_meta and bool(attention_mask.all()):
            attention_mask = None  # no padding: as if no mask was given, so SDPA takes its fast path
        total = past + T
        windowed = window is not None and total > window  # some query has a key out of its reach
        if attention_mask is None and document_ids is None and not windowed and (not cfg.causal or past == 0):
            return None
        device = self.tok_emb.weight.device
        allowed = torch.ones(T, total, dtype=torch.bool, device=device)
        if cfg.causal:
            allowed = allowed.tril(diagonal=past)  # query i (position past+i) sees keys <= past+i
        if windowed:
            allowed = allowed.triu(diagonal=past - window + 1)  # ... and keys > past+i - window
        allowed = allowed[None, None]  # (1, 1, T, total)
        if document_ids is not None:
            same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
            allowed = allowed & F.pad(same, (past, 0), value=True)[:, None]  # (B, 1, T, total)
        if attention_mask is not None:
            keys_real = F.pad(attention_mask.bool(), (past, 0), value=True)[:, None, None, -total:]
            # a padding query would otherwise see no key at all (NaN); letting it see itself keeps
            # the row finite and changes no real token's output
            itself = torch.zeros(T, total, dtype=torch.bool, device=device)
            itself[torch.arange(T), past + torch.arange(T)] = True
            allowed = (allowed & keys_real) | itself  # (B, 1, T, total)
        return allowed

    def _rope_at(self, positions, window):
        """(cos, sin) at these positions, (T, rotary_dim) each, or (B, 1, T, rotary_dim) for per-row
        positions (B, T): a sliding layer's own RoPE where the family has one (Gemma 3), else the global
        one; None without RoPE."""
        if self.cfg.positions != "rope":
            return None
        name = "rope_local" if window is not None and self.cfg.rope_local_theta else "rope"
        cos, sin = getattr(self, f"{name}_cos")[positions], getattr(self, f"{name}_sin")[positions]
        return (cos[:, None], sin[:, None]) if positions.dim() == 2 else (cos, sin)

    def _positions(self, past: int, T: int, position_ids, device, with_prompt: bool = False) -> torch.Tensor:
        """Each token's position: past, past + 1, ... (T,), or per row (B, T) from position_ids, which
        count a sequence's own tokens (packed rows restart them; left-padded rows skip the padding)."""
        if position_ids is None:
            return torch.arange(past, past + T, device=device)
        positions = position_ids + self.virtual_tokens  # the method's virtual tokens (prefix, soft prompt) first
        if with_prompt:  # this call inserts the soft prompt: its tokens take the positions before the text
            at, soft = self.prompt.insert_at, torch.arange(self.prefix_length, self.virtual_tokens, device=device)
            positions = torch.cat([positions[:, :at], soft.expand(len(positions), -1), positions[:, at:]], dim=1)
        if int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(positions.max())} is beyond the model's {self.cfg.max_seq_len} "
                             "positions; use a shorter --max-len")
        return positions

    @in_compute_dtype
    def encode(self, idx, attention_mask=None, token_type_ids=None, cache: KVCache | None = None,
               position_ids=None, document_ids=None, adapter_names=None):
        """idx (B, T) token ids -> final hidden states (B, T, d_model). position_ids (B, T): each token's
        position (default 0, 1, ... after the cache); document_ids (B, T): packed rows, a token attends
        only within its document; adapter_names: the adapter each row runs (methods/multi.py)."""
        cfg = self.cfg
        if self.adapters is not None:
            self.adapters.route(adapter_names, idx)
        elif adapter_names is not None:
            raise ValueError("adapter_names needs adapters loaded side by side: mp.load_adapter(model, path, name=...)")
        x = self.tok_emb(idx)  # (B, T, d)
        if cfg.emb_scale:  # Gemma: × √d_model, in the embedding's dtype
            x = x * torch.tensor(cfg.d_model ** 0.5, dtype=x.dtype)
        first_call = cache is None or cache.length == 0
        with_prompt = self.prompt is not None and first_call
        if with_prompt:  # soft prompt tokens join the sequence: (B, P + T, d)
            x, attention_mask, token_type_ids = self.prompt.insert(x, attention_mask, token_type_ids)
        B, T, _ = x.shape
        past = self.prefix_length if first_call else cache.length  # keys before these tokens
        if past + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens (virtual tokens and cache included) is longer "
                             f"than the model's {cfg.max_seq_len}; use a shorter --max-len")
        positions = self._positions(past, T, position_ids, idx.device, with_prompt)  # (T,) or (B, T)
        if cfg.positions == "learned":
            x = x + self.pos_emb(positions + cfg.pos_offset)
        if cfg.type_vocab_size:
            types = token_type_ids if token_type_ids is not None else torch.zeros(B, T, dtype=torch.long,
                                                                                 device=idx.device)
            x = x + self.type_emb(types)
        x = self.drop(self.emb_ln(x) if cfg.emb_norm else x)
        windows = {block.window for block in self.blocks}  # None (full attention) and/or the sliding window
        masks = {w: self._attention_mask(attention_mask, T, past, w, document_ids) for w in windows}
        ropes = {w: self._rope_at(positions, w) for w in windows}
        for block in self.blocks:
            mask, rope = masks[block.window], ropes[block.window]
            if self.checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                # keep only the block's input; backward reruns the block (non-reentrant: fine when x
                # needs no grad) with the RNG state restored, so dropout draws the same masks again.
                # Never with a KV cache: the rerun would append its keys/values a second time.
                x = checkpoint(block, x, mask, rope, None, use_reentrant=False, preserve_rng_state=True)
            else:
                x = block(x, mask, rope, cache)
        x = self.ln_f(x) if self.ln_f is not None else x  # (B, T, d)
        return self.prompt.remove(x) if with_prompt else x  # shapes never change: (B, T_in, d)

    def pool(self, hidden, attention_mask=None):
        """(B, T, d) -> (B, d): [CLS] or mean of real tokens (bert), last real token (causal)."""
        B, T, _ = hidden.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=hidden.device)
        if not self.cfg.causal and self.cfg.pool == "cls":
            return hidden[:, 0]
        if not self.cfg.causal:
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        last = attention_mask.sum(1).clamp(min=1) - 1  # (B,) right padding: last real index
        return hidden[torch.arange(B, device=hidden.device), last]

    @in_compute_dtype
    def forward(self, idx, attention_mask=None, token_type_ids=None, cache: KVCache | None = None,
                position_ids=None, document_ids=None, adapter_names=None, labels=None, shift_labels=None,
                chunk_size=None, vocab_block=None, reduction="mean"):
        """(B, T) -> LM logits (B, T, vocab), or class logits (B, n_classes) when cfg.n_classes.
        With labels (B, T) (transformers' convention: the inputs, shifted inside; -100 = no loss) or
        shift_labels (B, T) (already aligned with idx): the mean LM loss instead, computed in tiles of
        chunk_size tokens × vocab_block vocabulary entries, so the logits never exist whole (losses.py);
        reduction="sum" gives the summed loss of the labelled tokens instead of their mean, "none" each
        token's (B, T), 0 where unlabelled.
        The other arguments are encode's."""
        hidden = self.encode(idx, attention_mask, token_type_ids, cache, position_ids, document_ids, adapter_names)
        if self.cfg.n_classes and (labels is not None or shift_labels is not None):
            raise ValueError("labels are for the LM head; a classifier's loss is F.cross_entropy(model(idx), classes)")
        if self.cfg.n_classes:
            return self.head(self.drop(self.pool(hidden, attention_mask)))
        if labels is not None or shift_labels is not None:
            return lm_loss(hidden, self.head.weight, labels, shift_labels, self.cfg.final_softcap, chunk_size,
                           vocab_block, causal=self.cfg.causal, reduction=reduction)
        logits = self.head(hidden)  # (B, T, vocab)
        if self.cfg.final_softcap:  # Gemma 2: z -> tanh(z / c) · c
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, use_cache: bool = True, eos_id: int | None = None):
        """Greedy decoding, idx (B, T) -> (B, T + new): a thin call into generate.py, where sampling,
        stop strings and batches of prompts of different lengths are (generate.generate)."""
        return greedy(self, idx, max_new_tokens, use_cache, eos_id)

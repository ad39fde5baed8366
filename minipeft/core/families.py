"""One transformer (model.py), many families: GPT-2, BERT, Llama, Gemma and the others differ only in their
choices for positions, normalization, activation and attention. Each choice is a named switch of `ModelConfig`
and a family is a row of switches (`FAMILIES`), so adding a family adds a row here (and, in formats/pretrained.py,
its weight names). `-` = off; sizes (head_dim, the window, the RoPE base) come from each checkpoint's config:

| family     | positions | pos_offset | type_vocab_size | emb_norm | emb_scale | norm      | norm_place | act       |
|------------|-----------|------------|-----------------|----------|-----------|-----------|------------|-----------|
| gpt2       | learned   | 0          | 0               | -        | -         | layernorm | pre        | gelu_tanh |
| bert       | learned   | 0          | 2               | yes      | -         | layernorm | post       | gelu      |
| roberta    | learned   | 2          | 1               | yes      | -         | layernorm | post       | gelu      |
| distilbert | learned   | 0          | 0               | yes      | -         | layernorm | post       | gelu      |
| llama      | rope      | 0          | 0               | -        | -         | rmsnorm   | pre        | silu      |
| mistral    | rope      | 0          | 0               | -        | -         | rmsnorm   | pre        | silu      |
| qwen2      | rope      | 0          | 0               | -        | -         | rmsnorm   | pre        | silu      |
| qwen3      | rope      | 0          | 0               | -        | -         | rmsnorm   | pre        | silu      |
| phi3       | rope      | 0          | 0               | -        | -         | rmsnorm   | pre        | silu      |
| gemma      | rope      | 0          | 0               | -        | yes       | rmsnorm+1 | pre        | gelu_tanh |
| gemma2     | rope      | 0          | 0               | -        | yes       | rmsnorm+1 | sandwich   | gelu_tanh |
| gemma3     | rope      | 0          | 0               | -        | yes       | rmsnorm+1 | sandwich   | gelu_tanh |

| family     | gated | causal | qkv_bias | o_bias | mlp_bias | qk_norm | layer_pattern | attn_softcap | final_softcap |
|------------|-------|--------|----------|--------|----------|---------|---------------|--------------|---------------|
| gpt2       | -     | yes    | yes      | yes    | yes      | -       | F             | -            | -             |
| bert       | -     | -      | yes      | yes    | yes      | -       | F             | -            | -             |
| roberta    | -     | -      | yes      | yes    | yes      | -       | F             | -            | -             |
| distilbert | -     | -      | yes      | yes    | yes      | -       | F             | -            | -             |
| llama      | yes   | yes    | -        | -      | -        | -       | F             | -            | -             |
| mistral    | yes   | yes    | -        | -      | -        | -       | S             | -            | -             |
| qwen2      | yes   | yes    | yes      | -      | -        | -       | F             | -            | -             |
| qwen3      | yes   | yes    | -        | -      | -        | yes     | F             | -            | -             |
| phi3       | yes   | yes    | -        | -      | -        | -       | S             | -            | -             |
| gemma      | yes   | yes    | -        | -      | -        | -       | F             | -            | -             |
| gemma2     | yes   | yes    | -        | -      | -        | -       | SF            | 50           | 30            |
| gemma3     | yes   | yes    | -        | -      | -        | yes     | SSSSSF        | -            | -             |

So Llama vs Gemma 2: Gemma 2 scales the embeddings by √d_model, normalizes with x/rms · (1 + w), puts a second
norm on each sub-layer's output (sandwich), gates with tanh-GELU instead of SiLU, alternates sliding-window and full
layers, and soft-caps attention logits (tanh(s/50)·50) and final logits (tanh(z/30)·30); it also scales queries by
query_pre_attn_scalar^-0.5 (attn_scale), from its config.

Each switch is explained at its field of `ModelConfig` below. Grouped-query attention (n_kv_head < n_head), a tied
head (tie_embeddings), head_dim and attn_scale are settings of every family.

A classifier (n_classes) is one linear layer, `head`, on the pooled state; a fine-tuned encoder checkpoint
(…ForSequenceClassification) also brings its `pooler`, a dense layer on the first token before the head:

| pooler          | on the pooled state (B, d)          | transformers' classifier                                   |
|-----------------|-------------------------------------|------------------------------------------------------------|
| none            | drop → head (decoders: head)        | decoders, GPT-2: score (no bias)                           |
| dense_tanh      | dense → tanh → drop → head          | BERT: bert.pooler.dense, classifier                        |
| drop_dense_tanh | drop → dense → tanh → drop → head   | RoBERTa: classifier.dense, classifier.out_proj             |
| dense_relu      | dense → ReLU → drop → head          | DistilBERT: pre_classifier, classifier                     |

The encoders' poolers read the first token ([CLS], <s>): pool="cls". Dropout is off in eval mode.
"""
import operator
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F


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
FLAVORS = tuple(FAMILIES)  # the public API's name for the families

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "silu": F.silu}
POOLERS = {"dense_tanh": torch.tanh, "drop_dense_tanh": torch.tanh, "dense_relu": F.relu}  # the pooler's activation
CHOICES = {"positions": ("learned", "rope"), "norm": ("layernorm", "rmsnorm", "rmsnorm+1"),
           "norm_place": ("pre", "post", "sandwich"), "act": tuple(ACTIVATIONS), "pooler": ("none", *POOLERS)}
ROPE_SCALINGS = ("linear", "llama3")


def check_n_classes(n_classes) -> int:
    """n_classes as an int, or a ValueError: a classifier needs a whole number of classes, at least 1 (1: one
    score, as transformers' num_labels=1 regression head)."""
    try:
        number = None if isinstance(n_classes, bool) else operator.index(n_classes)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"n_classes must be a whole number >= 1 (the classes of the classifier head), "
                         f"not {n_classes!r}")
    return number


@dataclass
class ModelConfig:
    flavor: str = "gpt2"  # the family: FAMILIES[flavor] fills every switch left at None
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 2
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    d_model: int = 64
    d_ff: int | None = None  # None = 4 · d_model
    head_dim: int | None = None  # set apart from d_model (Gemma, Qwen3); None = d_model / n_head
    max_seq_len: int = 512  # positions: the learned table or the RoPE cache
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # the RoPE base
    rope_fraction: float = 1.0  # RoPE on the first rope_fraction of each head's dimensions (Phi-3)
    rope_scaling: dict | None = None  # {"rope_type": "linear", "factor"} or Llama 3's {"rope_type": "llama3", ...}
    sliding_window: int | None = None  # "S" layers see keys at most sliding_window - 1 back; None = every layer full
    attn_scale: float | None = None  # scores q·k / √attn_scale (Gemma 2/3: query_pre_attn_scalar); None = head_dim
    tie_embeddings: bool = True  # head.weight is tok_emb.weight (LM head only)
    dropout: float = 0.0  # residual, embedding and attention dropout
    n_classes: int | None = None  # set: forward returns class logits from a linear head (fresh, or a checkpoint's)
    pool: str = "mean"  # encoder classifier pooling: "cls" or "mean" (causal models: the last real token)
    pooler: str = "none"  # a trained encoder classifier's dense layer before the head (the table above)
    pad_token_id: int = 0
    # the family's switches (the tables above); None = the family's value
    positions: str | None = None  # "learned": a table pos_emb; "rope": rotary embeddings (Su et al. 2021) on q and k
    pos_offset: int | None = None  # learned positions start at this row (RoBERTa: padding_idx + 1)
    type_vocab_size: int | None = None  # token-type (segment) embeddings; 0 = none
    emb_norm: bool | None = None  # a norm right after the embeddings (post-norm encoders)
    emb_scale: bool | None = None  # token embeddings × √d_model (Gemma)
    norm: str | None = None  # "layernorm" (with bias), "rmsnorm" (x/rms · w), "rmsnorm+1" (x/rms · (1 + w): Gemma)
    norm_place: str | None = None  # "pre", "post" or "sandwich" (drawn in model.py's docstring)
    act: str | None = None  # the MLP: down(act(up(x)))
    gated: bool | None = None  # gated MLP: down(act(gate(x)) · up(x)) (SwiGLU, GeGLU)
    causal: bool | None = None  # a token sees only earlier tokens (decoders) or all of them (encoders)
    qkv_bias: bool | None = None  # bias terms of q, k and v
    o_bias: bool | None = None  # bias terms of o
    mlp_bias: bool | None = None  # bias terms of the MLP's linear layers
    qk_norm: bool | None = None  # a norm over head_dim on every query and key head, before RoPE (Qwen3, Gemma 3)
    layer_pattern: str | None = None  # repeated over the layers: "S" = sliding-window layer, "F" = full attention
    attn_softcap: float | None = None  # attention logits s -> tanh(s / c) · c before the mask (Gemma 2); 0 = off
    final_softcap: float | None = None  # LM logits z -> tanh(z / c) · c (Gemma 2); 0 = off
    rope_local_theta: float | None = None  # sliding layers' own unscaled RoPE base (Gemma 3: 10k local, 1M global)
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
        if self.n_classes is not None:
            check_n_classes(self.n_classes)
        problems = [
            (self.n_head % self.n_kv_head, f"n_head ({self.n_head}) must divide by n_kv_head ({self.n_kv_head})"),
            (self.pool not in ("cls", "mean"), f"pool must be 'cls' or 'mean', not {self.pool!r}"),
            (self.pooler != "none" and (self.causal or self.pool != "cls" or not self.n_classes),
             f"pooler {self.pooler!r} is an encoder classifier's layer on the first token: it needs n_classes, "
             f"pool='cls' and causal off"),
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

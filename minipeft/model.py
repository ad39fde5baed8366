"""One transformer, three flavours: GPT-2, BERT and Llama are the same stack of blocks with different
choices for positions, normalization, activation and masking.

    idx (B, T) ──tok_emb──┬─ + pos_emb (gpt2, bert) + type_emb, emb_ln (bert)
                          │
                ┌─────────▼─────────┐  × n_layer
                │ attn: q k v → SDPA → o      pre-norm:  x = x + attn(ln1(x)); x = x + mlp(ln2(x))
                │ mlp:  up (+gate) → act → down  post-norm: x = ln1(x + attn(x)); x = ln2(x + mlp(x))
                └─────────┬─────────┘
                        ln_f (gpt2, llama) ── head: LM logits (B, T, vocab) or class logits (B, n_classes)

| flavour | positions        | norm            | activation  | attention                  | biases |
|---------|------------------|-----------------|-------------|----------------------------|--------|
| gpt2    | learned          | LayerNorm, pre  | GELU (tanh) | causal                     | yes    |
| bert    | learned + types  | LayerNorm, post | GELU (erf)  | bidirectional, padding mask| yes    |
| llama   | RoPE (rope_theta)| RMSNorm, pre    | SwiGLU      | causal, grouped-query      | no     |

Module names are the same in every flavour (`blocks[i].attn.{q,k,v,o}`, `blocks[i].mlp.{up,gate,down}`,
`blocks[i].{ln1,ln2}`, `tok_emb`, `pos_emb`, `ln_f`, `head`), so a PEFT method that targets "q" finds
the same projection in all three. PEFT methods never edit the math here: LoRA and adapters replace
`nn.Linear` modules by name, and the slots `Attention.prefix`, `Attention.adaption` and
`Transformer.prompt` (all `None` by default) are where prefix tuning, LLaMA-Adapter and prompt tuning
plug in (see their files in methods/). Training with dropout, attention is written out (`attention_with_dropout`)
and every dropout is `Dropout`, which draws its masks four elements per random number.

Parameters (gpt2/bert, d = d_model, f = d_ff, V = vocab, P = positions):
    V·d + P·d + n_layer·(4d² + 4d  +  2fd + f + d  +  4d) + 2d        (+ types and emb_ln for bert)
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

FLAVORS = ("gpt2", "bert", "llama")


@dataclass
class ModelConfig:
    flavor: str = "gpt2"  # "gpt2" | "bert" | "llama"
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 2
    n_kv_head: int | None = None  # grouped-query attention (llama); None = n_head
    d_model: int = 64
    d_ff: int | None = None  # None = 4 · d_model
    max_seq_len: int = 512  # size of the position table (gpt2, bert) or the RoPE cache (llama)
    type_vocab_size: int = 2  # bert token types
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True  # head.weight is tok_emb.weight (LM head only)
    dropout: float = 0.0  # residual, embedding and attention dropout
    n_classes: int | None = None  # set: forward returns class logits from a fresh linear head
    pool: str = "mean"  # bert classifier pooling: "cls" or "mean"
    pad_token_id: int = 0
    extra: dict = field(default_factory=dict)  # provenance (source name) — not used by the math

    def __post_init__(self):
        if self.flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {self.flavor!r}; choose one of {', '.join(FLAVORS)}")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.d_ff = self.d_ff or 4 * self.d_model
        if self.d_model % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"d_model ({self.d_model}) must divide by n_head ({self.n_head}), "
                             f"and n_head by n_kv_head ({self.n_kv_head})")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', not {self.pool!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def causal(self) -> bool:
        return self.flavor != "bert"

    @property
    def bias(self) -> bool:
        return self.flavor != "llama"


class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair per layer, for incremental decoding.
    `forward(idx, cache=c)` appends the new tokens' keys/values and reads the old ones."""

    def __init__(self, n_layer: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0][0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.layers[layer] is not None:
            past_k, past_v = self.layers[layer]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


def rope_tables(head_dim: int, max_seq_len: int, theta: float):
    """cos/sin tables (max_seq_len, head_dim) for rotate-half rotary embeddings (Su et al. 2021)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (S, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, hd): both halves rotate by the same angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd) rotated pairwise: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), halves paired."""
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


def attention_with_dropout(q, k, v, mask, is_causal: bool, drop: Dropout) -> torch.Tensor:
    """softmax(q kᵀ / √hd + mask) v with dropout on the attention weights, written out: what
    F.scaled_dot_product_attention computes, whose CPU kernels have no dropout (with dropout_p > 0 it
    falls back to these same steps, drawing its mask the slow way). q (B, H, T, hd); k, v (B, Hkv, S, hd);
    mask: boolean (B or 1, 1, T, S), True = may attend. Returns (B, H, T, hd)."""
    if k.shape[1] != q.shape[1]:  # grouped-query: each key/value head serves H / Hkv query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, T, S)
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:  # added, not masked_fill: an addition keeps nothing for backward
        scores = scores + torch.zeros(mask.shape, dtype=scores.dtype, device=q.device).masked_fill_(
            ~mask, float("-inf"))
    return drop(scores.softmax(dim=-1)) @ v  # (B, H, T, hd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.d_model, cfg.head_dim
        self.q = nn.Linear(d, cfg.n_head * hd, bias=cfg.bias)
        self.k = nn.Linear(d, cfg.n_kv_head * hd, bias=cfg.bias)
        self.v = nn.Linear(d, cfg.n_kv_head * hd, bias=cfg.bias)
        self.o = nn.Linear(cfg.n_head * hd, d, bias=cfg.bias)
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
        if rope is not None:
            cos, sin = rope  # (T, hd) each, already offset to these tokens' positions
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.prefix is not None and (cache is None or cache.layers[layer_idx] is None):
            prefix_k, prefix_v = self.prefix(B)  # (B, Hkv, P, hd): keys/values of P virtual tokens
            k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, Hkv, T_past + T, hd)
        is_causal = mask is None and cfg.causal and k.shape[2] == T
        if self.training and cfg.dropout > 0:
            y = attention_with_dropout(q, k, v, mask, is_causal, self.attn_drop)  # (B, H, T, hd)
        else:  # one fused kernel (flash attention on CPU)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=cfg.n_kv_head != cfg.n_head)  # (B, H, T, hd)
        if self.adaption is not None:
            y = y + self.adaption(q, self.k, self.v)  # (B, H, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))  # (B, T, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.flavor = cfg.flavor
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        if cfg.flavor == "llama":
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        if self.flavor == "llama":
            return self.down(F.silu(self.gate(x)) * self.up(x))  # SwiGLU
        return self.down(F.gelu(self.up(x), approximate="tanh" if self.flavor == "gpt2" else "none"))


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.flavor == "llama":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = cfg.flavor != "bert"
        self.layer_idx = layer_idx
        self.ln1, self.attn = make_norm(cfg), Attention(cfg)
        self.ln2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x, mask=None, rope=None, cache=None):  # (B, T, d) -> (B, T, d)
        if self.pre_norm:
            x = x + self.drop(self.attn(self.ln1(x), mask, rope, cache, self.layer_idx))
            return x + self.drop(self.mlp(self.ln2(x)))
        x = self.ln1(x + self.drop(self.attn(x, mask, rope, cache, self.layer_idx)))
        return self.ln2(x + self.drop(self.mlp(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        if cfg.flavor in ("gpt2", "bert"):
            self.pos_emb = nn.Embedding(cfg.max_seq_len, d)
        if cfg.flavor == "bert":
            self.type_emb = nn.Embedding(cfg.type_vocab_size, d)
            self.emb_ln = nn.LayerNorm(d, eps=cfg.norm_eps)
        if cfg.flavor == "llama":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg) if cfg.flavor != "bert" else None
        self.apply(self._init_weights)  # the trunk first, so its weights do not depend on the head
        if cfg.n_classes:
            self.add_classifier(cfg.n_classes)
        else:
            self.head = nn.Linear(d, cfg.vocab_size, bias=False)
            self._init_weights(self.head)
            if cfg.tie_embeddings:
                self.head.weight = self.tok_emb.weight
        self.prompt = None  # methods/prompt.py: module inserting soft tokens into the embeddings (B, T, d)
        self.checkpointing = False  # recompute each block's activations in backward
        # set by mp.apply: {"method", "options", "base_fingerprint"}; None for a plain base model
        self.peft_config: dict | None = None

    def add_classifier(self, n_classes: int):
        """Replace the LM head by a fresh (n_classes × d_model) classifier head."""
        self.cfg.n_classes = n_classes
        self.head = nn.Linear(self.cfg.d_model, n_classes, device=self.tok_emb.weight.device)
        self._init_weights(self.head)
        return self

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
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

    def _attention_mask(self, attention_mask, T, past):
        """Boolean (B, 1, T, past + T) mask where True = may attend, or None when SDPA's own causal
        path (or no mask at all) gives the same answer. `past` keys (cached tokens or prefix virtual
        tokens) come before the T current ones and are always real."""
        cfg = self.cfg
        if attention_mask is None and (not cfg.causal or past == 0):
            return None
        total = past + T
        device = self.tok_emb.weight.device
        allowed = torch.ones(T, total, dtype=torch.bool, device=device)
        if cfg.causal:
            allowed = allowed.tril(diagonal=past)  # query i (position past+i) sees keys <= past+i
        allowed = allowed[None, None]  # (1, 1, T, total)
        if attention_mask is not None:
            keys_real = F.pad(attention_mask.bool(), (past, 0), value=True)[:, None, None, -total:]
            # a padding query would otherwise see no key at all (NaN); letting it see itself keeps
            # the row finite and changes no real token's output
            itself = torch.zeros(T, total, dtype=torch.bool, device=device)
            itself[torch.arange(T), past + torch.arange(T)] = True
            allowed = (allowed & keys_real) | itself  # (B, 1, T, total)
        return allowed

    def encode(self, idx, attention_mask=None, token_type_ids=None, cache: KVCache | None = None):
        """idx (B, T) token ids -> final hidden states (B, T, d_model)."""
        cfg = self.cfg
        x = self.tok_emb(idx)  # (B, T, d)
        first_call = cache is None or cache.length == 0
        with_prompt = self.prompt is not None and first_call
        if with_prompt:  # soft prompt tokens join the sequence: (B, P + T, d)
            x, attention_mask, token_type_ids = self.prompt.insert(x, attention_mask, token_type_ids)
        B, T, _ = x.shape
        past = self.prefix_length if first_call else cache.length  # keys before these tokens
        if past + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens (virtual tokens and cache included) is longer "
                             f"than the model's {cfg.max_seq_len}; use a shorter --max-len")
        positions = torch.arange(past, past + T, device=idx.device)  # (T,)
        rope = None
        if cfg.flavor in ("gpt2", "bert"):
            x = x + self.pos_emb(positions)
        if cfg.flavor == "bert":
            types = token_type_ids if token_type_ids is not None else torch.zeros(B, T, dtype=torch.long,
                                                                                 device=idx.device)
            x = self.emb_ln(x + self.type_emb(types))
        if cfg.flavor == "llama":
            rope = (self.rope_cos[positions], self.rope_sin[positions])  # (T, hd) each
        x = self.drop(x)
        mask = self._attention_mask(attention_mask, T, past)
        for block in self.blocks:
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

    def forward(self, idx, attention_mask=None, token_type_ids=None, cache: KVCache | None = None):
        """(B, T) -> LM logits (B, T, vocab), or class logits (B, n_classes) when cfg.n_classes."""
        hidden = self.encode(idx, attention_mask, token_type_ids, cache)
        if self.cfg.n_classes:
            return self.head(self.drop(self.pool(hidden, attention_mask)))
        return self.head(hidden)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, use_cache: bool = True, eos_id: int | None = None):
        """Greedy decoding. idx (1, T) -> (1, T + new). With the cache each step feeds one token."""
        if not self.cfg.causal or self.cfg.n_classes:
            raise ValueError("generate needs a causal LM (gpt2 or llama flavour, no classifier head)")
        cache = KVCache(self.cfg.n_layer) if use_cache else None
        step_input = idx
        for _ in range(max_new_tokens):
            if self.virtual_tokens + idx.shape[1] >= self.cfg.max_seq_len:
                break
            logits = self(step_input if use_cache else idx, cache=cache)  # (1, t, vocab)
            next_id = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            idx = torch.cat([idx, next_id], dim=1)
            step_input = next_id
            if eos_id is not None and next_id.item() == eos_id:
                break
        return idx

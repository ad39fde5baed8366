"""The transformer of every family: GPT-2, BERT, Llama, Gemma and the others are this one stack of blocks,
switched by `ModelConfig` (families.py: the switches and the table of families). The code reads switches,
never family names.

    idx (B, T) ──tok_emb (× √d: emb_scale)──┬─ + pos_emb (learned positions) + type_emb ─ emb_ln (emb_norm)
                                            │
                ┌───────────────────────────▼───────────────────────────┐  × n_layer
                │ attn: q k v (→ q_norm, k_norm) → RoPE → attention → o  │
                │ mlp:  up (and gate) → act → down                       │
                └───────────────────────────┬───────────────────────────┘
                             ln_f (pre-norm families) ── head: LM logits (B, T, vocab) or class logits
                                                         (pooled (B, d) ─ pooler, a trained encoder's ─ head)

    norm_place  pre:       x = x + attn(ln1(x));            x = x + mlp(ln2(x))
                post:      x = ln1(x + attn(x));            x = ln2(x + mlp(x))
                sandwich:  x = x + ln1_post(attn(ln1(x)));  x = x + ln2_post(mlp(ln2(x)))

Module names are the same in every family (`blocks[i].attn.{q,k,v,o}`, `blocks[i].mlp.{up,gate,down}`,
`blocks[i].{ln1,ln2}`, `tok_emb`, `pos_emb`, `ln_f`, `head` (and `pooler`); sandwich blocks add `ln1_post`, `ln2_post`,
qk_norm adds `attn.q_norm`, `attn.k_norm`), so a PEFT method that targets "q" finds the same projection in
all of them. PEFT methods never edit the math here: LoRA and adapters replace `nn.Linear` modules by name;
prefix tuning, LLaMA-Adapter and prompt tuning fill the slots `Attention.prefix`, `Attention.adaption` and
`Transformer.prompt` (None by default).

Parameters (gpt2/bert, d = d_model, f = d_ff, V = vocab, P = positions):
    V·d + P·d + n_layer·(4d² + 4d  +  2fd + f + d  +  4d) + 2d        (+ types and emb_ln for bert)
"""
import functools
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .families import (ACTIVATIONS, FAMILIES, FLAVORS, POOLERS, ROPE_SCALINGS,  # noqa: F401 (their home here too)
                       ModelConfig, check_n_classes)
from .kv_cache import KVCache
from .positions import apply_rope, attention_mask_for, rope_at, rope_tables, token_positions

IGNORE_INDEX = -100  # a label that counts in no loss (F.cross_entropy's ignore_index)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout (Srivastava et al. 2014): in training, zero each element with probability p and scale the others
    by 1/(1 - p); x itself in eval mode. A global, so that minipeft.fast.enable() can swap in its twin."""
    return F.dropout(x, p, training)


class Dropout(nn.Dropout):
    """nn.Dropout that calls `dropout` above."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


def attention(q, k, v, mask, is_causal: bool, scale: float, gqa: bool) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v in one fused kernel (flash attention on the CPU), shapes and mask as in
    attention_with_dropout; gqa: Hkv < H. A global, so that a ring can swap it (scale/precision.py, bf16)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)


def attention_with_dropout(q, k, v, mask, is_causal: bool, drop: Dropout, scale: float | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v with dropout on the attention weights, written out: the CPU kernels of
    F.scaled_dot_product_attention have no dropout (with dropout_p > 0 it falls back to these steps, its mask
    drawn by torch, not by `dropout`) and no soft-capping (Gemma 2's s -> tanh(s / softcap) · softcap, before
    the mask). q (B, H, T, hd); k, v (B, Hkv, S, hd); mask: boolean (B or 1, 1, T, S), True = may attend."""
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
    """LayerNorm (Ba et al. 2016) in the input's dtype, weight and bias cast to it: under bf16-mixed a trainable fp32
    bias (bitfit) meets a frozen bf16 weight. In fp32 the same as nn.LayerNorm (statistics are fp32 either way)."""

    def forward(self, x):
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 when it is narrower (bf16, fp16), else as it is: norms and the losses never compute below
    fp32, and compute in fp64 for an fp64 model."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.RMSNorm):
    """RMSNorm (Zhang & Sennrich 2019): x / rms(x) · w, normalized in fp32 (or wider) whatever x's dtype and
    cast back before the weight multiplies, as transformers' Llama does (in fp32 the same as nn.RMSNorm)."""

    def forward(self, x):
        return F.rms_norm(at_least_fp32(x), self.normalized_shape, None, self.eps).type_as(x) * self.weight


class OffsetRMSNorm(nn.RMSNorm):
    """Gemma's RMSNorm: x / rms(x) · (1 + w), with w = 0 at init, computed in fp32 (or wider) whatever x's
    dtype."""

    def reset_parameters(self):
        nn.init.zeros_(self.weight)

    def forward(self, x):
        wide = at_least_fp32(x)
        return F.rms_norm(wide, self.normalized_shape, 1 + self.weight.to(wide.dtype), self.eps).type_as(x)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The family's norm over the last `dim` (default d_model) features."""
    norm = {"layernorm": LayerNorm, "rmsnorm": RMSNorm, "rmsnorm+1": OffsetRMSNorm}[cfg.norm]
    return norm(dim or cfg.d_model, eps=cfg.norm_eps)


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
        self.prefix = None  # PEFT slot, prefix.py: callable(batch) -> key/value prefixes, each (B, Hkv, P, hd)
        self.adaption = None  # PEFT slot, llama_adapter.py: module(q, k_proj, v_proj) -> gated extra output

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
            # in the keys' dtype, as peft casts them: an fp32 table must not turn bf16 keys (and the cache) fp32
            k, v = torch.cat([prefix_k.to(k.dtype), k], dim=2), torch.cat([prefix_v.to(v.dtype), v], dim=2)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, Hkv, T_past + T, hd)
        is_causal = mask is None and cfg.causal and k.shape[2] == T
        if cfg.attn_softcap or (self.training and cfg.dropout > 0):
            y = attention_with_dropout(q, k, v, mask, is_causal, self.attn_drop, self.scale, cfg.attn_softcap)
        else:
            y = attention(q, k, v, mask, is_causal, self.scale, cfg.n_kv_head != cfg.n_head)  # (B, H, T, hd)
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


def init_weights(module: nn.Module):
    """GPT-2's init: the weights of linear layers and embeddings ~ N(0, 0.02²), biases 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def loss_targets(labels, shift_labels, causal: bool, reduction: str) -> torch.Tensor:
    """The targets (B, T) aligned with the inputs: shift_labels as given, or labels as transformers takes them
    (the inputs, −100 where no loss), shifted for a causal model: targets[:, t] = labels[:, t + 1], −100 at the
    end. A masked LM's labels are its targets."""
    if (labels is None) == (shift_labels is None):
        raise ValueError("give labels (the inputs, shifted inside) or shift_labels (already shifted), not both")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if shift_labels is not None or not causal:
        return labels if shift_labels is None else shift_labels
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def lm_loss(hidden, weight, labels=None, shift_labels=None, softcap=None, causal=True, reduction="mean"):
    """The LM loss over the N labelled tokens, as transformers computes it:

        loss = 1/N · Σ_i −log softmax(z_i)[t_i]      over the tokens i whose target t_i ≠ −100
        z_i = h_i Wᵀ                                  (V,) the head's logits (no bias), in fp32 or wider
        z_i ← c · tanh(z_i / c)                       Gemma 2's final soft-cap c (cfg.final_softcap)

    hidden (B, T, d); weight (V, d) the LM head's. reduction "sum": the summed loss; "none": each token's (B, T),
    0 where unlabelled (a row's sum is minus its log-probability, what DPO needs). A mean over no labelled token
    is nan, as in transformers. A global: minipeft.fast.enable() swaps in a tiled twin (no whole logits)."""
    targets = loss_targets(labels, shift_labels, causal, reduction)  # (B, T)
    logits = at_least_fp32(F.linear(hidden, weight))  # (B, T, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def last_real(idx, attention_mask, pad_token_id: int) -> torch.Tensor:
    """(B,) the index of each row's rightmost token that is neither masked out nor the pad id, 0 if none: the
    token a causal classifier reads. transformers' …ForSequenceClassification takes the rightmost token that
    is not pad_token_id (so left and right padding both work, and a text ending in the pad id, as when pad =
    eos, is read before it); the mask is read too, since our batches may pad with another id."""
    real = (attention_mask != 0) & (idx != pad_token_id)  # (B, T)
    positions = torch.arange(idx.shape[1], device=idx.device)
    return (positions * real).argmax(-1)


def in_compute_context(forward):
    """Run a forward method inside the model's `compute_context(model, device)` when one is set (the precision
    ring sets one that autocasts), on the device of the token ids; without one, as written."""
    @functools.wraps(forward)
    def run(self, idx, *args, **kwargs):
        with nullcontext() if self.compute_context is None else self.compute_context(self, idx.device):
            return forward(self, idx, *args, **kwargs)
    return run


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        if cfg.positions == "learned":
            self.pos_emb = nn.Embedding(cfg.pos_offset + cfg.max_seq_len, d)
        if cfg.type_vocab_size:
            self.type_emb = nn.Embedding(cfg.type_vocab_size, d)
        if cfg.emb_norm:
            self.emb_ln = make_norm(cfg)
        self.reset_buffers()
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg) if cfg.norm_place != "post" else None
        self.apply(init_weights)  # the trunk first, so its weights do not depend on the head
        if cfg.pooler != "none":  # a fine-tuned encoder classifier's dense layer (B, d) -> (B, d): families.py
            self.pooler = nn.Linear(d, d)
            init_weights(self.pooler)
        if cfg.n_classes:
            self.add_classifier(cfg.n_classes)
        else:
            self.head = nn.Linear(d, cfg.vocab_size, bias=False)
            init_weights(self.head)
            if cfg.tie_embeddings:
                self.head.weight = self.tok_emb.weight
        self.prompt = None  # prompt.py: module inserting soft tokens into the embeddings (B, T, d)
        self.adapters = None  # extras/multi.py: adapters side by side, routed per row by adapter_names
        self.checkpointing = False  # recompute each block's activations in backward
        self.peft_config: dict | None = None  # set by mp.apply: {"method", "options", "base_fingerprint"}
        self.precision = "fp32"  # scale/precision.py: the name of the precision the weights are cast for
        self.compute_context = None  # scale/precision.py: (model, device) -> the context forward runs in

    def reset_buffers(self):
        """Compute the buffers no checkpoint holds, the RoPE tables (max_seq_len, rotary_dim): at build time, and
        again once a loader (formats/pretrained.py) has put a checkpoint's weights in."""
        cfg = self.cfg
        tables = {"rope": (cfg.rope_theta, cfg.rope_scaling)} if cfg.positions == "rope" else {}
        if cfg.positions == "rope" and cfg.rope_local_theta:  # sliding layers' own RoPE (Gemma 3)
            tables["rope_local"] = (cfg.rope_local_theta, None)
        for name, (theta, scaling) in tables.items():
            cos, sin = rope_tables(cfg.rotary_dim, cfg.max_seq_len, theta, scaling)
            self.register_buffer(f"{name}_cos", cos, persistent=False)
            self.register_buffer(f"{name}_sin", sin, persistent=False)

    def add_classifier(self, n_classes: int):
        """Replace the LM head (or a classifier head) by a fresh (n_classes × d_model) classifier head, in fp32 (it
        trains). A pooler stays: like transformers' ignore_mismatched_sizes, only the last layer is new."""
        self.cfg.n_classes = n_classes = check_n_classes(n_classes)
        self.head = nn.Linear(self.cfg.d_model, n_classes, device=self.tok_emb.weight.device)
        init_weights(self.head)
        return self

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

    def embed(self, idx, attention_mask, token_type_ids, position_ids, past: int, with_prompt: bool):
        """idx (B, T) -> the first block's input (B, T', d), the padding mask and each token's position ((T',) or
        (B, T')); T' = T, plus the soft prompt's tokens when with_prompt. `past`: keys before."""
        cfg = self.cfg
        x = self.tok_emb(idx)  # (B, T, d)
        if cfg.emb_scale:  # Gemma: × √d_model, in the embedding's dtype
            x = x * torch.tensor(cfg.d_model ** 0.5, dtype=x.dtype)
        if with_prompt:  # soft prompt tokens join the sequence: (B, P + T, d)
            x, attention_mask, token_type_ids = self.prompt.insert(x, attention_mask, token_type_ids)
        B, T, _ = x.shape
        if past + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens (virtual tokens and cache included) is longer "
                             f"than the model's {cfg.max_seq_len}; use a shorter --max-len")
        positions = token_positions(self, idx, past, T, position_ids, with_prompt)  # (T,) or (B, T)
        if cfg.positions == "learned":
            x = x + self.pos_emb(positions + cfg.pos_offset)
        if cfg.type_vocab_size:
            types = token_type_ids if token_type_ids is not None else torch.zeros(B, T, dtype=torch.long,
                                                                                 device=idx.device)
            x = x + self.type_emb(types)
        return self.drop(self.emb_ln(x) if cfg.emb_norm else x), attention_mask, positions

    @in_compute_context
    def encode(self, idx, attention_mask=None, token_type_ids=None, cache: KVCache | None = None,
               position_ids=None, document_ids=None, adapter_names=None):
        """idx (B, T) token ids -> final hidden states (B, T, d_model). position_ids (B, T): each token's position
        (default 0, 1, ... after the cache); document_ids (B, T): packed rows, a token attends only within its
        document; adapter_names: the adapter each row runs (extras/multi.py)."""
        if self.adapters is not None:
            self.adapters.route(adapter_names, idx)
        elif adapter_names is not None:
            raise ValueError("adapter_names needs adapters loaded side by side: mp.load_adapter(model, path, name=...)")
        first_call = cache is None or cache.length == 0
        with_prompt = self.prompt is not None and first_call
        past = self.prefix_length if first_call else cache.length  # keys before these tokens
        x, attention_mask, positions = self.embed(idx, attention_mask, token_type_ids, position_ids, past,
                                                  with_prompt)  # (B, T, d)
        windows = {block.window for block in self.blocks}  # None (full attention) and/or the sliding window
        masks = {w: attention_mask_for(self.cfg, attention_mask, x.shape[1], past, w, document_ids, x.device)
                 for w in windows}
        ropes = {w: rope_at(self, positions, w) for w in windows}
        for block in self.blocks:
            mask, rope = masks[block.window], ropes[block.window]
            if self.checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                # keep only the block's input; backward reruns the block (non-reentrant: fine when x needs no
                # grad) with the RNG state restored, so dropout draws the same masks again. Never with a KV
                # cache: the rerun would append its keys/values a second time.
                x = checkpoint(block, x, mask, rope, None, use_reentrant=False, preserve_rng_state=True)
            else:
                x = block(x, mask, rope, cache)
        x = self.ln_f(x) if self.ln_f is not None else x  # (B, T, d)
        return self.prompt.remove(x) if with_prompt else x  # shapes never change: (B, T_in, d)

    def pool(self, hidden, idx, attention_mask=None):
        """(B, T, d) -> (B, d): [CLS] or mean of real tokens (bert), last real token (causal: `last_real`)."""
        B, T, _ = hidden.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=hidden.device)
        if not self.cfg.causal and self.cfg.pool == "cls":
            return hidden[:, 0]
        if not self.cfg.causal:
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return hidden[torch.arange(B, device=hidden.device), last_real(idx, attention_mask, self.cfg.pad_token_id)]

    def classify(self, pooled):
        """(B, d) pooled states -> (B, n_classes) class logits, as the family's …ForSequenceClassification computes
        them (families.py: the poolers): a trained encoder's pooler first, then dropout before an encoder's head;
        a decoder's head (transformers' `score`) reads the state as it is."""
        pooler = self.cfg.pooler
        if pooler == "drop_dense_tanh":  # RoBERTa drops out before its dense layer too
            pooled = self.drop(pooled)
        if pooler != "none":
            pooled = POOLERS[pooler](self.pooler(pooled))  # (B, d)
        return self.head(pooled if self.cfg.causal else self.drop(pooled))

    @in_compute_context
    def forward(self, idx, attention_mask=None, token_type_ids=None, cache: KVCache | None = None,
                position_ids=None, document_ids=None, adapter_names=None, labels=None, shift_labels=None,
                reduction="mean"):
        """(B, T) -> LM logits (B, T, vocab), or class logits (B, n_classes) when cfg.n_classes; with labels or
        shift_labels, the LM loss instead (`lm_loss`, which says how `reduction` works). The rest are encode's."""
        hidden = self.encode(idx, attention_mask, token_type_ids, cache, position_ids, document_ids, adapter_names)
        if self.cfg.n_classes and (labels is not None or shift_labels is not None):
            raise ValueError("labels are for the LM head; compute a classifier's loss from its logits model(idx) as "
                             "transformers does: F.cross_entropy for class ids, F.mse_loss for one label (regression), "
                             "F.binary_cross_entropy_with_logits for multi-label 0/1 rows")
        if self.cfg.n_classes:
            return self.classify(self.pool(hidden, idx, attention_mask))
        if labels is not None or shift_labels is not None:
            return lm_loss(hidden, self.head.weight, labels=labels, shift_labels=shift_labels,
                           softcap=self.cfg.final_softcap, causal=self.cfg.causal, reduction=reduction)
        logits = self.head(hidden)  # (B, T, vocab)
        if self.cfg.final_softcap:  # Gemma 2: z -> tanh(z / c) · c
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, use_cache: bool = True, eos_id: int | None = None):
        """Greedy decoding, idx (B, T) -> (B, T + new); sampling, stop strings and ragged batches: generate.py."""
        from .generate import greedy
        return greedy(self, idx, max_new_tokens, use_cache, eos_id)

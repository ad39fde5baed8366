"""llama.cpp's GGUF files as our `Transformer`: the metadata -> ModelConfig, llama.cpp's tensor names ->
ours, and the two ways its converter changed the tensors, undone here.

    model, tokenizer = from_pretrained("path/to/model.gguf")   # pretrained.py calls load_gguf

    GGUF    token_embd -> tok_emb;  blk.i.attn_norm, ffn_norm -> ln1, ln2;
            blk.i.attn_{q,k,v,output} -> q, k, v, o;  ffn_{gate,up,down} -> gate, up, down;
            attn_{q,k}_norm -> q_norm, k_norm;  post_attention_norm, post_ffw_norm -> ln1_post, ln2_post;
            output_norm -> ln_f;  output -> head

llama.cpp's converter reorders the rows of each q and k head of Llama models for its interleaved RoPE
(pairs (0,1), (2,3), ...); our rotate-half RoPE pairs row j with j+hd/2, so `unpermute_rope_rows` puts
them back (transformers' own GGUF loader does the same). Its Gemma converter stores every RMSNorm weight
as 1 + w (llama.cpp multiplies by the weight), so we subtract the 1 again. Tensors are dequantized by
gguf-py (gguf_file.py); the tokenizer is rebuilt from the file (tokenization.gguf_tokenizer).
"""
from pathlib import Path

import torch
from tokenizers import Tokenizer

from minipeft.core.model import Transformer

from .gguf_file import GGUFFile
from .weights import Rule, build_model, load_weights
from .tokenization import gguf_tokenizer

GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}


def minus_one(w, cfg):  # llama.cpp's Gemma norms hold 1 + w
    return w - 1


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order. Per head, llama.cpp stores rows as pairs (r0, r_hd/2),
    (r1, r_hd/2+1), ... next to each other (its RoPE rotates adjacent pairs); we rotate row j with
    j + hd/2, so rows (h, hd/2, 2, d) go back to (h, 2, hd/2, d)."""
    out_features, d = w.shape
    head_dim = out_features // n_heads
    return w.view(n_heads, head_dim // 2, 2, d).transpose(1, 2).reshape(out_features, d)


def gguf_q(w, cfg):
    return unpermute_rope_rows(w, cfg.n_head)


def gguf_k(w, cfg):
    return unpermute_rope_rows(w, cfg.n_kv_head)


def gguf_rules(architecture: str) -> list[Rule]:
    """llama.cpp's tensor names -> ours. Llama files have q/k rows permuted, Gemma files 1 + w norms."""
    q, k = (gguf_q, gguf_k) if architecture == "llama" else (None, None)
    norm = minus_one if architecture.startswith("gemma") else None
    return [
        ("token_embd.weight", "tok_emb.weight", None),
        ("blk.{i}.attn_norm.weight", "blocks.{i}.ln1.weight", norm),
        ("blk.{i}.attn_q.weight", "blocks.{i}.attn.q.weight", q),
        ("blk.{i}.attn_k.weight", "blocks.{i}.attn.k.weight", k),
        ("blk.{i}.attn_v.weight", "blocks.{i}.attn.v.weight", None),
        *[(f"blk.{{i}}.attn_{t}.bias", f"blocks.{{i}}.attn.{t}.bias", None) for t in "qkv"],  # Qwen2
        ("blk.{i}.attn_output.weight", "blocks.{i}.attn.o.weight", None),
        ("blk.{i}.attn_q_norm.weight", "blocks.{i}.attn.q_norm.weight", norm),
        ("blk.{i}.attn_k_norm.weight", "blocks.{i}.attn.k_norm.weight", norm),
        ("blk.{i}.post_attention_norm.weight", "blocks.{i}.ln1_post.weight", norm),
        ("blk.{i}.ffn_norm.weight", "blocks.{i}.ln2.weight", norm),
        ("blk.{i}.ffn_gate.weight", "blocks.{i}.mlp.gate.weight", None),
        ("blk.{i}.ffn_up.weight", "blocks.{i}.mlp.up.weight", None),
        ("blk.{i}.ffn_down.weight", "blocks.{i}.mlp.down.weight", None),
        ("blk.{i}.post_ffw_norm.weight", "blocks.{i}.ln2_post.weight", norm),
        ("output_norm.weight", "ln_f.weight", norm),
        ("output.weight", "head.weight", None),
    ]


_REQUIRED = object()  # meta(key) without a default: the key must be in the file


def load_gguf(path: Path, overrides: dict, source: str) -> tuple[Transformer, Tokenizer]:
    gguf = GGUFFile(path)
    architecture = gguf.metadata.get("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {architecture!r} is not supported; "
                         f"supported: {', '.join(GGUF_ARCHITECTURES)}")
    meta = gguf.metadata
    model = build_model(gguf_config(meta, architecture, gguf.tensor_names, path), overrides, source)
    model.cfg.extra.update(bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                           eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))
    tokenizer = gguf_tokenizer(meta, path)
    tokens = meta["tokenizer.ggml.tokens"]
    tokenizer.chat_template = meta.get("tokenizer.chat_template")  # jinja2 text that chat.py renders
    for name in ("bos", "eos"):  # the special tokens a chat template writes
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        setattr(tokenizer, f"{name}_token", tokens[token_id] if token_id is not None else None)
    # the vocabulary's Python lists (Gemma 3: 262,144 tokens, scores and types) are in the tokenizer
    # now; dropped before the weights arrive, they do not add to loading's peak
    for key in [k for k in meta if k.startswith("tokenizer.ggml.") and isinstance(meta[k], list)]:
        del meta[key]
    del tokens
    load_weights(model, gguf.dequantized(), gguf_rules(architecture), [], source)
    return model, tokenizer


PARTIAL_ROPE = ("gemma3",)  # llama.cpp's architectures that apply RoPE to part of each head (the others refuse)


def gguf_config(meta: dict, architecture: str, tensor_names: list[str], path: Path) -> dict:
    """ModelConfig fields from the metadata, which llama.cpp names `<architecture>.<key>`."""
    def get(key, default=_REQUIRED):
        full = key if key.startswith("tokenizer.") else f"{architecture}.{key}"
        if full not in meta and default is _REQUIRED:
            raise ValueError(f"{path}: metadata {full} is missing")
        return meta.get(full, default)

    if get("rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: RoPE scaling is not supported; only the default (unscaled) RoPE is")
    n_head, d_model = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", d_model // n_head)
    if architecture not in PARTIAL_ROPE and get("rope.dimension_count", head_dim) != head_dim:  # as llama.cpp
        raise ValueError(f"{path}: rope.dimension_count {get('rope.dimension_count')} is not the head size "
                         f"{head_dim}; {architecture} applies RoPE to whole heads")
    config = dict(
        flavor=GGUF_ARCHITECTURES[architecture], vocab_size=len(get("tokenizer.ggml.tokens")),
        n_layer=get("block_count"), n_head=n_head, n_kv_head=get("attention.head_count_kv", n_head),
        d_model=d_model, d_ff=get("feed_forward_length"), head_dim=head_dim,
        rope_fraction=get("rope.dimension_count", head_dim) / head_dim, max_seq_len=get("context_length"),
        norm_eps=get("attention.layer_norm_rms_epsilon"), rope_theta=get("rope.freq_base", 10000.0),
        tie_embeddings="output.weight" not in tensor_names,  # no output.weight: the head is tok_emb
        pad_token_id=get("tokenizer.ggml.padding_token_id", 0))
    if architecture == "gemma3":  # llama.cpp's Gemma 3: every 6th layer full, local RoPE base 10k
        pattern = get("attention.sliding_window_pattern", 6)
        config.update(sliding_window=get("attention.sliding_window"), rope_local_theta=get("rope.freq_base_swa", 1e4),
                      layer_pattern="".join("S" if s else "F" for s in pattern) if isinstance(pattern, list)
                      else "S" * (pattern - 1) + "F")
    return config

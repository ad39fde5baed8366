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
as 1 + w (llama.cpp multiplies by the weight), so we subtract the 1 again. Llama 3's RoPE scaling has no
metadata key: the converter stores the divisor of each RoPE speed (rope_freqs), read back into the
scaling's parameters here. Tensors are dequantized by
gguf-py (gguf_file.py); the tokenizer is rebuilt from the file (tokenization.gguf_tokenizer).
"""
import math
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from minipeft.core.model import Transformer
from minipeft.core.positions import rope_inv_freq

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
    rope_freqs = gguf.read_dequantized(ROPE_FREQS) if ROPE_FREQS in gguf.tensor_names else None
    model = build_model(gguf_config(meta, architecture, gguf.tensor_names, path, rope_freqs), overrides, source)
    model.cfg.extra.update(bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                           eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))
    tokenizer = gguf_tokenizer(meta, path)
    tokenizer.chat_template = meta.get("tokenizer.chat_template")  # jinja2 text that chat.py renders
    # the vocabulary's Python lists (Gemma 3: 262,144 tokens, scores and types) are in the tokenizer
    # now; dropped before the weights arrive, they do not add to loading's peak
    for key in [k for k in meta if k.startswith("tokenizer.ggml.") and isinstance(meta[k], list)]:
        del meta[key]
    load_weights(model, gguf.dequantized(), gguf_rules(architecture), [re.escape(ROPE_FREQS)], source)
    return model, tokenizer


PARTIAL_ROPE = ("gemma3",)  # llama.cpp's architectures that apply RoPE to part of each head (the others refuse)
ROPE_FREQS = "rope_freqs.weight"  # Llama 3's RoPE scaling as llama.cpp's converter stores it: a divisor per speed


def gguf_config(meta: dict, architecture: str, tensor_names: list[str], path: Path,
                rope_freqs: torch.Tensor | None = None) -> dict:
    """ModelConfig fields from the metadata, which llama.cpp names `<architecture>.<key>`, and the file's
    rope_freqs tensor if it has one."""
    def get(key, default=_REQUIRED):
        full = key if key.startswith("tokenizer.") else f"{architecture}.{key}"
        if full not in meta and default is _REQUIRED:
            raise ValueError(f"{path}: metadata {full} is missing")
        return meta.get(full, default)

    n_head, d_model = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", d_model // n_head)
    if architecture not in PARTIAL_ROPE and get("rope.dimension_count", head_dim) != head_dim:  # as llama.cpp
        raise ValueError(f"{path}: rope.dimension_count {get('rope.dimension_count')} is not the head size "
                         f"{head_dim}; {architecture} applies RoPE to whole heads")
    if get("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{path}: attention.value_length {get('attention.value_length')} is not attention.key_length "
                         f"{head_dim}; minipeft's heads have one size")
    if not get("attention.causal", True):
        raise ValueError(f"{path}: attention.causal is false (every token sees the tokens after it); minipeft's "
                         f"{architecture} attends to the tokens before only")
    rotary_dim, theta = get("rope.dimension_count", head_dim), get("rope.freq_base", 10000.0)
    config = dict(
        flavor=GGUF_ARCHITECTURES[architecture], vocab_size=len(get("tokenizer.ggml.tokens")),
        n_layer=get("block_count"), n_head=n_head, n_kv_head=get("attention.head_count_kv", n_head),
        d_model=d_model, d_ff=get("feed_forward_length"), head_dim=head_dim, rope_fraction=rotary_dim / head_dim,
        max_seq_len=get("context_length"), norm_eps=get("attention.layer_norm_rms_epsilon"), rope_theta=theta,
        rope_scaling=gguf_rope_scaling(get, architecture, rope_freqs, rotary_dim, theta, path),
        tie_embeddings="output.weight" not in tensor_names,  # no output.weight: the head is tok_emb
        pad_token_id=get("tokenizer.ggml.padding_token_id", 0))
    if architecture == "gemma3":  # llama.cpp's Gemma 3: every 6th layer full, local RoPE base 10k, no soft-cap
        pattern = get("attention.sliding_window_pattern", 6)
        config.update(sliding_window=get("attention.sliding_window"), rope_local_theta=get("rope.freq_base_swa", 1e4),
                      layer_pattern="".join("S" if s else "F" for s in pattern) if isinstance(pattern, list)
                      else "S" * (pattern - 1) + "F", final_softcap=get("final_logit_softcapping", None))
    return config


def gguf_rope_scaling(get, architecture: str, rope_freqs: torch.Tensor | None, rotary_dim: int, theta: float,
                      path: Path) -> dict | None:
    """rope_scaling from rope.scaling.type (linear: every speed divided by rope.scaling.factor; in Gemma 3 the
    full layers' only, as ours) or, in a llama file, from its rope_freqs tensor (Llama 3's)."""
    kind = get("rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise ValueError(f"{path}: RoPE scaling {kind!r} is not supported; supported: linear, and Llama 3's")
    if kind == "linear":
        return {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    if rope_freqs is None:
        return None
    if architecture != "llama":  # llama.cpp reads the tensor in llama files only
        raise ValueError(f"{path}: a {architecture} file with {ROPE_FREQS} is not one llama.cpp's converter writes")
    return llama3_scaling(rope_freqs.float(), rotary_dim, theta, path)


def llama3_scaling(divisors: torch.Tensor, rotary_dim: int, theta: float, path: Path) -> dict | None:
    """Llama 3's rope_scaling back from the divisor of each RoPE speed (rotary_dim/2,). Llama 3 divides the
    fast speeds by 1, the slow ones by `factor` and those between by 1/((1 - s)/factor + s), where
    s = (original/wavelength - low)/(high - low) falls linearly in 1/wavelength from 1 to 0. Only the line
    s = a/wavelength + b shows in the divisors: with low = 1, high = 1 - 1/b and original = -a/b (any other
    low gives the same divisors with another high and original). The line is fitted through the speeds
    between; the check at the end makes sure the result divides every speed as the file does."""
    if divisors.shape != (rotary_dim // 2,):
        raise ValueError(f"{path}: {ROPE_FREQS} has shape {tuple(divisors.shape)}, and RoPE turns {rotary_dim // 2} "
                         "pairs of each head")
    factor = divisors.max().item()
    if factor == 1:
        return None
    if (divisors == factor).all():
        return {"rope_type": "linear", "factor": factor}
    x = rope_inv_freq(rotary_dim, theta).double() / (2 * math.pi)  # 1 / wavelength, falling with the index
    s = (1 / divisors.double() - 1 / factor) / (1 - 1 / factor)  # 1: fast, 0: slow
    between, fast, slow = (s > 1e-6) & (s < 1 - 1e-6), x[s >= 1 - 1e-6], x[s <= 1e-6]
    if between.sum() >= 2:
        a, b = torch.linalg.lstsq(torch.stack([x[between], torch.ones_like(x[between])], 1), s[between, None]).solution
    else:  # one speed between or none: of the lines through it (or the last fast speed) that keep the slow
        # speeds at s <= 0 and the fast ones at s >= 1, the least steep
        xm, sm = (x[between][0], s[between][0]) if between.any() else (fast[-1], 1.0)
        a = sm / (xm - slow[0])
        if between.any() and len(fast):
            a = max(a, (1 - sm) / (fast[-1] - xm))
        b = sm - a * xm
    a, b = float(a), float(b)
    high, original = 1 - 1 / b, -a / b  # low = 1 (b < 0 for a line falling from fast to slow)
    speeds = rope_inv_freq(rotary_dim, theta) / divisors  # the file's
    for high, original in ((round(high, 4), round(original)), (high, original)) if b < 0 else ():  # round if exact
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
                   "original_max_position_embeddings": original}
        if torch.allclose(rope_inv_freq(rotary_dim, theta, scaling), speeds, rtol=1e-5, atol=0):
            return scaling
    raise ValueError(f"{path}: {ROPE_FREQS} divides RoPE's speeds otherwise than Llama 3's scaling, the only "
                     "scaling minipeft reads from it")

"""A model as one GGUF file llama.cpp runs (format "gguf"), written with the `gguf` package:

    general.architecture   llama, qwen2, qwen3 or gemma3 (the architectures pretrained.py reads back)
    <arch>.*               sizes, RoPE base and linear scaling, norm epsilon; Gemma 3 its sliding window,
                           which layers slide, the sliding layers' RoPE base and its final soft-cap
    tokenizer.*            the vocabulary, and the chat template minipeft renders conversations with
    tensors                llama.cpp's names: pretrained.py's GGUF rules read backwards

The tensors, as llama.cpp's own converter (convert_hf_to_gguf.py) lays them out:

    Llama q, k     each head's rows reordered for llama.cpp's RoPE, which rotates adjacent pairs
                   (r0, r1), (r2, r3), ...: row j of the first half goes to 2j, row j of the second half
                   to 2j + 1 (the inverse of gguf_model.unpermute_rope_rows)
    Gemma norms    stored as 1 + w (llama.cpp multiplies by the weight; Gemma computes x · (1 + w))
    a tied head    no output.weight: llama.cpp reads token_embd for it
    Llama 3 RoPE   rope_freqs: the divisor of each RoPE speed (Llama 3's scaling has no metadata key)

dtype: fp32, fp16, bf16 or q8_0 for the matrices (q8_0: blocks of 32 values, one fp16 scale each; a
matrix whose rows do not divide into blocks falls back to fp16); norms and biases stay fp32, as
llama.cpp's converter keeps them.

The vocabulary: a model loaded from a GGUF file gets that file's tokenizer.* metadata back as it was
(read again from the file); a byte-level BPE tokenizer (tokenizer.json: GPT-2, SmolLM2, Qwen, the tiny
models) is written as llama.cpp's "gpt2" vocabulary, its tokens, merges and pre-tokenizer. Before any
tensor is written, the metadata is read back with pretrained.py's own GGUF reader: a setting the
architecture cannot express stops the export with its name.
"""
import json
from pathlib import Path

import torch

from minipeft.core.model import ModelConfig
from minipeft.core.positions import rope_inv_freq
from minipeft.formats import chat
from minipeft.formats.assets import asset_path
from minipeft.formats.gguf_file import GGUFFile
from minipeft.formats.gguf_model import (GGUF_ARCHITECTURES, PARTIAL_ROPE, ROPE_FREQS, gguf_config, gguf_k, gguf_q,
                                         gguf_rules, minus_one)
from minipeft.formats.pretrained import ASSET_MODELS
from minipeft.formats.tokenization import QWEN2_SPLIT
from .hf import check_config_holds, hf_config, unheld

ARCHITECTURES = {family: arch for arch, family in GGUF_ARCHITECTURES.items()}  # our family -> llama.cpp's
GGUF_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
FILE_TYPES = {"fp32": "ALL_F32", "fp16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Our rotate-half q/k rows -> llama.cpp's adjacent pairs: rows (h, 2, hd/2, d) -> (h, hd/2, 2, d)."""
    out_features, d = w.shape[0], w.shape[1:]
    head_dim = out_features // n_heads
    return w.view(n_heads, 2, head_dim // 2, *d).transpose(1, 2).reshape(w.shape)


# each GGUF rule's transform (llama.cpp -> ours) and its inverse (ours -> llama.cpp)
INVERSES = {
    None: lambda w, cfg: w,
    gguf_q: lambda w, cfg: permute_rope_rows(w, cfg.n_head),
    gguf_k: lambda w, cfg: permute_rope_rows(w, cfg.n_kv_head),
    minus_one: lambda w, cfg: w + 1,
}


def rope_type(cfg) -> str | None:
    """The model's RoPE scaling ("linear", "llama3"), None if unscaled."""
    return (cfg.rope_scaling or {}).get("rope_type")


def rope_speeds(cfg) -> torch.Tensor:
    return rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)


def architecture(cfg, fmt: str) -> str:
    """llama.cpp's architecture for the model; a ValueError for a model llama.cpp cannot run (another family,
    a classifier, RoPE on part of each head but in Gemma 3, Llama 3's RoPE scaling but in Llama, Gemma 3
    without sliding layers), naming what can hold it."""
    if cfg.flavor not in ARCHITECTURES:
        raise ValueError(f"format {fmt!r} holds {', '.join(ARCHITECTURES)} models (the GGUF architectures minipeft "
                         f"reads back), not {cfg.flavor}; export it with format 'hf' (llama.cpp's "
                         "convert_hf_to_gguf.py converts that folder for many more)")
    if cfg.n_classes:
        raise ValueError(f"llama.cpp runs language models, and this one has a classifier head; format {fmt!r} "
                         "cannot hold it (format 'hf' can, for decoder families)")
    arch = ARCHITECTURES[cfg.flavor]
    if cfg.rope_fraction != 1 and arch not in PARTIAL_ROPE:
        raise ValueError(f"llama.cpp's {arch} applies RoPE to whole heads, and this model to {cfg.rope_fraction:g} "
                         f"of each; format {fmt!r} cannot hold it")
    if rope_type(cfg) == "llama3" and arch != "llama":
        raise ValueError(f"llama.cpp reads Llama 3's RoPE scaling in llama files only, and this is a {arch} model; "
                         f"format {fmt!r} cannot hold it, format 'hf' can")
    if arch == "gemma3" and not any(cfg.window(i) for i in range(cfg.n_layer)):
        raise ValueError(f"llama.cpp's gemma3 needs layers with a sliding window (it stops the program without "
                         f"one), and this model has none; format {fmt!r} cannot hold it, format 'hf' can")
    return arch


def gguf_names(cfg) -> dict[str, tuple[str, object]]:
    """Our parameter name -> (llama.cpp's tensor name, the rule's transform: llama.cpp's layout -> ours,
    None for none), for every name the architecture's rules cover."""
    names = {}
    for theirs, ours, transform in gguf_rules(ARCHITECTURES[cfg.flavor]):
        for i in range(cfg.n_layer) if "{i}" in theirs else [None]:
            names[ours.format(i=i)] = (theirs.format(i=i), transform)
    return names


def to_gguf(transform, w: torch.Tensor, cfg) -> torch.Tensor:
    """Our tensor in llama.cpp's layout: the inverse of the rule's transform."""
    return INVERSES[transform](w, cfg)


# ---------------------------------------------------------------------------------------------
# metadata: (key, value, value type, item type) rows, written and read back from the same list


def _value_type(value):
    """The GGUF value type (and item type, for arrays) of a metadata value read by GGUFFile."""
    import gguf
    t = gguf.GGUFValueType
    kinds = {bool: t.BOOL, int: t.UINT32, float: t.FLOAT32, str: t.STRING}
    if isinstance(value, list):
        items = {type(v) for v in value} or {str}
        kind = t.FLOAT32 if float in items else t.INT32 if items == {int} else kinds[items.pop()]
        return t.ARRAY, kind
    return kinds[type(value)], None


def architecture_metadata(cfg, arch: str) -> dict:
    """<arch>.* keys for the model's config, as llama.cpp's converter writes them."""
    meta = {"block_count": cfg.n_layer, "context_length": cfg.max_seq_len, "embedding_length": cfg.d_model,
            "feed_forward_length": cfg.d_ff, "attention.head_count": cfg.n_head,
            "attention.head_count_kv": cfg.n_kv_head, "attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
            "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
            "rope.dimension_count": cfg.rotary_dim, "rope.freq_base": float(cfg.rope_theta),
            "vocab_size": cfg.vocab_size}
    if rope_type(cfg) == "linear":  # Llama 3's is the rope_freqs tensor
        meta.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(cfg.rope_scaling["factor"])})
    if arch == "gemma3":  # some layer slides: architecture() refuses a Gemma 3 without
        meta.update({"attention.sliding_window": cfg.sliding_window,
                     "attention.sliding_window_pattern": [cfg.window(i) is not None for i in range(cfg.n_layer)],
                     "rope.freq_base_swa": float(cfg.rope_local_theta or cfg.rope_theta)})
        if cfg.final_softcap:
            meta["final_logit_softcapping"] = float(cfg.final_softcap)
    return {f"{arch}.{key}": value for key, value in meta.items()}


def source_gguf(cfg) -> Path | None:
    """The GGUF file the model was loaded from, if it was."""
    source = cfg.extra.get("source")
    if source in ASSET_MODELS:
        source = asset_path(source)
    return Path(source) if source and str(source).endswith(".gguf") and Path(source).is_file() else None


def tokenizer_metadata(cfg, tokenizer, chat_template=None) -> dict:
    """tokenizer.* keys: the source GGUF file's own, else built from a byte-level BPE tokenizer."""
    source = source_gguf(cfg)
    if source is not None:
        meta = {k: v for k, v in GGUFFile(source).metadata.items() if k.startswith("tokenizer.")}
    elif tokenizer:
        meta = byte_level_vocabulary(tokenizer, cfg)
    else:
        raise ValueError("format 'gguf' needs the tokenizer (llama.cpp keeps the vocabulary in the file); pass "
                         "tokenizer=, the second value from_pretrained returns")
    if tokenizer:
        meta["tokenizer.chat_template"] = chat.chat_format(tokenizer, chat_template).template
    return meta


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a tokenizer.json pre-tokenizer minipeft builds."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = [p.get("type") for p in (pre or {}).get("pretokenizers", [])]
    if parts == ["Digits", "ByteLevel"]:
        return "smollm"
    if parts == ["Split", "ByteLevel"] and pre["pretokenizers"][0].get("pattern", {}).get("Regex") == QWEN2_SPLIT:
        return "qwen2"
    raise ValueError("the tokenizer's pre-tokenizer is not one llama.cpp names (gpt-2, smollm, "
                     "qwen2), so format 'gguf' cannot hold it; export with format 'hf' and convert that folder "
                     "with llama.cpp's convert_hf_to_gguf.py")


def byte_level_vocabulary(tokenizer, cfg) -> dict:
    """llama.cpp's "gpt2" vocabulary from a byte-level BPE tokenizers.Tokenizer: tokens by id, merges,
    token types (special added tokens are control tokens), the pre-tokenizer's name and the special tokens' ids."""
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"a {model.get('type')} tokenizer{' with byte fallback' if model.get('byte_fallback') else ''} "
                         "is not a byte-level BPE one, the only kind format 'gguf' writes from tokenizer.json; "
                         "export with format 'hf' and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    size = max(tokenizer.get_vocab_size(), cfg.vocab_size)
    tokens = [tokenizer.id_to_token(i) or f"[PAD{i}]" for i in range(size)]  # rows the vocabulary leaves unused
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    types = [GGUF_CONTROL if i in added and added[i]["special"] else GGUF_USER_DEFINED if i in added
             else GGUF_NORMAL for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # llama.cpp needs the list, and the gguf package writes no empty one
        raise ValueError("the tokenizer has no BPE merges (a bare byte tokenizer), which llama.cpp's vocabulary "
                         "needs; format 'gguf' cannot hold it, format 'hf' can")
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_tokenizer_name(spec.get("pre_tokenizer")),
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.padding_token_id": cfg.pad_token_id}
    named = chat.special_tokens(tokenizer)
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown")):  # the model's own ids, else the tokens'
        token_id, token = cfg.extra.get(f"{name}_token_id"), named.get(f"{name}_token")
        token_id = token_id if token_id is not None else tokenizer.token_to_id(token) if token else None
        if token_id is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = token_id
    first = tokenizer.encode("a").ids[:1]  # a post-processor that puts <bos> first (Llama 3) asks llama.cpp to
    meta["tokenizer.ggml.add_bos_token"] = first == [meta.get("tokenizer.ggml.bos_token_id")]
    return meta




def check_metadata_holds(cfg, arch: str, meta: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """ValueError naming what the metadata cannot express, read back by pretrained.py's GGUF reader (RoPE
    scaling by the speeds it gives: Llama 3's comes back from the rope_freqs tensor as an equal one)."""
    if arch == "gemma3" and (cfg.attn_scale or cfg.head_dim) != cfg.head_dim:
        raise ValueError(f"llama.cpp scales Gemma 3's attention by head_dim^-0.5, and this model by "
                         f"{cfg.attn_scale}^-0.5; format 'gguf' cannot hold it, format 'hf' can")
    read_back = gguf_config(meta, arch, list(tensors), path, tensors.get(ROPE_FREQS))
    if torch.allclose(rope_speeds(cfg), rope_speeds(ModelConfig(**read_back)), rtol=1e-5, atol=0):
        read_back["rope_scaling"] = cfg.rope_scaling
    if lost := unheld(cfg, read_back):
        raise ValueError(f"a GGUF {arch} file cannot hold {', '.join(lost)} (llama.cpp's {arch} architecture has no "
                         f"such setting); {elsewhere(cfg)}")


def elsewhere(cfg) -> str:
    """What to do with a model format 'gguf' cannot hold: the hf export if transformers' config.json holds
    it (a Llama with GELU), else the adapter (a Llama with an attention soft-cap: transformers' has none)."""
    try:
        check_config_holds(cfg, hf_config(cfg, "fp32", {}), Path(cfg.flavor))
    except ValueError:
        return "keep it as an adapter on its base (mp.save_adapter)"
    return "export it with format 'hf'"


# ---------------------------------------------------------------------------------------------
# tensors and the file


def write_tensors(writer, tensors: dict[str, torch.Tensor], dtype: str):
    """Add the tensors to a gguf.GGUFWriter in `dtype`, then write the file (header, metadata, tensors)."""
    for name, w in tensors.items():
        data, qtype = gguf_tensor(name, w, dtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_tensor(name: str, w: torch.Tensor, dtype: str):
    """(data, its GGML type) of one tensor: matrices in `dtype`, vectors in fp32."""
    import gguf
    array = w.detach().float().contiguous().numpy()
    kind = GGUF_DTYPES[dtype] if array.ndim > 1 else "F32"
    if kind == "Q8_0" and array.shape[-1] % 32:
        kind = "F16"  # rows that do not split into blocks of 32
    qtype = gguf.GGMLQuantizationType[kind]
    return gguf.quants.quantize(array, qtype), qtype


def gguf_tensors(cfg, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights (merged_weights) -> llama.cpp's tensors, named and laid out as its converter does."""
    names = gguf_names(cfg)
    tensors = {}
    for ours, w in weights.items():
        if ours.startswith("head.") and cfg.tie_embeddings:
            continue  # llama.cpp reads token_embd for a tied head
        if ours not in names:  # a bias the architecture lacks (Llama's o_bias, a LayerNorm's)
            arch = ARCHITECTURES[cfg.flavor]
            raise ValueError(f"a GGUF {arch} file has no tensor for this model's {ours} (llama.cpp's {arch} "
                             f"architecture has no such weight), so format 'gguf' cannot hold it; {elsewhere(cfg)}")
        theirs, transform = names[ours]
        tensors[theirs] = to_gguf(transform, w, cfg)
    if rope_type(cfg) == "llama3":  # each RoPE speed's divisor, as llama.cpp's converter
        tensors[ROPE_FREQS] = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta) / rope_speeds(cfg)
    return tensors


def write_gguf(model, weights: dict[str, torch.Tensor], path: Path, dtype: str, tokenizer=None,
               chat_template=None) -> None:
    """The GGUF file of `model` with `weights` (merged_weights) at `path`."""
    import gguf
    cfg = model.cfg
    arch = architecture(cfg, "gguf")
    tensors = gguf_tensors(cfg, weights)
    meta = {**architecture_metadata(cfg, arch), **tokenizer_metadata(cfg, tokenizer, chat_template)}
    check_metadata_holds(cfg, arch, meta, tensors, path)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"{cfg.extra.get('source') or cfg.flavor} (minipeft export)")
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[dtype]].value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in meta.items():
        writer.add_key_value(key, value, *_value_type(value))
    write_tensors(writer, tensors, dtype)


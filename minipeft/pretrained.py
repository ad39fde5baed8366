"""Load real pretrained weights (and their tokenizer) into our `Transformer`.

    model, tokenizer = from_pretrained("minilm")              # a named model (list: NAMED_MODELS)
    model, tokenizer = from_pretrained("path/to/hf-folder")   # config.json + model.safetensors
    model, tokenizer = from_pretrained("path/to/model.gguf")  # a llama.cpp file, dequantized to fp32

What each source is
    minilm       all-MiniLM-L6-v2 (BERT, 6 layers, d 384), an HF folder from assets.asset_path
    smollm2      SmolLM2-135M-Instruct (Llama, 30 layers, d 576, 9 heads / 3 KV heads), a Q4_1 GGUF
    tiny-gpt2, tiny-bert, tiny-llama
                 2 layers, d 64, 4 heads (tiny-llama: 2 KV heads), 512 positions, randomly initialised
                 with a fixed seed, and `byte_tokenizer()`: ids 0-255 are the 256 bytes and id 256 is
                 <|endoftext|>, used for padding (vocab_size 257, pad_token_id 256). tiny-bert pools
                 by mean, since a byte tokenizer adds no [CLS] token.
    HF folder    config.json with model_type gpt2, bert or llama; model.safetensors (or
                 pytorch_model.bin, read with weights_only=True); tokenizer.json, required: we do not
                 guess a tokenizer (the error says how to save one into the folder)
    .gguf        general.architecture llama, byte-level BPE tokenizer (tokenizer.ggml.model gpt2),
                 rebuilt from the file's vocabulary and merges; tensors dequantized by gguf-py

How names map, theirs -> ours (transformers' base-model prefixes `transformer.`, `bert.`, `model.` are
stripped first; i is the layer):

    GPT-2   wte, wpe -> tok_emb, pos_emb;  h.i.ln_1, h.i.ln_2 -> blocks.i.ln1, ln2;
            h.i.attn.c_attn -> q, k, v (split);  attn.c_proj -> o;  mlp.c_fc, mlp.c_proj -> up, down;
            ln_f -> ln_f
    BERT    embeddings.{word,position,token_type}_embeddings, embeddings.LayerNorm
              -> tok_emb, pos_emb, type_emb, emb_ln;
            encoder.layer.i.attention.self.{query,key,value} -> q, k, v;  attention.output.dense -> o;
            attention.output.LayerNorm -> ln1;  intermediate.dense, output.dense -> up, down;
            output.LayerNorm -> ln2
    Llama   embed_tokens -> tok_emb;  layers.i.input_layernorm, post_attention_layernorm -> ln1, ln2;
            self_attn.{q,k,v,o}_proj -> q, k, v, o;  mlp.{gate,up,down}_proj -> gate, up, down;
            norm -> ln_f;  lm_head -> head
    GGUF    token_embd -> tok_emb;  blk.i.attn_norm, ffn_norm -> ln1, ln2;
            blk.i.attn_{q,k,v,output} -> q, k, v, o;  ffn_{gate,up,down} -> gate, up, down;
            output_norm -> ln_f;  output -> head

The HF rules (GPT2_RULES, BERT_RULES, LLAMA_RULES) are the one place these names are written: peft
adapters name the same transformers modules, and peft_format.py reads them from here (hf_module_names).

Every tensor is checked: a key we need and do not find, a key we do not know, or a shape that does not
fit stops with a ValueError naming them; IGNORED lists the few keys skipped on purpose. Weights are
converted to fp32.

GPT-2 stores its projections as `Conv1D`, weight (in, out): we transpose to nn.Linear's (out, in) and
cut the fused c_attn (d, 3d) into q, k, v. llama.cpp's converter reorders the rows of each q and k
head for its interleaved RoPE (pairs (0,1), (2,3), ...); our rotate-half RoPE pairs row j with j+hd/2,
so `_unpermute_rope_rows` puts them back (transformers' own GGUF loader does the same).

The LM head: GPT-2, BERT and tied Llama heads are `tok_emb` itself; an untied Llama head is loaded from
lm_head / output. With `n_classes` the model gets a fresh classifier head instead and no LM head
weights are loaded. BERT's pretraining heads (the MLM transform `cls.*`, the pooler) are skipped: our
BERT head is the bare tied embedding, so its MLM logits differ from BertForMaskedLM's while the hidden
states of `encode` match BertModel's exactly.

Tokenizers come back with padding and truncation switched off (data.py pads batches itself).
"""
import json
import pickle
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from .assets import asset_path
from .model import ModelConfig, Transformer
from .quant import quantize_blocks

TINY_MODELS = {  # name -> config; shared by all three: 2 layers, d 64, 4 heads, byte tokenizer
    "tiny-gpt2": dict(flavor="gpt2"),
    "tiny-bert": dict(flavor="bert", pool="mean"),
    "tiny-llama": dict(flavor="llama", n_kv_head=2),
}
ASSET_MODELS = ("minilm", "smollm2")
NAMED_MODELS = (*ASSET_MODELS, *TINY_MODELS)
HF_MODEL_TYPES = ("gpt2", "bert", "llama")
GGUF_ARCHITECTURES = ("llama",)
# GGML tensor types we dequantize with gguf.quants.dequantize; anything else is refused by name
GGUF_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                     "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

END_OF_TEXT = "<|endoftext|>"


def from_pretrained(name_or_path: str | Path, n_classes: int | None = None, dropout: float | None = None,
                    pool: str | None = None, quantize: str | None = None,
                    **config_overrides) -> tuple[Transformer, Tokenizer]:
    """A named model, an HF folder or a .gguf file -> (Transformer in eval mode, tokenizers.Tokenizer).

    n_classes: replace the LM head with a fresh (n_classes × d_model) classifier; LM head weights in
        the checkpoint are then not loaded.
    dropout: overrides the checkpoint's dropout (residual, embedding and attention).
    pool: "cls" or "mean", the BERT classifier pooling; by default a sentence-transformers folder's
        1_Pooling/config.json decides, else "cls".
    quantize: "nf4" or "fp4": store every block linear layer in 4 bits (block 64, double quantization)
        as soon as it is loaded, the base QLoRA trains on (mp.apply(model, "qlora") keeps it).
    config_overrides: any other ModelConfig field, e.g. max_seq_len=1024 for a smaller RoPE table.
    The source is recorded in `model.cfg.extra["source"]`.
    """
    overrides = dict(config_overrides)
    for key, value in (("n_classes", n_classes), ("dropout", dropout), ("pool", pool)):
        if value is not None:
            overrides[key] = value
    valid = {f.name for f in fields(ModelConfig)} - {"flavor", "extra"}
    if unknown := sorted(overrides.keys() - valid):
        raise ValueError(f"unknown config override(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(sorted(valid))}")
    source = str(name_or_path)
    path = asset_path(source) if source in ASSET_MODELS else Path(name_or_path)
    if source in TINY_MODELS:
        model, tokenizer = _tiny_model(source, overrides)
    elif path.is_dir():
        model, tokenizer = _load_hf_folder(path, overrides, source)
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, overrides, source)
    elif path.exists():
        raise ValueError(f"{path} is neither an HF model folder nor a .gguf file")
    else:
        raise FileNotFoundError(f"{source!r} is not a named model ({', '.join(NAMED_MODELS)}) "
                                "nor an existing HF folder or .gguf file")
    if quantize is not None:
        quantize_blocks(model, quantize)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# tiny random models and the byte tokenizer


def _tiny_model(name: str, overrides: dict) -> tuple[Transformer, Tokenizer]:
    cfg = ModelConfig(**{**dict(vocab_size=257, n_layer=2, n_head=4, d_model=64, max_seq_len=512,
                                pad_token_id=256, extra={"source": name}),
                         **TINY_MODELS[name], **overrides})
    with torch.random.fork_rng(devices=[]):  # the same weights every time; the caller's RNG untouched
        torch.manual_seed(0)
        model = Transformer(cfg)
    return model.eval(), byte_tokenizer()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each byte 0-255 as one printable character (byte-level BPE spells
    tokens with these). Printable Latin-1 bytes stand for themselves; the others (control codes,
    space, ...) get the characters from U+0100 on, in byte order, so 0x20 (space) is 'Ġ'."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer without merges: id b is byte b (0-255), id 256 is <|endoftext|>."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
    return tokenizer


# ---------------------------------------------------------------------------------------------
# name mapping, shared by HF folders and GGUF files
#
# A rule is (their name, our name or names, transform). Names are templates: {i} is a layer number
# and {p} is "weight" or "bias". A transform gets (tensor, cfg) and returns one tensor per our name.

Transform = Callable[[torch.Tensor, ModelConfig], torch.Tensor | tuple[torch.Tensor, ...]]
Rule = tuple[str, str | tuple[str, ...], Transform | None]


def _conv1d(w, cfg):  # GPT-2 Conv1D weight (in, out) -> nn.Linear weight (out, in)
    return w.t()


def _split_c_attn_weight(w, cfg):  # (d, 3d) Conv1D -> q, k, v weights, (d, d) each
    return tuple(w.t().chunk(3, dim=0))


def _split_c_attn_bias(b, cfg):  # (3d,) -> q, k, v biases
    return tuple(b.chunk(3))


def _unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order. Per head, llama.cpp stores rows as pairs (r0, r_hd/2),
    (r1, r_hd/2+1), ... next to each other (its RoPE rotates adjacent pairs); we rotate row j with
    j + hd/2, so rows (h, hd/2, 2, d) go back to (h, 2, hd/2, d)."""
    out_features, d = w.shape
    head_dim = out_features // n_heads
    return w.view(n_heads, head_dim // 2, 2, d).transpose(1, 2).reshape(out_features, d)


def _gguf_q(w, cfg):
    return _unpermute_rope_rows(w, cfg.n_head)


def _gguf_k(w, cfg):
    return _unpermute_rope_rows(w, cfg.n_kv_head)


GPT2_RULES: list[Rule] = [
    ("wte.weight", "tok_emb.weight", None),
    ("wpe.weight", "pos_emb.weight", None),
    ("h.{i}.ln_1.{p}", "blocks.{i}.ln1.{p}", None),
    ("h.{i}.attn.c_attn.weight",
     ("blocks.{i}.attn.q.weight", "blocks.{i}.attn.k.weight", "blocks.{i}.attn.v.weight"),
     _split_c_attn_weight),
    ("h.{i}.attn.c_attn.bias",
     ("blocks.{i}.attn.q.bias", "blocks.{i}.attn.k.bias", "blocks.{i}.attn.v.bias"), _split_c_attn_bias),
    ("h.{i}.attn.c_proj.weight", "blocks.{i}.attn.o.weight", _conv1d),
    ("h.{i}.attn.c_proj.bias", "blocks.{i}.attn.o.bias", None),
    ("h.{i}.ln_2.{p}", "blocks.{i}.ln2.{p}", None),
    ("h.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.up.weight", _conv1d),
    ("h.{i}.mlp.c_fc.bias", "blocks.{i}.mlp.up.bias", None),
    ("h.{i}.mlp.c_proj.weight", "blocks.{i}.mlp.down.weight", _conv1d),
    ("h.{i}.mlp.c_proj.bias", "blocks.{i}.mlp.down.bias", None),
    ("ln_f.{p}", "ln_f.{p}", None),
    ("lm_head.weight", "head.weight", None),
]

BERT_RULES: list[Rule] = [
    ("embeddings.word_embeddings.weight", "tok_emb.weight", None),
    ("embeddings.position_embeddings.weight", "pos_emb.weight", None),
    ("embeddings.token_type_embeddings.weight", "type_emb.weight", None),
    ("embeddings.LayerNorm.{p}", "emb_ln.{p}", None),
    ("encoder.layer.{i}.attention.self.query.{p}", "blocks.{i}.attn.q.{p}", None),
    ("encoder.layer.{i}.attention.self.key.{p}", "blocks.{i}.attn.k.{p}", None),
    ("encoder.layer.{i}.attention.self.value.{p}", "blocks.{i}.attn.v.{p}", None),
    ("encoder.layer.{i}.attention.output.dense.{p}", "blocks.{i}.attn.o.{p}", None),
    ("encoder.layer.{i}.attention.output.LayerNorm.{p}", "blocks.{i}.ln1.{p}", None),
    ("encoder.layer.{i}.intermediate.dense.{p}", "blocks.{i}.mlp.up.{p}", None),
    ("encoder.layer.{i}.output.dense.{p}", "blocks.{i}.mlp.down.{p}", None),
    ("encoder.layer.{i}.output.LayerNorm.{p}", "blocks.{i}.ln2.{p}", None),
]

LLAMA_RULES: list[Rule] = [
    ("embed_tokens.weight", "tok_emb.weight", None),
    ("layers.{i}.input_layernorm.weight", "blocks.{i}.ln1.weight", None),
    ("layers.{i}.self_attn.q_proj.weight", "blocks.{i}.attn.q.weight", None),
    ("layers.{i}.self_attn.k_proj.weight", "blocks.{i}.attn.k.weight", None),
    ("layers.{i}.self_attn.v_proj.weight", "blocks.{i}.attn.v.weight", None),
    ("layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.o.weight", None),
    ("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.ln2.weight", None),
    ("layers.{i}.mlp.gate_proj.weight", "blocks.{i}.mlp.gate.weight", None),
    ("layers.{i}.mlp.up_proj.weight", "blocks.{i}.mlp.up.weight", None),
    ("layers.{i}.mlp.down_proj.weight", "blocks.{i}.mlp.down.weight", None),
    ("norm.weight", "ln_f.weight", None),
    ("lm_head.weight", "head.weight", None),
]

GGUF_LLAMA_RULES: list[Rule] = [
    ("token_embd.weight", "tok_emb.weight", None),
    ("blk.{i}.attn_norm.weight", "blocks.{i}.ln1.weight", None),
    ("blk.{i}.attn_q.weight", "blocks.{i}.attn.q.weight", _gguf_q),
    ("blk.{i}.attn_k.weight", "blocks.{i}.attn.k.weight", _gguf_k),
    ("blk.{i}.attn_v.weight", "blocks.{i}.attn.v.weight", None),
    ("blk.{i}.attn_output.weight", "blocks.{i}.attn.o.weight", None),
    ("blk.{i}.ffn_norm.weight", "blocks.{i}.ln2.weight", None),
    ("blk.{i}.ffn_gate.weight", "blocks.{i}.mlp.gate.weight", None),
    ("blk.{i}.ffn_up.weight", "blocks.{i}.mlp.up.weight", None),
    ("blk.{i}.ffn_down.weight", "blocks.{i}.mlp.down.weight", None),
    ("output_norm.weight", "ln_f.weight", None),
    ("output.weight", "head.weight", None),
]

HF_RULES = {"gpt2": GPT2_RULES, "bert": BERT_RULES, "llama": LLAMA_RULES}
# transformers' base-model prefix; keys outside it (lm_head.*, cls.*) are kept as they are
HF_PREFIXES = {"gpt2": "transformer.", "bert": "bert.", "llama": "model."}

IGNORED = {  # full-match regexes of keys skipped on purpose, and why
    "gpt2": [r"h\.\d+\.attn\.(bias|masked_bias)"],  # causal-mask buffers of older checkpoints
    "bert": [r"embeddings\.position_ids",  # a buffer 0..P-1
             r"pooler\..*",  # the [CLS] tanh layer of next-sentence prediction; not part of encode()
             r"cls\..*"],  # MLM / NSP pretraining heads; our BERT LM head is the bare tied embedding
    "llama": [r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"],  # RoPE frequencies, rebuilt from rope_theta
    "gguf": [],
}


def template_regex(template: str) -> re.Pattern:
    """"h.{i}.ln_1.{p}" -> a regex matching "h.3.ln_1.weight" with groups i="3", p="weight"."""
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern)


def _our_names(template: str | tuple[str, ...]) -> tuple[str, ...]:
    return (template,) if isinstance(template, str) else template


def _rename(theirs: dict[str, torch.Tensor], rules: list[Rule], ignored: list[str], prefix: str,
            cfg: ModelConfig):
    """Their state dict -> (ours: our name -> fp32 tensor, origin: our name -> their key, unknown:
    their keys that no rule claims). Rules and `ignored` match keys with `prefix` removed."""
    compiled = [(template_regex(their), _our_names(ours), transform) for their, ours, transform in rules]
    ours, origin, unknown = {}, {}, []
    for key, tensor in theirs.items():
        short_key = key.removeprefix(prefix)
        if any(re.fullmatch(pattern, short_key) for pattern in ignored):
            continue
        for regex, our_templates, transform in compiled:
            if match := regex.fullmatch(short_key):
                values = transform(tensor, cfg) if transform else tensor
                values = values if isinstance(values, tuple) else (values,)
                for template, value in zip(our_templates, values):
                    name = template.format(**match.groupdict())
                    ours[name], origin[name] = value.float(), key
                break
        else:
            unknown.append(key)
    return ours, origin, unknown


def hf_module_names(flavor: str) -> dict[str, str]:
    """Our module -> the transformers module holding its weights (under HF_PREFIXES[flavor]), read off
    the rename rules in their order, so every HF name is written once, in the rules. For gpt2:
    {"tok_emb": "wte", ..., "blocks.{i}.attn.q": "h.{i}.attn.c_attn", "blocks.{i}.attn.k": "h.{i}.attn.c_attn",
    "blocks.{i}.attn.v": "h.{i}.attn.c_attn", "blocks.{i}.attn.o": "h.{i}.attn.c_proj", ...}. Modules cut
    from one fused module (q, k, v from c_attn) follow each other in the order the rule cuts them, which
    is their row order in it. peft_format.py names the layers of peft adapters with this."""
    names = {}
    for theirs, ours, _ in HF_RULES[flavor]:
        for template in _our_names(ours):
            names.setdefault(_module_of(template), _module_of(theirs))
    return names


def _module_of(template: str) -> str:
    """"h.{i}.ln_1.{p}" -> "h.{i}.ln_1": a tensor's name without its last part (weight, bias)."""
    return template.rsplit(".", 1)[0]


def _their_name(our_name: str, rules: list[Rule]) -> str:
    """The checkpoint key a rule would have turned into `our_name` (for messages about missing keys)."""
    for their, ours, _ in rules:
        for template in _our_names(ours):
            if match := template_regex(template).fullmatch(our_name):
                return their.format(**match.groupdict())
    return our_name


def _load_weights(model: Transformer, theirs: dict[str, torch.Tensor], rules: list[Rule],
                  ignored: list[str], source: str, prefix: str = "") -> None:
    """Rename `theirs` into our names, check every key and shape, and copy the tensors into `model`.
    Messages name keys as the checkpoint spells them; a missing key without `prefix`."""
    cfg = model.cfg
    ours, origin, unknown = _rename(theirs, rules, ignored, prefix, cfg)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.n_classes or cfg.tie_embeddings:  # a fresh classifier, or tok_emb itself: nothing to load
        for name in ("head.weight", "head.bias"):
            expected.pop(name, None)
            if ours.pop(name, None) is not None:
                origin.pop(name)
    unknown += sorted({origin[name] for name in ours.keys() - expected.keys()})  # e.g. a layer too many
    if unknown:
        raise ValueError(f"{source}: unknown key(s) in the checkpoint: {', '.join(unknown)}")
    missing = sorted({_their_name(name, rules) for name in expected.keys() - ours.keys()})
    if missing:
        raise ValueError(f"{source}: key(s) missing from the checkpoint: {', '.join(missing)}")
    wrong = [f"{origin[name]} gives {tuple(ours[name].shape)} for {name}, which needs {shape}"
             for name, shape in expected.items() if tuple(ours[name].shape) != shape]
    if wrong:
        raise ValueError(f"{source}: shape mismatch (does config.json describe these weights?): "
                         + "; ".join(wrong))
    model.load_state_dict(ours, strict=False)  # strict=False: the head keys handled above


def _build_model(checkpoint_config: dict, overrides: dict, source: str) -> Transformer:
    cfg = ModelConfig(**{**checkpoint_config, **overrides, "extra": {"source": source}})
    return Transformer(cfg)


# ---------------------------------------------------------------------------------------------
# HF folders


def _require(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{source}: {message}")


def _gpt2_config(c: dict, folder: Path, source: str) -> dict:
    _require(c.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"), source,
             f"activation_function {c.get('activation_function')!r} is not supported (GPT-2 uses gelu_new)")
    _require(c.get("scale_attn_weights", True) and not c.get("scale_attn_by_inverse_layer_idx", False),
             source, "only the standard 1/sqrt(head_dim) attention scaling is supported")
    return dict(flavor="gpt2", vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                d_model=c["n_embd"], d_ff=c.get("n_inner"), max_seq_len=c["n_positions"],
                norm_eps=c["layer_norm_epsilon"], tie_embeddings=c.get("tie_word_embeddings", True),
                # we have one dropout rate where GPT-2 has three (usually all equal)
                dropout=max(c.get("resid_pdrop", 0.0), c.get("attn_pdrop", 0.0), c.get("embd_pdrop", 0.0)),
                pad_token_id=c.get("pad_token_id") or 0)


def _bert_config(c: dict, folder: Path, source: str) -> dict:
    _require(c.get("hidden_act", "gelu") == "gelu", source,
             f"hidden_act {c.get('hidden_act')!r} is not supported (BERT uses gelu)")
    _require(c.get("position_embedding_type", "absolute") == "absolute", source,
             "only absolute position embeddings are supported")
    return dict(flavor="bert", vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"],
                n_head=c["num_attention_heads"], d_model=c["hidden_size"], d_ff=c["intermediate_size"],
                max_seq_len=c["max_position_embeddings"], type_vocab_size=c.get("type_vocab_size", 2),
                norm_eps=c.get("layer_norm_eps", 1e-12), dropout=c.get("hidden_dropout_prob", 0.0),
                tie_embeddings=True, pad_token_id=c.get("pad_token_id") or 0, pool=_bert_pooling(folder))


def _bert_pooling(folder: Path) -> str:
    """"mean" or "cls" from a sentence-transformers folder's 1_Pooling/config.json, else "cls"."""
    pooling_file = folder / "1_Pooling" / "config.json"
    if not pooling_file.exists():
        return "cls"
    pooling = json.loads(pooling_file.read_text())
    if pooling.get("pooling_mode_mean_tokens"):
        return "mean"
    if pooling.get("pooling_mode_cls_token"):
        return "cls"
    raise ValueError(f"{pooling_file} asks for a pooling we do not have; pass pool='cls' or pool='mean'")


def _llama_config(c: dict, folder: Path, source: str) -> dict:
    d, n_head = c["hidden_size"], c["num_attention_heads"]
    _require(c.get("hidden_act", "silu") == "silu", source,
             f"hidden_act {c.get('hidden_act')!r} is not supported (Llama uses silu)")
    _require(not c.get("attention_bias") and not c.get("mlp_bias"), source, "biases are not supported")
    _require(c.get("head_dim") in (None, d // n_head), source,
             f"head_dim must be hidden_size / num_attention_heads = {d // n_head}")
    # transformers 5 keeps RoPE settings in rope_parameters; older files have rope_theta / rope_scaling
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    _require(rope_type == "default", source,
             f"RoPE scaling {rope_type!r} is not supported; only the default (unscaled) RoPE is")
    return dict(flavor="llama", vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=n_head,
                n_kv_head=c.get("num_key_value_heads") or n_head, d_model=d, d_ff=c["intermediate_size"],
                max_seq_len=c["max_position_embeddings"], norm_eps=c.get("rms_norm_eps", 1e-6),
                rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
                tie_embeddings=c.get("tie_word_embeddings", False), dropout=c.get("attention_dropout", 0.0),
                pad_token_id=c.get("pad_token_id") or 0)


HF_CONFIGS = {"gpt2": _gpt2_config, "bert": _bert_config, "llama": _llama_config}


def _load_hf_folder(folder: Path, overrides: dict, source: str) -> tuple[Transformer, Tokenizer]:
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{folder} is not an HF model folder: it has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(_corrupt(config_file, error)) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in HF_CONFIGS:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(HF_MODEL_TYPES)}")
    try:
        checkpoint_config = HF_CONFIGS[model_type](config, folder, source)
    except KeyError as error:
        raise ValueError(f"{config_file} has no {error.args[0]!r}, which a {model_type} config needs; "
                         "save the model's config again (transformers: model.config.save_pretrained(folder))"
                         ) from None
    weights = _read_hf_weights(folder)
    model = _build_model(checkpoint_config, overrides, source)
    _load_weights(model, weights, HF_RULES[model_type], IGNORED[model_type], source, HF_PREFIXES[model_type])
    return model, _read_tokenizer_json(folder)


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    safetensors_file, bin_file = folder / "model.safetensors", folder / "pytorch_model.bin"
    if safetensors_file.exists():
        try:
            return load_file(safetensors_file)
        except SafetensorError as error:
            raise ValueError(_corrupt(safetensors_file, error)) from error
    if bin_file.exists():
        try:
            return torch.load(bin_file, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise ValueError(_corrupt(bin_file, error)) from error
    raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin "
                            "(sharded checkpoints are not supported)")


def _corrupt(path: Path, error: Exception) -> str:
    return f"{path} is corrupt or truncated ({error}); delete it and download again"


def _read_tokenizer_json(folder: Path) -> Tokenizer:
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.exists():
        raise FileNotFoundError(f"{folder} has no tokenizer.json; save the model's tokenizer there "
                                "(tokenizers: tokenizer.save(path); "
                                "transformers: tokenizer.save_pretrained(folder))")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(_corrupt(tokenizer_file, error)) from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


# ---------------------------------------------------------------------------------------------
# GGUF files (llama.cpp)

# tokenizer.ggml.pre -> how text is split before BPE (a file without the key is taken as "gpt2").
# llama.cpp's "smollm" (like its "starcoder") first isolates every digit, then applies GPT-2's regex to
# the rest; SmolLM2's own tokenizer.json says the same with Digits(individual_digits=True) + ByteLevel.
# It differs from plain GPT-2 splitting only on whitespace runs before a digit: "x  1" -> x|ĠĠ|1, not
# x|Ġ|Ġ1 (which BPE then spells x|Ġ|Ġ|1, as transformers 5.23's GGUF tokenizer does).
GGUF_PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)]),
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
_REQUIRED = object()  # meta(key) without a default: the key must be in the file


def _load_gguf(path: Path, overrides: dict, source: str) -> tuple[Transformer, Tokenizer]:
    import gguf  # only needed for .gguf files

    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # the reader fails in many ways on a cut-off file (reshape, magic, ...)
        raise ValueError(_corrupt(path, error)) from error

    def meta(key, default=_REQUIRED):
        if key in reader.fields:
            return reader.fields[key].contents()
        if default is _REQUIRED:
            raise ValueError(f"{path}: metadata {key} is missing")
        return default

    architecture = meta("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {architecture!r} is not supported; "
                         f"supported: {', '.join(GGUF_ARCHITECTURES)}")
    if meta("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: RoPE scaling is not supported; only the default (unscaled) RoPE is")
    tensor_names = {tensor.name for tensor in reader.tensors}
    tokens = meta("tokenizer.ggml.tokens")
    n_head = meta("llama.attention.head_count")
    d_model = meta("llama.embedding_length")
    if meta("llama.rope.dimension_count", d_model // n_head) != d_model // n_head:
        raise ValueError(f"{path}: RoPE on part of each head is not supported")
    checkpoint_config = dict(
        flavor="llama", vocab_size=len(tokens), n_layer=meta("llama.block_count"), n_head=n_head,
        n_kv_head=meta("llama.attention.head_count_kv", n_head), d_model=d_model,
        d_ff=meta("llama.feed_forward_length"), max_seq_len=meta("llama.context_length"),
        norm_eps=meta("llama.attention.layer_norm_rms_epsilon"),
        rope_theta=meta("llama.rope.freq_base", 10000.0),
        tie_embeddings="output.weight" not in tensor_names,  # no output.weight: the head is tok_emb
        pad_token_id=meta("tokenizer.ggml.padding_token_id", 0))
    model = _build_model(checkpoint_config, overrides, source)
    model.cfg.extra.update(bos_token_id=meta("tokenizer.ggml.bos_token_id", None),
                           eos_token_id=meta("tokenizer.ggml.eos_token_id", None))
    _load_weights(model, _dequantize(reader, path), GGUF_LLAMA_RULES, IGNORED["gguf"], source)
    return model, _gguf_tokenizer(meta, tokens, path)


def _dequantize(reader, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file as fp32, shaped like PyTorch's (out, in): GGUF lists dimensions
    fastest-first, so (in, out), and its numpy arrays come out already in (out, in) order."""
    import gguf

    tensors = {}
    for tensor in tqdm(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor", file=sys.stderr):
        type_name = tensor.tensor_type.name
        if type_name not in GGUF_TENSOR_TYPES:
            raise ValueError(f"{path}: tensor {tensor.name} has GGML type {type_name}, which we cannot "
                             f"dequantize; supported: {', '.join(GGUF_TENSOR_TYPES)}")
        in_memory = np.array(tensor.data)  # a copy: dequantizing it is ~2x faster than the memmap
        values = gguf.quants.dequantize(in_memory, tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape))
        tensors[tensor.name] = torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(shape))
    return tensors


def _gguf_tokenizer(meta, tokens: list[str], path: Path) -> Tokenizer:
    """Byte-level BPE rebuilt from the file's vocabulary and merges; control tokens (<|im_start|>,
    ...) become special tokens, so they are matched whole and skipped when decoding."""
    tokenizer_model, pre = meta("tokenizer.ggml.model"), meta("tokenizer.ggml.pre", "gpt2")
    if tokenizer_model != "gpt2":
        raise ValueError(f"{path}: tokenizer {tokenizer_model!r} is not supported; only byte-level BPE "
                         "('gpt2') is")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported; "
                         f"supported: {', '.join(GGUF_PRE_TOKENIZERS)}")
    merges = [tuple(merge.split(" ")) for merge in meta("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    token_types = meta("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, token_types) if kind == GGUF_CONTROL])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)
                          for token, kind in zip(tokens, token_types) if kind == GGUF_USER_DEFINED])
    bos_id = meta("tokenizer.ggml.bos_token_id", None)
    if meta("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                                 special_tokens=[(bos, bos_id)])
    return tokenizer

"""Load real pretrained weights (and their tokenizer) into our `Transformer`.

    model, tokenizer = from_pretrained("gemma3-270m")         # a named model (list: NAMED_MODELS)
    model, tokenizer = from_pretrained("path/to/hf-folder")   # config.json + safetensors (or .bin)
    model, tokenizer = from_pretrained("path/to/model.gguf")  # a llama.cpp file, dequantized to fp32

What each source is
    minilm       all-MiniLM-L6-v2 (BERT, 6 layers, d 384), an HF folder from assets.asset_path
    smollm2      SmolLM2-135M-Instruct (Llama, 30 layers, d 576, 9 heads / 3 KV heads), a Q4_1 GGUF
    gemma3-270m  Gemma 3 270M (18 layers, d 640, 4 heads / 1 KV head, head_dim 256), a Q4_K_M GGUF
    tiny-gpt2, tiny-bert, tiny-llama
                 2 layers, d 64, 4 heads (tiny-llama: 2 KV heads), 512 positions, randomly initialised
                 with a fixed seed, and `byte_tokenizer()`: ids 0-255 are the 256 bytes and id 256 is
                 <|endoftext|>, used for padding (vocab_size 257, pad_token_id 256). tiny-bert pools
                 by mean, since a byte tokenizer adds no [CLS] token.
    HF folder    config.json with a model_type of HF_MODEL_TYPES (gpt2, bert, roberta, distilbert,
                 llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, gemma3_text); model.safetensors, a
                 sharded model.safetensors.index.json, or pytorch_model.bin (read with weights_only=True);
                 a tokenizer (tokenization.folder_tokenizer: tokenizer.json, vocab.txt or vocab.json +
                 merges.txt; without any the model loads and only tokenizing text stops). A
                 `…ForSequenceClassification` checkpoint loads its trained classifier and sets n_classes:
                 a decoder's (and GPT-2's) `score` is our head (bias 0); an encoder's is our pooler and
                 head (BERT's pooler.dense + classifier, RoBERTa's classifier.dense + out_proj,
                 DistilBERT's pre_classifier + classifier: families.py). Another classifier (a token
                 classifier's, ...) is refused.
                 Saved in bitsandbytes 4-bit (config.json's quantization_config): the block layers
                 become Linear4bit over the file's codes and state (bnb_weights.py).
    .gguf        general.architecture llama, qwen2, qwen3 or gemma3 (gguf_model.py)

How names map, theirs -> ours (transformers' base-model prefixes `transformer.`, `bert.`, `roberta.`,
`distilbert.`, `model.` are stripped first; i is the layer):

    GPT-2   wte, wpe -> tok_emb, pos_emb;  h.i.ln_1, h.i.ln_2 -> blocks.i.ln1, ln2;
            h.i.attn.c_attn -> q, k, v (split);  attn.c_proj -> o;  mlp.c_fc, mlp.c_proj -> up, down;
            ln_f -> ln_f
    BERT    embeddings.{word,position,token_type}_embeddings, embeddings.LayerNorm
    RoBERTa   -> tok_emb, pos_emb, type_emb, emb_ln;
            encoder.layer.i.attention.self.{query,key,value} -> q, k, v;  attention.output.dense -> o;
            attention.output.LayerNorm -> ln1;  intermediate.dense, output.dense -> up, down;
            output.LayerNorm -> ln2
    DistilBERT  embeddings.{word,position}_embeddings, embeddings.LayerNorm -> tok_emb, pos_emb, emb_ln;
            transformer.layer.i.attention.{q,k,v,out}_lin -> q, k, v, o;  sa_layer_norm -> ln1;
            ffn.lin1, ffn.lin2 -> up, down;  output_layer_norm -> ln2
    Llama   embed_tokens -> tok_emb;  layers.i.input_layernorm, post_attention_layernorm -> ln1, ln2;
    (Mistral, self_attn.{q,k,v,o}_proj -> q, k, v, o;  mlp.{gate,up,down}_proj -> gate, up, down;
    Qwen2/3, norm -> ln_f;  lm_head -> head;  Qwen3: self_attn.{q,k}_norm -> attn.q_norm, k_norm
    Gemma)
    Phi-3   as Llama, but self_attn.qkv_proj -> q, k, v (rows [q | k | v], by head counts) and
            mlp.gate_up_proj -> gate, up (halves, gate first)
    Gemma 2/3  as Llama, but four norms: input_layernorm -> ln1, post_attention_layernorm -> ln1_post,
            pre_feedforward_layernorm -> ln2, post_feedforward_layernorm -> ln2_post; Gemma 3: q/k norms
    GGUF    llama.cpp's names: gguf_model.py

The HF rules (HF_RULES) are the one place these names are written: peft adapters name the same
transformers modules, and peft_format/ reads them from here (hf_module_names).

Every tensor is checked (weights.py, which applies the rules for HF folders and GGUF files alike): a key
we need and do not find, a key we do not know, or a shape that does not fit stops with a ValueError naming
them; IGNORED lists the keys skipped on purpose. Weights are converted to fp32.

GPT-2 stores its projections as `Conv1D`, weight (in, out): we transpose to nn.Linear's (out, in) and
cut the fused c_attn (d, 3d) into q, k, v.

The LM head: tied heads are `tok_emb` itself; an untied head is loaded from lm_head / output. With
`n_classes` the model gets a classifier head instead (the checkpoint's classifier when it has one, which
must have n_classes rows, else fresh) and no LM head weights are loaded. BERT-style pretraining heads (the
MLM transform, and the pooler unless a classifier reads it) are skipped: our encoder LM head is the bare
tied embedding, so its MLM logits differ from BertForMaskedLM's while the hidden states of `encode` match
BertModel's exactly.
"""
import json
import pickle
import re
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .assets import asset_path
from minipeft.core.model import ROPE_SCALINGS, ModelConfig, Transformer, check_n_classes
from minipeft.scale.precision import resolve_device, resolve_precision, set_precision
from .tokenization import END_OF_TEXT, byte_tokenizer, bytes_to_unicode, folder_tokenizer, read_hf_chat_settings
from .weights import Rule, build_model, load_weights, our_names, their_name

__all__ = ["from_pretrained", "byte_tokenizer", "bytes_to_unicode", "END_OF_TEXT", "HF_MODEL_TYPES", "NAMED_MODELS",
           "hf_module_names"]

TINY_MODELS = {  # name -> config; shared by all three: 2 layers, d 64, 4 heads, byte tokenizer
    "tiny-gpt2": dict(flavor="gpt2"),
    "tiny-bert": dict(flavor="bert", pool="mean"),
    "tiny-llama": dict(flavor="llama", n_kv_head=2),
}
ASSET_MODELS = ("minilm", "smollm2", "gemma3-270m")
NAMED_MODELS = (*ASSET_MODELS, *TINY_MODELS)
HF_MODEL_TYPES = {  # config.json's model_type -> our family
    "gpt2": "gpt2", "bert": "bert", "roberta": "roberta", "distilbert": "distilbert", "llama": "llama",
    "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma": "gemma",
    "gemma2": "gemma2", "gemma3_text": "gemma3"}



def from_pretrained(name_or_path: str | Path, n_classes: int | None = None, dropout: float | None = None,
                    pool: str | None = None, quantize: str | None = None, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, **config_overrides) -> tuple[Transformer, Tokenizer]:
    """A named model, an HF folder, a .gguf file or a hub id (ORG/NAME, from the local Hugging Face cache:
    hub.py) -> (Transformer in eval mode, tokenizers.Tokenizer).

    n_classes: replace the LM head with a (n_classes × d_model) classifier, fresh; LM head weights in the
        checkpoint are then not loaded. A …ForSequenceClassification checkpoint brings its trained classifier
        and sets n_classes by itself (a given n_classes must agree; model.add_classifier(n) after loading
        puts a fresh head of n classes in its place).
    dropout: overrides the checkpoint's dropout (residual, embedding and attention).
    pool: "cls" or "mean", the encoder classifier pooling; by default a sentence-transformers folder's
        1_Pooling/config.json decides, else "cls".
    quantize: "nf4" or "fp4": store every block linear layer in 4 bits (block 64, double quantization)
        as soon as it is loaded, the base QLoRA trains on (mp.apply(model, "qlora") keeps it). A folder saved
        in bitsandbytes 4-bit needs no argument: its layers are 4-bit as they are stored.
    device: "auto", "cpu", "cuda", "cuda:N" or "mps" (precision.resolve_device); default: the CPU.
    dtype: a precision ("fp32", "bf16-mixed", "bf16-true", "fp16-mixed") or the frozen weights' dtype
        (torch.bfloat16 means bf16-mixed, torch.float16 fp16-mixed): the loaded weights are stored in its
        frozen dtype and the model runs in it (precision.set_precision); default fp32. Methods applied
        later give their parameters the precision's trainable dtype.
    config_overrides: any other ModelConfig field, e.g. max_seq_len=1024 for a smaller RoPE table.
    The source is recorded in `model.cfg.extra["source"]` (a hub id's commit in `extra["revision"]`).
    """
    target = resolve_device(device if device is not None else "cpu")
    precision = resolve_precision(dtype if dtype is not None else "fp32", target)  # bad input: before loading
    overrides = dict(config_overrides)
    if n_classes is not None:  # 0 would build no classifier at all
        n_classes = check_n_classes(n_classes)
    for key, value in (("n_classes", n_classes), ("dropout", dropout), ("pool", pool)):
        if value is not None:
            overrides[key] = value
    valid = {f.name for f in fields(ModelConfig)} - {"flavor", "extra"}
    if unknown := sorted(overrides.keys() - valid):
        raise ValueError(f"unknown config override(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(sorted(valid))}")
    source = str(name_or_path)
    path = asset_path(source) if source in ASSET_MODELS else Path(name_or_path)
    revision = None
    if "/" in source:  # maybe ORG/NAME
        from . import hub
        if hub.is_hub_id(source):  # ORG/NAME: from the Hugging Face cache
            path = hub.model_path(source)
            revision = (path if path.is_dir() else path.parent).name  # the snapshot's commit
    if source in TINY_MODELS:
        model, tokenizer = _tiny_model(source, overrides)
    elif path.is_dir():
        model, tokenizer = _load_hf_folder(path, overrides, source)
    elif path.is_file() and path.suffix == ".gguf":
        from .gguf_model import load_gguf
        model, tokenizer = load_gguf(path, overrides, source)
    elif path.exists():
        raise ValueError(f"{path} is neither an HF model folder nor a .gguf file")
    else:
        raise FileNotFoundError(f"{source!r} is not a named model ({', '.join(NAMED_MODELS)}) "
                                "nor an existing HF folder or .gguf file")
    if revision is not None:
        model.cfg.extra["revision"] = revision
    if quantize is not None:
        from minipeft.core.nf4 import quantize_blocks
        quantize_blocks(model, quantize)
    model.requires_grad_(False)  # the loaded weights are the base: stored in the frozen dtype
    set_precision(model, precision.name).to(target)  # cast where the fp32 weights are, then move
    return model.requires_grad_(True).eval(), tokenizer


def _tiny_model(name: str, overrides: dict) -> tuple[Transformer, Tokenizer]:
    cfg = ModelConfig(**{**dict(vocab_size=257, n_layer=2, n_head=4, d_model=64, max_seq_len=512,
                                pad_token_id=256, extra={"source": name}),
                         **TINY_MODELS[name], **overrides})
    with torch.random.fork_rng(devices=[]):  # the same weights every time; the caller's RNG untouched
        torch.manual_seed(0)
        model = Transformer(cfg)
    return model.eval(), byte_tokenizer()


# ---------------------------------------------------------------------------------------------
# HF folders: their weight names -> ours (weights.py applies the rules)


def _conv1d(w, cfg):  # GPT-2 Conv1D weight (in, out) -> nn.Linear weight (out, in)
    return w.t()


def _split_c_attn_weight(w, cfg):  # (d, 3d) Conv1D -> q, k, v weights, (d, d) each
    return tuple(w.t().chunk(3, dim=0))


def _split_c_attn_bias(b, cfg):  # (3d,) -> q, k, v biases
    return tuple(b.chunk(3))


def _split_qkv(w, cfg):  # Phi-3's qkv_proj: rows [q | k | v], n_head, n_kv_head, n_kv_head heads
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    return tuple(w.split([q_rows, kv_rows, kv_rows]))


def _split_gate_up(w, cfg):  # Phi-3's gate_up_proj: rows [gate | up]
    return tuple(w.chunk(2))



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

BERT_RULES: list[Rule] = [  # BERT and RoBERTa
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

DISTILBERT_RULES: list[Rule] = [
    ("embeddings.word_embeddings.weight", "tok_emb.weight", None),
    ("embeddings.position_embeddings.weight", "pos_emb.weight", None),
    ("embeddings.LayerNorm.{p}", "emb_ln.{p}", None),
    ("transformer.layer.{i}.attention.q_lin.{p}", "blocks.{i}.attn.q.{p}", None),
    ("transformer.layer.{i}.attention.k_lin.{p}", "blocks.{i}.attn.k.{p}", None),
    ("transformer.layer.{i}.attention.v_lin.{p}", "blocks.{i}.attn.v.{p}", None),
    ("transformer.layer.{i}.attention.out_lin.{p}", "blocks.{i}.attn.o.{p}", None),
    ("transformer.layer.{i}.sa_layer_norm.{p}", "blocks.{i}.ln1.{p}", None),
    ("transformer.layer.{i}.ffn.lin1.{p}", "blocks.{i}.mlp.up.{p}", None),
    ("transformer.layer.{i}.ffn.lin2.{p}", "blocks.{i}.mlp.down.{p}", None),
    ("transformer.layer.{i}.output_layer_norm.{p}", "blocks.{i}.ln2.{p}", None),
]

# Llama and the families named like it, in pieces: Phi-3 fuses q/k/v and gate/up, Gemma 2/3 have four
# norms per block, Qwen3 and Gemma 3 norm q and k
_EMBED = [("embed_tokens.weight", "tok_emb.weight", None)]
_NORMS = [("layers.{i}.input_layernorm.weight", "blocks.{i}.ln1.weight", None),
          ("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.ln2.weight", None)]
_SANDWICH_NORMS = [("layers.{i}.input_layernorm.weight", "blocks.{i}.ln1.weight", None),
                   ("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.ln1_post.weight", None),
                   ("layers.{i}.pre_feedforward_layernorm.weight", "blocks.{i}.ln2.weight", None),
                   ("layers.{i}.post_feedforward_layernorm.weight", "blocks.{i}.ln2_post.weight", None)]
_ATTENTION = [(f"layers.{{i}}.self_attn.{t}_proj.{{p}}", f"blocks.{{i}}.attn.{t}.{{p}}", None) for t in "qkvo"]
_FUSED_ATTENTION = [("layers.{i}.self_attn.qkv_proj.weight",
                     ("blocks.{i}.attn.q.weight", "blocks.{i}.attn.k.weight", "blocks.{i}.attn.v.weight"), _split_qkv),
                    ("layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.o.weight", None)]
_QK_NORMS = [("layers.{i}.self_attn.q_norm.weight", "blocks.{i}.attn.q_norm.weight", None),
             ("layers.{i}.self_attn.k_norm.weight", "blocks.{i}.attn.k_norm.weight", None)]
_MLP = [(f"layers.{{i}}.mlp.{t}_proj.{{p}}", f"blocks.{{i}}.mlp.{t}.{{p}}", None) for t in ("gate", "up", "down")]
_FUSED_MLP = [("layers.{i}.mlp.gate_up_proj.weight", ("blocks.{i}.mlp.gate.weight", "blocks.{i}.mlp.up.weight"),
               _split_gate_up),
              ("layers.{i}.mlp.down_proj.weight", "blocks.{i}.mlp.down.weight", None)]
_FINAL = [("norm.weight", "ln_f.weight", None), ("lm_head.weight", "head.weight", None)]
LLAMA_RULES: list[Rule] = _EMBED + _NORMS + _ATTENTION + _MLP + _FINAL

HF_RULES = {
    "gpt2": GPT2_RULES, "bert": BERT_RULES, "roberta": BERT_RULES, "distilbert": DISTILBERT_RULES,
    "llama": LLAMA_RULES, "mistral": LLAMA_RULES, "qwen2": LLAMA_RULES, "gemma": LLAMA_RULES,
    "qwen3": _EMBED + _NORMS + _ATTENTION + _QK_NORMS + _MLP + _FINAL,
    "phi3": _EMBED + _NORMS + _FUSED_ATTENTION + _FUSED_MLP + _FINAL,
    "gemma2": _EMBED + _SANDWICH_NORMS + _ATTENTION + _MLP + _FINAL,
    "gemma3": _EMBED + _SANDWICH_NORMS + _ATTENTION + _QK_NORMS + _MLP + _FINAL,
}
# transformers' base-model prefix; keys outside it (lm_head.*, score.*, cls.*) are kept as they are
HF_PREFIXES = {"gpt2": "transformer.", "bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert.",
               **{family: "model." for family in HF_RULES if family not in ("gpt2", "bert", "roberta", "distilbert")}}
# a …ForSequenceClassification's classifier, read when the checkpoint has one: its last layer is our head (loaded
# as "score": weights.py puts it in; the decoders' has no bias, so ours is 0), an encoder's dense layer before it
# our pooler (families.py)
CLASSIFIER_RULES: dict[str, list[Rule]] = {
    "bert": [("pooler.dense.{p}", "pooler.{p}", None), ("classifier.{p}", "score.{p}", None)],
    "roberta": [("classifier.dense.{p}", "pooler.{p}", None), ("classifier.out_proj.{p}", "score.{p}", None)],
    "distilbert": [("pre_classifier.{p}", "pooler.{p}", None), ("classifier.{p}", "score.{p}", None)],
    **{family: [("score.weight", "score.weight", None)] for family in HF_RULES
       if family not in ("bert", "roberta", "distilbert")},
}
POOLERS = {"bert": "dense_tanh", "roberta": "drop_dense_tanh", "distilbert": "dense_relu"}  # their classifiers'
CLASSIFIER_KEYS = r"(pre_)?classifier\..*|score\..*"  # the keys of any classifier (full match, prefix removed)

_ROTARY = [r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"]  # RoPE frequencies, rebuilt from rope_theta
IGNORED = {  # full-match regexes of keys skipped on purpose, and why
    "gpt2": [r"h\.\d+\.attn\.(bias|masked_bias)"],  # causal-mask buffers of older checkpoints
    "bert": [r"embeddings\.position_ids",  # a buffer 0..P-1
             r"pooler\..*",  # the [CLS] tanh layer of next-sentence prediction (read only with a classifier)
             r"cls\..*"],  # MLM / NSP pretraining heads; our BERT LM head is the bare tied embedding
    "roberta": [r"embeddings\.(position_ids|token_type_ids)", r"pooler\..*",
                r"lm_head\..*"],  # RobertaForMaskedLM's dense + LayerNorm + decoder: not our bare tied head
    "distilbert": [r"embeddings\.position_ids", r"vocab_(transform|layer_norm|projector)\..*"],  # the MLM head
    **{family: _ROTARY for family in HF_RULES if family not in ("gpt2", "bert", "roberta", "distilbert")},
}


def hf_module_names(flavor: str) -> dict[str, str]:
    """Our module -> the transformers module holding its weights (under HF_PREFIXES[flavor]), read off
    the rename rules in their order, so every HF name is written once, in the rules. For gpt2:
    {"tok_emb": "wte", ..., "blocks.{i}.attn.q": "h.{i}.attn.c_attn", "blocks.{i}.attn.k": "h.{i}.attn.c_attn",
    "blocks.{i}.attn.v": "h.{i}.attn.c_attn", "blocks.{i}.attn.o": "h.{i}.attn.c_proj", ...}. Modules cut
    from one fused module (q, k, v from c_attn) follow each other in the order the rule cuts them, which
    is their row order in it. peft_format/ names the layers of peft adapters with this."""
    names = {}
    for theirs, ours, _ in HF_RULES[flavor]:
        for template in our_names(ours):
            names.setdefault(_module_of(template), _module_of(theirs))
    return names


def _module_of(template: str) -> str:
    """"h.{i}.ln_1.{p}" -> "h.{i}.ln_1": a tensor's name without its last part (weight, bias)."""
    return template.rsplit(".", 1)[0]


# ---------------------------------------------------------------------------------------------
# HF folders: config.json -> ModelConfig fields


def _require(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{source}: {message}")


HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu",
                  "swish": "silu"}


def _activation(name: str, source: str) -> str:
    _require(name in HF_ACTIVATIONS, source, f"activation {name!r} is not supported; supported: "
             f"{', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def _gpt2_config(c: dict, folder: Path, source: str) -> dict:
    _require(c.get("scale_attn_weights", True) and not c.get("scale_attn_by_inverse_layer_idx", False),
             source, "only the standard 1/sqrt(head_dim) attention scaling is supported")
    return dict(flavor="gpt2", vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                d_model=c["n_embd"], d_ff=c.get("n_inner"), max_seq_len=c["n_positions"],
                act=_activation(c.get("activation_function", "gelu_new"), source),
                norm_eps=c["layer_norm_epsilon"], tie_embeddings=c.get("tie_word_embeddings", True),
                # we have one dropout rate where GPT-2 has three (usually all equal)
                dropout=max(c.get("resid_pdrop", 0.0), c.get("attn_pdrop", 0.0), c.get("embd_pdrop", 0.0)),
                pad_token_id=_causal_pad_id(c))


def _causal_pad_id(c: dict) -> int:
    """The pad id of a decoder: config.json's pad_token_id, else its (first) eos_token_id, the id transformers
    users pad with, else 0. A causal classifier skips trailing pad ids (model.last_real), and 0 is a real token
    in many vocabularies ("!" in GPT-2's, Qwen's, Llama 3's): a text ending in it would lose its last token."""
    if c.get("pad_token_id") is not None:
        return c["pad_token_id"]
    eos = c.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return eos if isinstance(eos, int) and 0 <= eos < c["vocab_size"] else 0


def _bert_config(c: dict, folder: Path, source: str) -> dict:
    """BERT and RoBERTa (whose positions start at padding_idx + 1); is_decoder makes their attention causal."""
    _require(c.get("position_embedding_type", "absolute") == "absolute", source,
             "only absolute position embeddings are supported")
    family = HF_MODEL_TYPES[c["model_type"]]
    pad = c.get("pad_token_id") or 0
    offset = pad + 1 if family == "roberta" else 0
    return dict(flavor=family, vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"],
                n_head=c["num_attention_heads"], d_model=c["hidden_size"], d_ff=c["intermediate_size"],
                max_seq_len=c["max_position_embeddings"] - offset, pos_offset=offset,
                type_vocab_size=c.get("type_vocab_size", 2), act=_activation(c.get("hidden_act", "gelu"), source),
                norm_eps=c.get("layer_norm_eps", 1e-12), dropout=c.get("hidden_dropout_prob", 0.0),
                tie_embeddings=True, pad_token_id=pad, pool=_bert_pooling(folder), causal=bool(c.get("is_decoder")))


def _distilbert_config(c: dict, folder: Path, source: str) -> dict:
    return dict(flavor="distilbert", vocab_size=c["vocab_size"], n_layer=c["n_layers"], n_head=c["n_heads"],
                d_model=c["dim"], d_ff=c["hidden_dim"], max_seq_len=c["max_position_embeddings"],
                act=_activation(c.get("activation", "gelu"), source), norm_eps=1e-12,  # fixed in DistilBERT
                dropout=c.get("dropout", 0.0), tie_embeddings=True, pad_token_id=c.get("pad_token_id") or 0,
                pool=_bert_pooling(folder))


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


ROPE_FIELDS = {"linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _rope_settings(c: dict, source: str, layer_type: str | None = None) -> dict:
    """rope_theta, rope_scaling and rope_fraction. transformers 5 keeps them in rope_parameters (per
    layer type for Gemma 3); older files at the top level, with rope_scaling beside them."""
    params = c.get("rope_parameters") or {}
    params = (params.get(layer_type) or {}) if layer_type in params else params
    old = c.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or old.get("rope_type") or old.get("type") or "default"
    _require(rope_type in ("default", *ROPE_SCALINGS), source, f"RoPE scaling {rope_type!r} is not supported; "
             f"supported: default, {', '.join(ROPE_SCALINGS)}")
    scaling = None if rope_type == "default" else \
        {"rope_type": rope_type, **{k: {**old, **params}[k] for k in ROPE_FIELDS[rope_type]}}
    return dict(rope_theta=params.get("rope_theta", c.get("rope_theta", 10000.0)), rope_scaling=scaling,
                rope_fraction=params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)))


def _layer_pattern(c: dict, family: str) -> str | None:
    """Which layers slide ("S") and which see everything ("F"), from layer_types (transformers 5),
    sliding_window_pattern (older Gemma 3) or Qwen's max_window_layers; None: the family's row."""
    if c.get("layer_types"):
        return "".join("S" if t == "sliding_attention" else "F" for t in c["layer_types"])
    if c.get("sliding_window_pattern"):
        return "S" * (c["sliding_window_pattern"] - 1) + "F"
    if family in ("qwen2", "qwen3"):
        first = c.get("max_window_layers", c["num_hidden_layers"])
        return "F" * first + "S" * (c["num_hidden_layers"] - first)
    return None


def _hf_activation(c: dict, family: str) -> str:
    """Gemma 2 and 3 name their activation hidden_activation (transformers ignores their hidden_act);
    Gemma 1 hidden_act, whose legacy "gelu" transformers takes for tanh-GELU (files of transformers 4 may
    name it hidden_activation instead); the others hidden_act."""
    if family in ("gemma2", "gemma3"):
        return c.get("hidden_activation") or "gelu_pytorch_tanh"
    if family == "gemma":
        act = c.get("hidden_act") or c.get("hidden_activation") or "gelu_pytorch_tanh"
        return "gelu_pytorch_tanh" if act == "gelu" else act
    return c.get("hidden_act", "silu")


# config.json fields that only some families' transformers classes read; the others ignore them (their bias
# terms are fixed, all their layers attend alike), so they are dropped before reading. Mistral: transformers'
# Auto classes load a Mistral config with layer_types as a Ministral, whose layers follow them
ONLY_READ_BY = {"attention_bias": ("llama", "qwen3", "gemma", "gemma2", "gemma3"), "mlp_bias": ("llama",),
                "layer_types": ("mistral", "qwen2", "qwen3", "gemma2", "gemma3"), "sliding_window_pattern": ("gemma3",)}


def _decoder_config(c: dict, folder: Path, source: str) -> dict:
    """Llama and the families that follow its config layout (Mistral, Qwen2/3, Phi-3, Gemma 1/2/3)."""
    family = HF_MODEL_TYPES[c["model_type"]]
    c = {field: value for field, value in c.items() if family in ONLY_READ_BY.get(field, (family,))}
    _require(not c.get("use_bidirectional_attention"), source, "bidirectional attention is not supported")
    uses_window = c.get("use_sliding_window", True)  # Qwen (HF_DEFAULTS): the window is off unless this is set
    config = dict(
        flavor=family, vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"],
        n_head=c["num_attention_heads"], n_kv_head=c.get("num_key_value_heads") or c["num_attention_heads"],
        d_model=c["hidden_size"], d_ff=c["intermediate_size"], head_dim=c.get("head_dim"),
        max_seq_len=c["max_position_embeddings"], norm_eps=c.get("rms_norm_eps", 1e-6),
        act=_activation(_hf_activation(c, family), source),
        tie_embeddings=c.get("tie_word_embeddings", family.startswith("gemma")),
        dropout=max(c.get("attention_dropout", 0.0), c.get("resid_pdrop", 0.0), c.get("embd_pdrop", 0.0)),
        pad_token_id=_causal_pad_id(c), sliding_window=c.get("sliding_window") if uses_window else None,
        layer_pattern=_layer_pattern(c, family),
        **_rope_settings(c, source, "full_attention" if family == "gemma3" else None))
    _require(family == "phi3" or config["rope_fraction"] == 1, source, f"partial_rotary_factor "
             f"{config['rope_fraction']} is not supported: transformers' {family} applies RoPE to whole heads")
    if "attention_bias" in c:  # q, k, v and o together
        config.update(qkv_bias=bool(c["attention_bias"]), o_bias=bool(c["attention_bias"]))
    if "mlp_bias" in c:
        config["mlp_bias"] = bool(c["mlp_bias"])
    if family in ("gemma2", "gemma3"):  # 0: no soft-cap (None would mean the family's default)
        # transformers' Gemma 3 caps the final logits only, whatever its config says of attention logits
        attn_softcap = c.get("attn_logit_softcapping") if family == "gemma2" else None
        config.update(attn_scale=c.get("query_pre_attn_scalar"), attn_softcap=attn_softcap or 0.0,
                      final_softcap=c.get("final_logit_softcapping") or 0.0)
    if family == "gemma3":  # the sliding layers' own RoPE: rope_parameters' entry, or (older files) an unscaled
        # one of base rope_local_base_freq, rope_scaling being the full layers' only
        if "sliding_attention" in (c.get("rope_parameters") or {}):
            local = _rope_settings(c, source, "sliding_attention")
            _require(local["rope_scaling"] is None, source, "scaled RoPE on sliding layers is not supported")
            config["rope_local_theta"] = local["rope_theta"]
        else:
            config["rope_local_theta"] = c.get("rope_local_base_freq", 10_000.0)
    return config


# what transformers' config class of a family assumes for a field config.json leaves out, where that is not the
# fallback the readers above use (a file written by hand or by an older tool may leave any field out)
HF_DEFAULTS = {
    "roberta": dict(pad_token_id=1),
    "mistral": dict(sliding_window=4096),
    "qwen2": dict(use_sliding_window=False, max_window_layers=28),
    "qwen3": dict(use_sliding_window=False, max_window_layers=28),
    "phi3": dict(rms_norm_eps=1e-5),
    "gemma2": dict(sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3": dict(sliding_window=4096, query_pre_attn_scalar=256, rope_theta=1_000_000.0),
}

HF_CONFIGS = {"gpt2": _gpt2_config, "bert": _bert_config, "roberta": _bert_config, "distilbert": _distilbert_config,
              **{t: _decoder_config for t in HF_MODEL_TYPES if t not in ("gpt2", "bert", "roberta", "distilbert")}}


def _config_json(folder: Path) -> dict:
    """An HF folder's config.json as it is written; an error naming the file if it is missing or unreadable."""
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{folder} is not an HF model folder: it has no config.json")
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(_corrupt(config_file, error)) from None


def read_hf_config(folder: Path, source: str | None = None, config: dict | None = None) -> tuple[str, dict]:
    """(family, ModelConfig fields) from an HF folder's config.json (`config`: its contents, if already read);
    ValueError naming what is wrong."""
    config_file = folder / "config.json"
    config = _config_json(folder) if config is None else config
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(HF_MODEL_TYPES)}")
    try:
        family = HF_MODEL_TYPES[model_type]
        with_defaults = {**HF_DEFAULTS.get(family, {}), **config}
        return family, HF_CONFIGS[model_type](with_defaults, folder, source or str(folder))
    except KeyError as error:
        raise ValueError(f"{config_file} has no {error.args[0]!r}, which a {model_type} config needs; "
                         "save the model's config again (transformers: model.config.save_pretrained(folder))"
                         ) from None


def _load_hf_folder(folder: Path, overrides: dict, source: str) -> tuple[Transformer, Tokenizer]:
    config = _config_json(folder)
    family, checkpoint_config = read_hf_config(folder, source, config)
    weights, layers_4bit = _read_hf_weights(folder), {}
    if quantized := config.get("quantization_config"):  # bnb_weights.py (and with it the 4-bit quantizer) loads only for such a folder
        from . import bnb_weights
        bnb_weights.check_quantization(quantized, family, source)
        weights, layers_4bit = bnb_weights.split_4bit(weights, hf_module_names(family), HF_PREFIXES[family],
                                                      IGNORED[family], source)
    if checkpoint_config["tie_embeddings"] and _own_lm_head(weights, family):
        checkpoint_config["tie_embeddings"] = False  # as transformers does, saying so in a warning
    classifier_rules = _trained_classifier(weights, family, checkpoint_config, overrides, source)
    model = build_model(checkpoint_config, overrides, source)
    load_weights(model, weights, HF_RULES[family] + classifier_rules, IGNORED[family], source, HF_PREFIXES[family])
    if layers_4bit:
        bnb_weights.install_4bit(model, layers_4bit, source)
    tokenizer = folder_tokenizer(folder, family)
    for key, value in read_hf_chat_settings(folder).items():  # chat_template, bos/eos token
        setattr(tokenizer, key, value)
    return model, tokenizer


def _trained_classifier(weights: Mapping[str, torch.Tensor], family: str, checkpoint_config: dict, overrides: dict,
                        source: str) -> list[Rule]:
    """The rules that read the checkpoint's classifier, [] without one. A …ForSequenceClassification's sets
    n_classes (its rows; a given n_classes must agree) and, for an encoder, the pooler on the first token;
    a classifier of another shape (a token classifier, ...) is refused rather than left out."""
    prefix, rules = HF_PREFIXES[family], CLASSIFIER_RULES[family]
    present = {key.removeprefix(prefix) for key in weights}
    keys = {key for key in present if re.fullmatch(CLASSIFIER_KEYS, key)}
    if not keys:
        return []
    wanted = {their.format(p=p) for their, _, _ in rules for p in ("weight", "bias")}
    _require(keys <= wanted <= present, source, f"its classifier ({', '.join(sorted(keys))}) is not the "
             f"…ForSequenceClassification head of a {family} ({', '.join(sorted(wanted))}), the one classifier "
             "minipeft reads; save the body alone (transformers: model.base_model.save_pretrained(folder)) and "
             "load that")
    rows = weights[their_name("score.weight", rules)].shape[0]
    _require(overrides.get("n_classes", rows) == rows, source, f"its trained classifier has {rows} classes, not "
             f"n_classes={overrides.get('n_classes')}; leave n_classes out to use it, or call "
             f"model.add_classifier({overrides.get('n_classes')}) after loading for a fresh head of that size (what "
             "transformers' ignore_mismatched_sizes=True does)")
    checkpoint_config["n_classes"] = rows
    if family in POOLERS:  # transformers' encoder classifiers read the first token through a dense layer
        checkpoint_config.update(pooler=POOLERS[family], pool="cls")
    return rules


def _own_lm_head(weights: Mapping[str, torch.Tensor], family: str) -> bool:
    """Whether the checkpoint has an LM head (lm_head.weight) that is not its token embeddings: transformers
    keeps such a head apart even where config.json ties the two (a .bin file of a tied model stores the head
    as an equal copy, which stays tied)."""
    if "lm_head.weight" not in weights:  # (no tensor is read from the file for a folder without one)
        return False
    embedding = their_name("tok_emb.weight", HF_RULES[family])
    stored = next((key for key in (HF_PREFIXES[family] + embedding, embedding) if key in weights), None)
    return stored is not None and not torch.equal(weights["lm_head.weight"], weights[stored])


def _read_hf_weights(folder: Path) -> Mapping[str, torch.Tensor]:
    """model.safetensors, its shards (model.safetensors.index.json), pytorch_model.bin or its shards."""
    for single, read in (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_bin)):
        if (folder / single).exists():
            return read(folder / single)
        index_file = folder / f"{single}.index.json"
        if index_file.exists():
            return _read_shards(index_file, read)
    raise FileNotFoundError(f"{folder} has no model.safetensors, pytorch_model.bin or a sharded index of them")


def _read_shards(index_file: Path, read) -> Mapping[str, torch.Tensor]:
    try:
        shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError) as error:
        raise ValueError(_corrupt(index_file, error)) from None
    missing = [s for s in shards if not (index_file.parent / s).exists()]
    if missing:
        raise ValueError(f"{index_file} names shard(s) {', '.join(missing)}, which the folder does not have; "
                         "download them again")
    return ChainMap(*(read(index_file.parent / shard) for shard in shards))


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile(Mapping):
    """A .safetensors file as a mapping whose tensors are read from disk one at a time, when asked for.

    The format: 8 bytes (little-endian) giving the header's length, the header (JSON: name -> dtype, shape,
    data_offsets into the data that follows), the data. Plain reads into a fresh buffer, not a memory map:
    a mapped file's pages count towards the resident size for as long as it stays mapped, so loading
    would hold the whole file besides the model. This way loading holds the model plus one tensor."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            self.start, self.header = 8 + length, header
            end = max((info["data_offsets"][1] for info in header.values()), default=0)
            bad = [k for k, info in header.items() if info["dtype"] not in SAFETENSORS_DTYPES]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(_corrupt(path, f"unreadable header: {error}")) from None
        if path.stat().st_size < self.start + end:
            raise ValueError(_corrupt(path, f"{path.stat().st_size:,} bytes, the header describes "
                                            f"{self.start + end:,}"))
        if bad:
            raise ValueError(f"{path}: tensor(s) {', '.join(bad)} have a dtype minipeft does not read")

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.header[name]
        begin, end = info["data_offsets"]
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            f.readinto(buffer)
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        if not buffer:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])

    def __contains__(self, name) -> bool:
        return name in self.header

    def __iter__(self):
        return iter(self.header)

    def __len__(self) -> int:
        return len(self.header)


def _read_safetensors(path: Path) -> Mapping[str, torch.Tensor]:
    return SafetensorsFile(path)


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(_corrupt(path, error)) from error


def _corrupt(path: Path, error: Exception) -> str:
    return f"{path} is corrupt or truncated ({error}); delete it and download again"



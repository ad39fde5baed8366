"""A model as the HF folder transformers' own class for its family loads (format "hf"):

    config.json              model_type, architectures and every field the family's config class reads
    model.safetensors        the weights under transformers' names and layouts; above `max_shard_bytes`,
                             model-0000i-of-0000n.safetensors + model.safetensors.index.json
    generation_config.json   bos / eos / pad token ids
    tokenizer.json, tokenizer_config.json   the tokenizer, its special tokens and chat template
    1_Pooling/config.json    mean-pooling encoders (sentence-transformers' file, which sets our `pool`)

The names are pretrained.py's rename rules read backwards (HF_RULES: each rule turns one of their
tensors into one or more of ours, so its inverse joins ours back into one of theirs):

    GPT-2       q, k, v -> c_attn (rows joined, then transposed to Conv1D's (in, out)); o, up, down -> Conv1D
    Phi-3       q, k, v -> qkv_proj (rows [q | k | v]);  gate, up -> gate_up_proj (rows [gate | up])
    the rest    one tensor each, as stored (Gemma's norms hold w, as transformers' x·(1 + w) wants)

Which class: the language model (GPT2LMHeadModel, LlamaForCausalLM, Gemma3ForCausalLM, ...), the bare
body for the encoders (BertModel, RobertaModel, DistilBertModel: our encoder LM head is the bare tied
embedding, so only the hidden states are theirs), or a …ForSequenceClassification: a decoder's, whose
`score` is our classifier head (it has no bias, so a head whose bias moved off zero is refused), or an
encoder's, whose classifier is our pooler and head (a fine-tuned checkpoint's: families.py, the poolers;
a fresh one-layer head on the pooled state has no such class and is refused).

Before any weight is written, the config is read back with pretrained.py's own reader: a setting the
family's config cannot express (a sliding window on Llama, a q/k/v bias without o's on Llama, ...)
stops the export with its name, instead of a folder that loads as another model.
"""
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from minipeft.formats import chat
from minipeft.core.model import ModelConfig
from minipeft.peft_format import TRANSFORMERS_MODELS
from minipeft.formats.pretrained import (CLASSIFIER_RULES, HF_CONFIGS, HF_MODEL_TYPES, HF_PREFIXES, HF_RULES, POOLERS,
    _conv1d, _split_c_attn_bias, _split_c_attn_weight, _split_gate_up, _split_qkv)

MAX_SHARD_BYTES = 2 * 2**30  # a safetensors file holds at most this much; more goes into shards
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_TYPES = {family: model_type for model_type, family in HF_MODEL_TYPES.items()}
ENCODERS = ("bert", "roberta", "distilbert")
ENCODER_CLASSIFIERS = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
                       "distilbert": "DistilBertForSequenceClassification"}  # with the family's pooler (POOLERS)

# each rule's transform (theirs -> ours) and its inverse (ours -> theirs: the tensors in the rule's order)
INVERSES = {
    None: lambda ts, cfg: ts[0],
    _conv1d: lambda ts, cfg: ts[0].t(),
    _split_c_attn_weight: lambda ts, cfg: torch.cat(ts).t(),  # (3d, d) -> Conv1D (d, 3d)
    _split_c_attn_bias: lambda ts, cfg: torch.cat(ts),
    _split_qkv: lambda ts, cfg: torch.cat(ts),
    _split_gate_up: lambda ts, cfg: torch.cat(ts),
}


# ---------------------------------------------------------------------------------------------
# config.json


def class_name(cfg: ModelConfig) -> str:
    """The transformers class of the export (ValueError where transformers has none that fits)."""
    if cfg.n_classes and cfg.pooler == POOLERS.get(cfg.flavor):  # a fine-tuned encoder classifier's
        return ENCODER_CLASSIFIERS[cfg.flavor]
    key = (cfg.flavor, bool(cfg.n_classes))
    if key not in TRANSFORMERS_MODELS or cfg.pooler != "none":
        raise ValueError(f"a {cfg.flavor} classifier with pooler {cfg.pooler!r} has no transformers class that "
                         "computes what minipeft's does (an encoder's …ForSequenceClassification reads [CLS] through "
                         "its family's pooler, which only a fine-tuned checkpoint's classifier brings), so format "
                         "'hf' cannot hold it; keep it as an adapter (mp.save_adapter) or export the model without "
                         "n_classes")
    return TRANSFORMERS_MODELS[key][0]


def _activation(cfg: ModelConfig) -> str:
    return {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}[cfg.act]


def _gpt2_fields(cfg: ModelConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_inner=cfg.d_ff, n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                activation_function="gelu_new" if cfg.act == "gelu_tanh" else cfg.act,
                resid_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                scale_attn_weights=True, tie_word_embeddings=cfg.tie_embeddings)


def _encoder_fields(cfg: ModelConfig) -> dict:
    if cfg.flavor == "distilbert":
        return dict(vocab_size=cfg.vocab_size, dim=cfg.d_model, n_layers=cfg.n_layer, n_heads=cfg.n_head,
                    hidden_dim=cfg.d_ff, max_position_embeddings=cfg.max_seq_len, activation=cfg.act,
                    dropout=cfg.dropout, attention_dropout=cfg.dropout, seq_classif_dropout=cfg.dropout,
                    sinusoidal_pos_embds=False)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff, hidden_act=_activation(cfg),
                max_position_embeddings=cfg.max_seq_len + cfg.pos_offset, type_vocab_size=cfg.type_vocab_size,
                layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=cfg.dropout,
                attention_probs_dropout_prob=cfg.dropout, position_embedding_type="absolute")


def _rope_parameters(cfg: ModelConfig) -> dict:
    """transformers 5's rope_parameters (Gemma 3: one entry per layer type)."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    if cfg.flavor == "gemma3":
        return {"full_attention": rope, "sliding_attention": {"rope_type": "default",
                                                              "rope_theta": cfg.rope_local_theta}}
    return rope


# the fields each decoder family's config class has beyond the ones they all share
_DECODER_EXTRAS = {
    "llama": ("head_dim", "attention_bias", "mlp_bias"),
    "mistral": ("head_dim", "sliding_window"),
    "qwen2": ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types"),
    "qwen3": ("head_dim", "attention_bias", "sliding_window", "use_sliding_window", "max_window_layers",
              "layer_types"),
    "phi3": ("sliding_window", "partial_rotary_factor", "resid_pdrop", "embd_pdrop"),  # RoPE on part of each head
    "gemma": ("head_dim", "attention_bias", "hidden_activation"),
    "gemma2": ("head_dim", "attention_bias", "hidden_activation", "sliding_window", "layer_types",
               "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"),
}
_DECODER_EXTRAS["gemma3"] = _DECODER_EXTRAS["gemma2"]


def _whole(x: float) -> int | float:
    """12.0 -> 12: transformers' config classes check that integer fields hold ints."""
    return int(x) if float(x).is_integer() else x


def _decoder_fields(cfg: ModelConfig) -> dict:
    windows = [cfg.window(i) for i in range(cfg.n_layer)]
    sliding = any(w is not None for w in windows)
    needs_window = sliding or cfg.flavor in ("gemma2", "gemma3")  # Gemma's configs want one even if unused
    possible = dict(
        head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias,
        sliding_window=(cfg.sliding_window or cfg.max_seq_len) if needs_window else None, use_sliding_window=sliding,
        max_window_layers=cfg.n_layer, layer_types=["sliding_attention" if w else "full_attention" for w in windows],
        partial_rotary_factor=cfg.rope_fraction, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
        hidden_activation=_activation(cfg), query_pre_attn_scalar=_whole(cfg.attn_scale or cfg.head_dim),
        attn_logit_softcapping=cfg.attn_softcap or None, final_logit_softcapping=cfg.final_softcap or None)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act=_activation(cfg),
                tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout,
                rope_parameters=_rope_parameters(cfg),
                **{key: possible[key] for key in _DECODER_EXTRAS[cfg.flavor]})


def hf_config(cfg: ModelConfig, dtype: str, token_ids: dict) -> dict:
    """config.json of the export: the family's fields, the class, the token ids, the labels."""
    family = cfg.flavor
    fields = _gpt2_fields(cfg) if family == "gpt2" else _encoder_fields(cfg) if family in ENCODERS \
        else _decoder_fields(cfg)
    pad = cfg.pos_offset - 1 if family == "roberta" else cfg.pad_token_id  # RoBERTa: positions start at pad + 1
    config = {"model_type": MODEL_TYPES[family], "architectures": [class_name(cfg)], **fields,
              "pad_token_id": pad, "bos_token_id": token_ids.get("bos"), "eos_token_id": token_ids.get("eos"),
              "dtype": str(DTYPES[dtype]).removeprefix("torch.")}
    if cfg.n_classes:
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.n_classes)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(cfg.n_classes)}
    return config


def behaviour(cfg: ModelConfig) -> dict:
    """What a config makes the model compute: its fields, with the ones that only matter together
    (a window and which layers slide, a default and its value) replaced by their effect."""
    fields = {k: v for k, v in asdict(cfg).items()
              if k not in ("extra", "dropout", "pad_token_id", "sliding_window", "layer_pattern", "attn_scale")}
    fields.update(windows=[cfg.window(i) for i in range(cfg.n_layer)], attn_scale=cfg.attn_scale or cfg.head_dim,
                  attn_softcap=cfg.attn_softcap or 0.0, final_softcap=cfg.final_softcap or 0.0)
    if cfg.causal:
        fields.pop("pool")  # causal classifiers read the last token, whatever `pool` says
    if not cfg.rope_local_theta or not any(fields["windows"]):
        fields.pop("rope_local_theta")
    return fields


def unheld(cfg: ModelConfig, read_back: dict) -> list[str]:
    """The settings of `cfg` that a config read back as `read_back` (ModelConfig fields) lost."""
    again = behaviour(ModelConfig(**{**read_back, "n_classes": cfg.n_classes, "pooler": cfg.pooler}))
    return [f"{key}={value!r}" for key, value in behaviour(cfg).items() if again.get(key) != value]


def check_config_holds(cfg: ModelConfig, config: dict, folder: Path) -> None:
    """ValueError naming what config.json cannot express, read back by pretrained.py's reader."""
    read_back = HF_CONFIGS[config["model_type"]](config, folder, str(folder))
    if lost := unheld(cfg, read_back):
        raise ValueError(f"a {cfg.flavor} config.json cannot hold {', '.join(lost)} (transformers' "
                         f"{config['architectures'][0]} has no such setting), so format 'hf' would load another "
                         "model; keep it as an adapter (mp.save_adapter) on its base")


# ---------------------------------------------------------------------------------------------
# tensors


def _placed(template: str, values: dict) -> str:
    return template.format(**values) if values else template


def _expansions(their: str, cfg: ModelConfig) -> list[dict]:
    """Every {i} (layer) and {p} (weight, bias) a rule's template stands for."""
    layers = [{"i": i} for i in range(cfg.n_layer)] if "{i}" in their else [{}]
    kinds = [{"p": p} for p in ("weight", "bias")] if "{p}" in their else [{}]
    return [{**layer, **kind} for layer in layers for kind in kinds]


def hf_tensors(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights (merged_weights) -> transformers' state dict for class_name(cfg)."""
    family = cfg.flavor
    body = "" if family in ENCODERS and not cfg.n_classes else HF_PREFIXES[family]  # BertModel's names: no prefix
    rules = [r for r in HF_RULES[family] if r[0] != "lm_head.weight"]
    if cfg.n_classes:
        if family not in ENCODERS and weights["head.bias"].abs().max() > 0:
            raise ValueError(f"{class_name(cfg)}'s score layer has no bias, but this classifier head's bias is "
                             "non-zero, so format 'hf' would compute other logits; keep it as an adapter "
                             "(mp.save_adapter)")
        # pretrained.py reads the classifier's last layer as "score" and puts it in as our head
        rules += [(theirs, ours.replace("score.", "head."), t) for theirs, ours, t in CLASSIFIER_RULES[family]]
    elif not cfg.tie_embeddings:
        rules += [r for r in HF_RULES[family] if r[0] == "lm_head.weight"]
    theirs, used = {}, set()
    for their, ours, transform in rules:
        ours = (ours,) if isinstance(ours, str) else ours
        for values in _expansions(their, cfg):
            names = [_placed(o, values) for o in ours]
            if not all(n in weights for n in names):
                continue
            key = _placed(their, values)
            outside_body = key.startswith(("lm_head.", "score.", "classifier.", "pre_classifier."))
            theirs[key if outside_body else body + key] = INVERSES[transform]([weights[n] for n in names], cfg)
            used.update(names)
    left = sorted(weights.keys() - used - {"head.weight", "head.bias"})
    assert not left, f"no rule writes {left}"  # every parameter of every family has a rule
    return theirs


def _cast(key: str, tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """`tensor` in `dtype` (ValueError when a finite value overflows it: fp16 holds at most 65504)."""
    cast = tensor.to(DTYPES[dtype]).contiguous()
    if not torch.isfinite(cast).all() and torch.isfinite(tensor).all():
        raise ValueError(f"{key} holds {tensor.abs().max().item():.3g}, beyond {dtype}'s largest value "
                         f"{torch.finfo(DTYPES[dtype]).max:.0f}, so the file would hold inf; export in bf16 or fp32")
    return cast


def write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, dtype: str,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """model.safetensors, or shards of at most max_shard_bytes and their index; returns the files."""
    cast = {key: _cast(key, tensor, dtype) for key, tensor in tensors.items()}
    shards, size = [{}], 0
    for key, tensor in cast.items():
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += tensor.nbytes
    if len(shards) == 1:
        save_file(cast, folder / "model.safetensors", metadata={"format": "pt"})
        return [folder / "model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, folder / name, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.nbytes for t in cast.values())},
             "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [folder / name for name in names] + [folder / "model.safetensors.index.json"]


# ---------------------------------------------------------------------------------------------
# tokenizer and generation settings


def special_token_ids(cfg: ModelConfig, tokenizer) -> dict:
    """{"bos", "eos"} ids: the ones the source file recorded, else the tokenizer's own tokens."""
    ids = {"bos": cfg.extra.get("bos_token_id"), "eos": cfg.extra.get("eos_token_id")}
    if tokenizer:
        for name, token in (("bos", getattr(tokenizer, "bos_token", None)), ("eos", chat.eos_token(tokenizer))):
            if ids[name] is None and token:
                ids[name] = tokenizer.token_to_id(token)
    return ids


def named_special_tokens(tokenizer, cfg: ModelConfig) -> dict:
    """{"bos_token": ..., "unk_token": ..., ...}: the named special tokens the loader recorded (chat.special_tokens),
    so that transformers names the same ones; the pad token the model's pad id's (batches pad as the model was
    trained), where the vocabulary has it."""
    named = {k: v for k, v in chat.special_tokens(tokenizer).items() if v}
    if cfg.pad_token_id < tokenizer.get_vocab_size():
        named["pad_token"] = tokenizer.id_to_token(cfg.pad_token_id)
    return named


def write_tokenizer(tokenizer, cfg: ModelConfig, folder: Path, chat_template=None) -> None:
    """tokenizer.json (the tokenizers library's own file) and tokenizer_config.json: its special tokens,
    the model's context length, its inputs (token types too, for a model that has them) and the chat template
    minipeft renders conversations with (the file `chat_template`, else the model's own, else the plain
    fallback a base model is tuned with)."""
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
                "clean_up_tokenization_spaces": False, **named_special_tokens(tokenizer, cfg)}
    if cfg.type_vocab_size > 1:  # BERT's segments: transformers' tokenizer hands the model a pair's token types
        settings["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    settings["chat_template"] = chat.chat_format(tokenizer, chat_template).template
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def write_hf(model, weights: dict[str, torch.Tensor], folder: Path, dtype: str, tokenizer=None,
             max_shard_bytes: int = MAX_SHARD_BYTES, chat_template=None) -> None:
    """The HF folder of `model` with `weights` (merged_weights) into the existing, empty `folder`."""
    cfg = model.cfg
    token_ids = special_token_ids(cfg, tokenizer)
    config = hf_config(cfg, dtype, token_ids)
    if cfg.flavor in ENCODERS and cfg.pool == "mean":  # read back by pretrained.py, as sentence-transformers does
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": cfg.d_model, "pooling_mode_mean_tokens": True,
             "pooling_mode_cls_token": False}, indent=2) + "\n")
    check_config_holds(cfg, config, folder)
    tensors = hf_tensors(cfg, weights)  # before any weight is written: refusals come first
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {key + "_token_id": value for key, value in token_ids.items() if value is not None}
    (folder / "generation_config.json").write_text(json.dumps(
        {**generation, "pad_token_id": config["pad_token_id"]}, indent=2) + "\n")
    if tokenizer:
        write_tokenizer(tokenizer, cfg, folder, chat_template)
    write_safetensors(tensors, folder, dtype, max_shard_bytes)

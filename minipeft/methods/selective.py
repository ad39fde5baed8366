"""Selective fine-tuning: train a chosen subset of the pretrained parameters, add nothing.

    full     every parameter                            (the baseline every PEFT method is judged by)
    head     the output head only                       "feature-based": the encoder is a frozen
                                                        feature extractor (Raschka, "Finetuning LLMs")
    last_k   the last `layers` blocks, ln_f and head    "fine-tuning II" in the same blog series
    bitfit   every bias term                            Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199

                 ┌ head ┐  ← head, last_k, full
                 │ ln_f │  ← last_k, full
    block n-1 …  │ ...  │  ← last_k (layers=k covers the top k blocks), full; bitfit: their biases
    block 0      │ ...  │  ← full; bitfit: biases
                 └ emb  ┘  ← full

Equation: none of its own; the model is unchanged and h = f(x; θ) with θ split into trainable and
frozen parts. Initialization: the pretrained values. Trainable parameters: the size of the chosen
subset (counted below from the config, independently of the modules).

A fresh classifier head is trainable under every method (registry.apply makes sure of that). A tied
LM head *is* the token embedding, so `head` and `last_k` on a tied LM train the embedding table.
"""
from .registry import Method, Option, register


def apply_full(model):
    for p in model.parameters():
        p.requires_grad_(True)


def apply_head(model):
    model.head.requires_grad_(True)


def apply_last_k(model, layers: int):
    if not 1 <= layers <= model.cfg.n_layer:
        raise ValueError(f"last_k needs 1 <= layers <= {model.cfg.n_layer}, got {layers}")
    for block in model.blocks[-layers:]:
        block.requires_grad_(True)
    if model.ln_f is not None:
        model.ln_f.requires_grad_(True)
    model.head.requires_grad_(True)


def apply_bitfit(model):
    if not model.cfg.bias:
        raise ValueError(f"bitfit trains bias terms, and a {model.cfg.flavor} model has none; "
                         "choose another method (e.g. lora)")
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.requires_grad_(True)


# --- parameter-count formulas, from the config alone --------------------------------------------
# Each counts what the method itself trains; a fresh classifier head is added on top by registry.apply.

def _linear(n_in, n_out, bias):
    return n_in * n_out + (n_out if bias else 0)


def _norm(cfg):
    return cfg.d_model * (1 if cfg.flavor == "llama" else 2)  # RMSNorm: weight; LayerNorm: + bias


def block_parameter_count(cfg) -> int:
    d, f, b = cfg.d_model, cfg.d_ff, cfg.bias
    kv = cfg.n_kv_head * cfg.head_dim
    attention = 2 * _linear(d, d, b) + 2 * _linear(d, kv, b)
    mlp = _linear(d, f, b) + _linear(f, d, b) + (_linear(d, f, False) if cfg.flavor == "llama" else 0)
    return attention + mlp + 2 * _norm(cfg)


def lm_head_parameter_count(cfg) -> int:
    """The LM head (the token embedding itself when tied); 0 for a classifier, counted separately."""
    return 0 if cfg.n_classes else cfg.vocab_size * cfg.d_model


def final_norm_parameter_count(cfg) -> int:
    return 0 if cfg.flavor == "bert" else _norm(cfg)


def full_parameter_count(cfg, **_) -> int:
    d = cfg.d_model
    embeddings = cfg.vocab_size * d
    if cfg.flavor in ("gpt2", "bert"):
        embeddings += cfg.max_seq_len * d
    if cfg.flavor == "bert":
        embeddings += cfg.type_vocab_size * d + _norm(cfg)
    untied_head = 0 if cfg.tie_embeddings else lm_head_parameter_count(cfg)
    return embeddings + cfg.n_layer * block_parameter_count(cfg) + final_norm_parameter_count(cfg) + \
        untied_head


def head_parameter_count(cfg, **_) -> int:
    return lm_head_parameter_count(cfg)


def last_k_parameter_count(cfg, layers: int, **_) -> int:
    return layers * block_parameter_count(cfg) + final_norm_parameter_count(cfg) + \
        lm_head_parameter_count(cfg)


def bitfit_parameter_count(cfg, **_) -> int:
    d, f = cfg.d_model, cfg.d_ff
    kv = cfg.n_kv_head * cfg.head_dim
    per_block = (d + kv + kv + d) + (f + d) + 2 * d  # q k v o, up down, the two LayerNorm biases
    embedding_norm = d if cfg.flavor == "bert" else 0
    final_norm = d if cfg.flavor == "gpt2" else 0
    return cfg.n_layer * per_block + embedding_norm + final_norm


register(Method("full", "every parameter (the baseline)", apply_full, full_parameter_count, lr=5e-5))
register(Method("head", "the output head only: the encoder is a frozen feature extractor",
                apply_head, head_parameter_count))
register(Method("last_k", "the top `layers` blocks, the final norm and the head", apply_last_k,
                last_k_parameter_count, (Option("layers", int, 2, "how many of the top blocks to train"),),
                lr=1e-4, examples=({}, {"layers": 1})))
register(Method("bitfit", "every bias term (Ben Zaken et al. 2021)", apply_bitfit, bitfit_parameter_count,
                flavors=("gpt2", "bert")))

"""Selective fine-tuning: train a chosen subset of the pretrained parameters, add nothing.

    full     every parameter                            (the baseline every PEFT method is judged by)
    head     the output head only                       "feature-based": a frozen encoder (Raschka, "Finetuning LLMs")
    last_k   the last `layers` blocks, ln_f and head    "fine-tuning II" in the same blog series
    bitfit   every bias term                            Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199

                 ┌ head ┐  ← head, last_k, full
                 │ ln_f │  ← last_k, full
    block n-1 …  │ ...  │  ← last_k (layers=k covers the top k blocks), full; bitfit: their biases
    block 0      │ ...  │  ← full; bitfit: biases
                 └ emb  ┘  ← full

No equation of its own: the model is unchanged, h = f(x; θ) with θ split into trainable and frozen parts,
initialized at the pretrained values. Trainable parameters: the chosen subset's size, counted below from the
config's switches (model.py) alone, never from the modules or family names: one formula serves every family.

A fresh classifier head trains under every method (registry.apply adds it on top of these counts). A tied
LM head *is* the token embedding, so `head` and `last_k` on a tied LM train the embedding table.
"""
from .model import FAMILIES, ModelConfig
from .registry import Method, Option, register


def apply_full(model):
    model.requires_grad_(True)


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
    if not model.cfg.has_biases:
        raise ValueError(f"bitfit trains bias terms, and a {model.cfg.flavor} model has none; "
                         "choose another method (e.g. lora)")
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.requires_grad_(True)


def _linear(n_in, n_out, bias):
    return n_in * n_out + (n_out if bias else 0)


def _norm(cfg, dim=None):
    """One norm over `dim` (default d_model) features: LayerNorm has a weight and a bias, RMSNorm a weight."""
    return (dim or cfg.d_model) * (2 if cfg.norm == "layernorm" else 1)


def _norms_per_block(cfg) -> int:
    return 4 if cfg.norm_place == "sandwich" else 2  # ln1, ln2 (+ ln1_post, ln2_post)


def block_parameter_count(cfg) -> int:
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    q_out, kv = cfg.n_head * hd, cfg.n_kv_head * hd
    attention = _linear(d, q_out, cfg.qkv_bias) + 2 * _linear(d, kv, cfg.qkv_bias) + _linear(q_out, d, cfg.o_bias)
    qk_norms = 2 * _norm(cfg, hd) if cfg.qk_norm else 0
    mlp = (2 if cfg.gated else 1) * _linear(d, f, cfg.mlp_bias) + _linear(f, d, cfg.mlp_bias)  # (gate,) up, down
    return attention + qk_norms + mlp + _norms_per_block(cfg) * _norm(cfg)


def head_parameter_count(cfg, **_) -> int:
    """The LM head (the token embedding itself when tied); 0 for a classifier, counted separately."""
    return 0 if cfg.n_classes else cfg.vocab_size * cfg.d_model


def final_norm_parameter_count(cfg) -> int:
    return 0 if cfg.norm_place == "post" else _norm(cfg)  # post-norm blocks end normalized: no ln_f


def full_parameter_count(cfg, **_) -> int:
    d = cfg.d_model
    embeddings = cfg.vocab_size * d + cfg.type_vocab_size * d + (_norm(cfg) if cfg.emb_norm else 0)
    if cfg.positions == "learned":
        embeddings += (cfg.pos_offset + cfg.max_seq_len) * d
    untied_head = 0 if cfg.tie_embeddings else head_parameter_count(cfg)
    return embeddings + cfg.n_layer * block_parameter_count(cfg) + final_norm_parameter_count(cfg) + untied_head


def last_k_parameter_count(cfg, layers: int, **_) -> int:
    return layers * block_parameter_count(cfg) + final_norm_parameter_count(cfg) + head_parameter_count(cfg)


def bitfit_parameter_count(cfg, **_) -> int:
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    q_out, kv = cfg.n_head * hd, cfg.n_kv_head * hd
    norm_bias = d if cfg.norm == "layernorm" else 0  # RMSNorm has none
    per_block = (q_out + 2 * kv if cfg.qkv_bias else 0) + (d if cfg.o_bias else 0) \
        + ((2 if cfg.gated else 1) * f + d if cfg.mlp_bias else 0) \
        + _norms_per_block(cfg) * norm_bias + (2 * hd if cfg.qk_norm and norm_bias else 0)
    embedding_norm = norm_bias if cfg.emb_norm else 0
    final_norm = norm_bias if cfg.norm_place != "post" else 0
    return cfg.n_layer * per_block + embedding_norm + final_norm


# bitfit fits the families with bias terms somewhere (gpt2, the encoders, qwen2's q, k, v)
BIASED_FAMILIES = tuple(f for f in FAMILIES if ModelConfig(flavor=f).has_biases)

register(Method("full", "every parameter (the baseline)", apply_full, full_parameter_count, lr=5e-5))
register(Method("head", "the output head only: the encoder is a frozen feature extractor",
                apply_head, head_parameter_count))
register(Method("last_k", "the top `layers` blocks, the final norm and the head", apply_last_k,
                last_k_parameter_count, (Option("layers", int, 2, "how many of the top blocks to train"),),
                lr=1e-4, examples=({}, {"layers": 1})))
register(Method("bitfit", "every bias term (Ben Zaken et al. 2021)", apply_bitfit, bitfit_parameter_count,
                flavors=BIASED_FAMILIES))

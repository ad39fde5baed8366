"""Selective fine-tuning (methods/selective.py): full, head, last_k and bitfit train exactly the
parameters the file's docstring names, on every flavour each one fits, and their parameter-count
formulas equal the real counts, on the tiny models and on real model shapes built on the meta device.

The expected names are written out here from the docstring, independently of selective.py. A tied LM
head *is* the token embedding, so it trains under the name `tok_emb.weight`.
"""
import pytest
import torch

import minipeft as mp
from minipeft.core import adapted
from minipeft.core import selective
from conftest import FLAVORS, tiny_model

HEADS = {"lm": None, "classifier": 2}


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def head_names(model) -> set[str]:
    """The output head's parameters, as named_parameters names them."""
    if model.cfg.n_classes:
        return {"head.weight", "head.bias"}
    return {"tok_emb.weight"} if model.cfg.tie_embeddings else {"head.weight"}


def expected_names(model, method: str, layers: int = 2) -> set[str]:
    names = {name for name, _ in model.named_parameters()}
    if method == "full":
        return names
    if method == "head":
        return head_names(model)
    if method == "last_k":
        top = tuple(f"blocks.{i}." for i in range(model.cfg.n_layer - layers, model.cfg.n_layer))
        return {n for n in names if n.startswith(top) or n.startswith("ln_f.")} | head_names(model)
    # bitfit: every bias; a fresh classifier head trains whole under every method
    classifier = head_names(model) if model.cfg.n_classes else set()
    return {n for n in names if n.endswith(".bias")} | classifier


CASES = [(method, options, flavor, head)
         for method, options in [("full", {}), ("head", {}), ("last_k", {"layers": 1}), ("last_k", {"layers": 2}),
                                 ("bitfit", {})]
         for flavor in FLAVORS if flavor in mp.METHODS[method].flavors
         for head in HEADS]


@pytest.mark.parametrize("method, options, flavor, head", CASES,
                         ids=[f"{m}{o.get('layers', '')}-{f}-{h}" for m, o, f, h in CASES])
def test_trains_exactly_the_documented_parameters(method, options, flavor, head):
    model = mp.apply(tiny_model(flavor, n_classes=HEADS[head]), method, **options)
    expected = expected_names(model, method, **options)
    assert trainable_names(model) == expected
    assert adapted.expected_trainable_parameters(model) == model.num_parameters(trainable_only=True)
    everything = method == "last_k" and options["layers"] == model.cfg.n_layer and model.cfg.tie_embeddings
    if method != "full" and not everything:  # (every block and a head that is the embedding: all of it)
        assert len(expected) < len(list(model.parameters())), "something must stay frozen"


def test_the_documented_parameters_are_the_ones_we_think():
    """Spot checks of the name rules above on concrete parameters."""
    gpt2 = mp.apply(tiny_model("gpt2"), "bitfit")
    assert {"blocks.0.attn.q.bias", "blocks.1.mlp.down.bias", "blocks.0.ln1.bias", "ln_f.bias"} <= trainable_names(gpt2)
    assert not {"blocks.0.attn.q.weight", "ln_f.weight", "tok_emb.weight"} & trainable_names(gpt2)
    bert = mp.apply(tiny_model("bert"), "bitfit")
    assert "emb_ln.bias" in trainable_names(bert) and "pos_emb.weight" not in trainable_names(bert)
    qwen2 = mp.apply(tiny_model("qwen2"), "bitfit")  # biases on q, k and v alone: enough for bitfit
    assert trainable_names(qwen2) == {f"blocks.{i}.attn.{p}.bias" for i in range(2) for p in "qkv"}
    llama = mp.apply(tiny_model("llama"), "last_k", layers=1)
    assert {"blocks.1.mlp.gate.weight", "ln_f.weight", "head.weight"} <= trainable_names(llama)
    assert not any(name.startswith("blocks.0.") for name in trainable_names(llama))
    assert "tok_emb.weight" not in trainable_names(llama)  # untied head: the embedding stays frozen


def test_bitfit_refuses_llama_which_has_no_biases():
    with pytest.raises(ValueError, match="bitfit.*does not fit a llama model"):
        mp.apply(tiny_model("llama"), "bitfit")
    with pytest.raises(ValueError, match="bitfit trains bias terms, and a llama model has none"):
        selective.apply_bitfit(tiny_model("llama"))  # the method's own check, without the registry's


@pytest.mark.parametrize("layers", [0, -1, 3])
def test_last_k_layers_must_be_between_1_and_n_layer(layers):
    with pytest.raises(ValueError, match=rf"last_k needs 1 <= layers <= 2, got {layers}"):
        mp.apply(tiny_model("gpt2"), "last_k", layers=layers)


def test_last_k_over_every_layer_trains_all_but_the_embeddings():
    model = mp.apply(tiny_model("llama"), "last_k", layers=2)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"tok_emb.weight"}


# real model shapes, built on the meta device (no memory, no values): known total parameter counts
REAL_SHAPES = {
    # GPT-2 small: 124,439,808 parameters (tied LM head)
    "gpt2-small": (dict(flavor="gpt2", vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
                   124_439_808),
    # BERT-base: 109,482,240 with its pooler (768·768 + 768), which minipeft's BERT does not have
    "bert-base": (dict(flavor="bert", vocab_size=30522, n_layer=12, n_head=12, d_model=768, max_seq_len=512),
                  109_482_240 - (768 * 768 + 768)),
    # SmolLM2-135M: 134,515,008 (Llama, 9 heads / 3 KV heads, tied embeddings)
    "smollm2-135m": (dict(flavor="llama", vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576,
                          d_ff=1536, max_seq_len=2048), 134_515_008),
    # Gemma 3 270M: 268,098,176 (head_dim 256 > d_model / n_head, q/k norms, four norms per block, tied)
    "gemma3-270m": (dict(flavor="gemma3", vocab_size=262_144, n_layer=18, n_head=4, n_kv_head=1, d_model=640,
                         head_dim=256, d_ff=2048, max_seq_len=32768, sliding_window=512), 268_098_176),
    # Qwen2.5-0.5B: 494,032,768 (biases on q, k, v only, tied)
    "qwen2.5-0.5b": (dict(flavor="qwen2", vocab_size=151_936, n_layer=24, n_head=14, n_kv_head=2, d_model=896,
                          d_ff=4864, max_seq_len=32768), 494_032_768),
}


def meta_model(shape: str, **overrides) -> mp.Transformer:
    with torch.device("meta"):
        return mp.Transformer(mp.ModelConfig(**{**REAL_SHAPES[shape][0], **overrides}))


@pytest.mark.parametrize("shape", REAL_SHAPES)
def test_parameter_counts_on_real_shapes(shape):
    total = REAL_SHAPES[shape][1]
    assert meta_model(shape).num_parameters() == total
    for method, options in [("full", {}), ("head", {}), ("last_k", {"layers": 3}), ("bitfit", {})]:
        if REAL_SHAPES[shape][0]["flavor"] not in mp.METHODS[method].flavors:
            continue
        for n_classes in (None, 3):
            model = mp.apply(meta_model(shape, n_classes=n_classes), method, **options)
            real = model.num_parameters(trainable_only=True)
            assert adapted.expected_trainable_parameters(model) == real, (method, n_classes)
            if method == "full" and n_classes is None:
                assert real == total


@pytest.mark.parametrize("flavor, switches", [("llama", dict(qkv_bias=True, o_bias=True, mlp_bias=True)),
                                              ("gpt2", dict(qk_norm=True))])
def test_counts_follow_the_switches_not_the_families(flavor, switches):
    """Switch combinations no family here has (a gated MLP with biases everywhere; LayerNorms, with their
    biases, on q and k): bitfit's and full's formulas still equal what the model builds."""
    model = tiny_model(flavor, **switches)
    biases = sum(p.numel() for name, p in model.named_parameters() if name.endswith(".bias"))
    assert selective.bitfit_parameter_count(model.cfg) == biases
    assert selective.full_parameter_count(model.cfg) == model.num_parameters()


def test_gpt2_small_worked_examples():
    """The formulas' numbers, worked out by hand for GPT-2 small (d 768, d_ff 3072, 12 layers)."""
    cfg = meta_model("gpt2-small").cfg
    block = 4 * (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768) + 2 * 2 * 768
    assert selective.block_parameter_count(cfg) == block == 7_087_872
    assert selective.head_parameter_count(cfg) == 50257 * 768
    assert selective.last_k_parameter_count(cfg, layers=2) == 2 * block + 2 * 768 + 50257 * 768
    biases_per_block = 4 * 768 + 3072 + 768 + 2 * 768  # q k v o, up, down, the two LayerNorms
    assert selective.bitfit_parameter_count(cfg) == 12 * biases_per_block + 768 == 102_144  # + ln_f's bias

"""Method-specific behaviour of (IA)³, VeRA, LoHa and LoKr: each is its docstring's equation, its worked
parameter counts, and its own errors (the shared promises are in test_methods.py)."""
import pytest
import torch
import torch.nn as nn

import minipeft as mp
from minipeft.methods import ia3, loha, lokr, vera
from conftest import tiny_model

GPT2_SMALL = mp.ModelConfig(flavor="gpt2", n_layer=12, n_head=12, d_model=768, vocab_size=50257, max_seq_len=1024)


def test_ia3_scales_outputs_or_inputs_and_merges_into_w_and_b():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    out_scaled, in_scaled = ia3.IA3Linear(nn.Linear(6, 5), scale_input=False), ia3.IA3Linear(nn.Linear(6, 5), True)
    for layer in (out_scaled, in_scaled):
        nn.init.normal_(layer.ia3_l)
    torch.testing.assert_close(out_scaled(x), (x @ out_scaled.weight.T + out_scaled.bias) * out_scaled.ia3_l)
    torch.testing.assert_close(in_scaled(x), (x * in_scaled.ia3_l) @ in_scaled.weight.T + in_scaled.bias)
    for layer in (out_scaled, in_scaled):
        before = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
    assert ia3.ia3_parameter_count(GPT2_SMALL, ["k", "v", "down"], ["down"]) == 55_296
    with pytest.raises(ValueError, match=r"feedforward target\(s\) \['down'\] are not among the targets"):
        mp.apply(tiny_model("gpt2"), "ia3", targets="q,v")


def test_vera_is_lora_with_shared_frozen_matrices():
    model = mp.apply(tiny_model("llama"), "vera", rank=6, targets="q,up")
    q, up = model.blocks[0].attn.q, model.blocks[1].mlp.up
    assert q.projections is up.projections and q.projections.A.shape == (6, 32)
    assert q.projections.B.shape == (128, 6)  # the largest (out, in) among the targets: up's 128 × 32
    assert not any("projections" in n for n, _ in model.named_parameters()) and "projections" not in str(
        list(model.state_dict()))  # buffers, drawn again from the seed, never saved
    nn.init.normal_(up.vera_lambda_b)
    x = torch.randn(3, 32)
    A, B = up.projections.A[:, :32], up.projections.B[:128]
    expected = x @ up.weight.T + up.vera_lambda_b * ((up.vera_lambda_d * (x @ A.T)) @ B.T)
    torch.testing.assert_close(up(x), expected)
    assert vera.vera_parameter_count(GPT2_SMALL, 256, ["q", "v"]) == 24_576
    with pytest.raises(ValueError, match="VeRA rank must be >= 1"):
        mp.apply(tiny_model("llama"), "vera", rank=0)


def test_loha_is_a_hadamard_product_of_two_low_rank_products():
    torch.manual_seed(0)
    layer = loha.LoHaLinear(nn.Linear(10, 7), rank=3, alpha=6)
    nn.init.normal_(layer.hada_w2_b)
    delta = 2 * (layer.hada_w1_a @ layer.hada_w1_b) * (layer.hada_w2_a @ layer.hada_w2_b)
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), x @ (layer.weight + delta).T + layer.bias)
    assert torch.linalg.matrix_rank(delta.detach()) > 3  # beyond what one rank-3 product reaches
    assert loha.loha_parameter_count(GPT2_SMALL, 8, ["q", "v"]) == 589_824


def peft_factorization(dimension, factor=-1):
    from peft.tuners.lokr.layer import factorization
    return factorization(dimension, factor)


def test_lokr_factorization_and_shapes_are_peft_s():
    pytest.importorskip("peft")
    for dimension in [1, 7, 12, 32, 64, 96, 128, 127, 576, 768, 3072, 1000]:
        for factor in (-1, 1, 2, 4, 5, 16, 64):
            assert lokr.factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)
    assert lokr.factorization(768) == (24, 32)
    shapes = lokr.lokr_shapes(768, 768, 8, False, -1)  # the docstring's worked example: 576 + 512 = 1,088
    assert shapes == {"lokr_w1": (24, 24), "lokr_w2_a": (32, 8), "lokr_w2_b": (8, 32)}
    assert lokr.lokr_shapes(768, 3072, 8, True, 16) == {"lokr_w1": (16, 16), "lokr_w2_a": (48, 8), "lokr_w2_b": (8, 192)}


def test_lokr_is_a_kronecker_product():
    torch.manual_seed(0)
    layer = lokr.LoKrLinear(nn.Linear(12, 8), rank=1, alpha=3, decompose_both=False, decompose_factor=-1)
    assert set(n for n, _ in layer.named_parameters()) == {"weight", "bias", "lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    nn.init.normal_(layer.lokr_w1)
    w2 = layer.lokr_w2_a @ layer.lokr_w2_b  # (4, 4): 8 = 2·4 rows, 12 = 3·4 columns
    # block (i, j) of ΔW (rows 4i.., columns 4j..) is 3 · W1[i, j] · W2
    torch.testing.assert_close(layer.delta_weight()[4:8, 8:12], 3 * layer.lokr_w1[1, 2] * w2)
    x = torch.randn(2, 12)
    torch.testing.assert_close(layer(x), x @ (layer.weight + 3 * torch.kron(layer.lokr_w1, w2)).T + layer.bias)
    with pytest.raises(ValueError, match="decompose_factor must be -1"):
        mp.apply(tiny_model("gpt2"), "lokr", decompose_factor=0)

"""Method-specific behaviour of (IA)³, VeRA, LoHa and LoKr: each is its docstring's equation, its worked
parameter counts, and its own errors (the shared promises are in test_methods.py)."""
import copy

import pytest
import torch
import torch.nn as nn

import minipeft as mp
from minipeft.core import targets
from minipeft.core import ia3, loha, lokr, vera
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
        before, weight, bias = layer(x), layer.weight.detach().clone(), layer.bias.detach().clone()
        layer.merge()
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
        l = layer.ia3_l.detach()  # merged: W diag(l) (input scaling), or diag(l) W and l ⊙ b
        torch.testing.assert_close(layer.weight, weight * l if layer.scale_input else l[:, None] * weight)
        torch.testing.assert_close(layer.bias, bias if layer.scale_input else l * bias)
    assert ia3.ia3_parameter_count(GPT2_SMALL, ["k", "v", "down"], ["down"]) == 55_296
    with pytest.raises(ValueError, match=r"feedforward target\(s\) \['down'\] are not among the targets"):
        mp.apply(tiny_model("gpt2"), "ia3", targets="q,v")


def test_ia3_on_all_targets_scales_the_ffn_input_and_every_other_output():
    model = mp.apply(tiny_model("llama"), "ia3", targets="all")  # feedforward: down (the default)
    cfg, block = model.cfg, model.blocks[0]
    kv = cfg.n_kv_head * cfg.head_dim
    sizes = {"q": cfg.d_model, "k": kv, "v": kv, "o": cfg.d_model, "gate": cfg.d_ff, "up": cfg.d_ff, "down": cfg.d_ff}
    for target, size in sizes.items():
        layer = block.get_submodule(targets.TARGETS[target])
        assert layer.scale_input == (target == "down") and layer.ia3_l.shape == (size,), target
    assert model.num_parameters(trainable_only=True) == cfg.n_layer * sum(sizes.values())


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


def assert_kaiming_uniform(factor: torch.Tensor, name: str):
    """factor ~ U(−1/√fan_in, 1/√fan_in), fan_in its columns: Kaiming-uniform with a = √5, as peft initializes
    the LyCORIS factors (nn.Linear's law). Thousands of draws reach the bound and spread as that law does."""
    bound = 1 / factor.shape[1] ** 0.5
    assert factor.numel() >= 2048, name
    assert 0.97 * bound < factor.abs().max() <= bound, name
    assert factor.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05), name


def test_loha_starts_as_peft_s_init():
    torch.manual_seed(0)
    layer = loha.LoHaLinear(nn.Linear(256, 128), rank=16, alpha=16)
    for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
        assert_kaiming_uniform(getattr(layer, name).detach(), name)
    assert not layer.hada_w2_b.any()


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
        for factor in (-1, 0, 1, 2, 4, 5, 16, 64):
            assert lokr.factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)
    assert lokr.factorization(768) == (24, 32)
    shapes = lokr.lokr_shapes(768, 768, 8, False, -1)  # the docstring's worked example: 576 + 512 = 1,088
    assert shapes == {"lokr_w1": (24, 24), "lokr_w2_a": (32, 8), "lokr_w2_b": (8, 32)}
    assert lokr.lokr_shapes(768, 3072, 8, True, 16) == {"lokr_w1": (16, 16), "lokr_w2_a": (48, 8), "lokr_w2_b": (8, 192)}


class OneLinear(nn.Module):
    """The smallest model peft can adapt: one linear layer named proj."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("out_features, in_features, rank, decompose_both, factor", [
    (8, 12, 1, False, -1),  # 8 = 2·4, 12 = 3·4: W2 = (4 × 1)(1 × 4)
    (8, 12, 2, False, -1),  # r = max(4, 4)/2: W2 stays whole
    (64, 64, 3, True, 8),  # 64 = 8·8: W1 = (8 × 3)(3 × 8) too, as 3 < 8/2
])
def test_lokr_layer_is_peft_s(out_features, in_features, rank, decompose_both, factor):
    """The same factors (names and shapes) as peft's LoKr layer, and with the same values the same output:
    the Kronecker product scaled by alpha / r."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features)
    ours = lokr.LoKrLinear(copy.deepcopy(base), rank, 5.0, decompose_both, factor)
    config = peft.LoKrConfig(r=rank, alpha=5.0, target_modules=["proj"], decompose_both=decompose_both,
                             decompose_factor=factor)
    theirs = peft.get_peft_model(OneLinear(copy.deepcopy(base)), config)
    their_factors = {name.split(".")[0]: p for name, p in theirs.base_model.model.proj.named_parameters()
                     if name.startswith("lokr_")}
    our_factors = {name: p for name, p in ours.named_parameters() if name.startswith("lokr_")}
    assert {n: p.shape for n, p in our_factors.items()} == {n: p.shape for n, p in their_factors.items()}
    with torch.no_grad():
        for name, p in our_factors.items():
            their_factors[name].copy_(nn.init.normal_(p))
    x = torch.randn(4, in_features)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_lokr_starts_as_peft_s_init():
    torch.manual_seed(0)
    layer = lokr.LoKrLinear(nn.Linear(1024, 1024), rank=8, alpha=8, decompose_both=True, decompose_factor=4)
    assert not layer.lokr_w1.any()  # W1 (4 × 4) = 0: ΔW = 0
    for name in ("lokr_w2_a", "lokr_w2_b"):  # W2 = (256 × 8)(8 × 256)
        assert_kaiming_uniform(getattr(layer, name).detach(), name)


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

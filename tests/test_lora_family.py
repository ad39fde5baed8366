"""LoRA's options beyond the paper (lora.py): rsLoRA's scale, the gaussian / PiSSA / OLoRA inits, LoRA+'s
learning-rate ratio; and DoRA (dora.py). The shared promises are in test_methods.py; PiSSA and OLoRA,
which equal the base only up to float rounding at init, get theirs here."""
import math

import pytest
import torch
import torch.nn as nn

import minipeft as mp
from minipeft.core import adapted
from minipeft.core import loop
from minipeft.core.dora import DoRALinear
from minipeft.core.lora import LoRALinear, residual_init
from conftest import FLAVORS, loss_of, perturb_trainable, tiny_batch, tiny_model


def test_rslora_scales_by_the_square_root_of_the_rank():
    assert LoRALinear(nn.Linear(64, 64), rank=16, alpha=8, rslora=True).scale == 8 / math.sqrt(16)
    assert LoRALinear(nn.Linear(64, 64), rank=16, alpha=8).scale == 8 / 16


def test_gaussian_init_draws_a_with_std_one_over_rank():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(512, 512), rank=8, alpha=16, init="gaussian")
    assert layer.lora_A.std().item() == pytest.approx(1 / 8, rel=0.05) and not layer.lora_B.any()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_move_part_of_w_into_the_adapter(init):
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, rank=4, alpha=8, init=init)
    assert layer.weight is base.weight and layer.changes_base  # the base weight itself now holds the residual
    torch.testing.assert_close(layer.weight + layer.delta_weight(), original, atol=1e-6, rtol=0)
    if init == "pissa":  # the residual is W without its top-4 singular directions
        singular = torch.linalg.svdvals(original)
        torch.testing.assert_close(torch.linalg.svdvals(layer.weight)[:12], singular[4:], atol=1e-5, rtol=0)
    else:  # OLoRA's B has orthonormal columns
        torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, torch.eye(4), atol=1e-5, rtol=0)
    A, B = residual_init(original, 4, layer.scale, init)
    assert torch.equal(A, layer.lora_A.detach()) and torch.equal(B, layer.lora_B.detach())


def test_pissa_on_a_bfloat16_layer_factorizes_its_weight_in_float32():
    """As peft: W (bf16) is upcast, W = U S Vᵀ in fp32, A = √(S_r/s) V_rᵀ, B = U_r √(S_r/s); W keeps W − s·BA."""
    torch.manual_seed(0)
    base = nn.Linear(24, 16).to(torch.bfloat16)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, rank=4, alpha=8, init="pissa")
    U, S, Vh = torch.linalg.svd(original.float(), full_matrices=False)
    root = (S[:4] / 2).sqrt()  # s = 8 / 4
    torch.testing.assert_close(layer.lora_A.detach(), root[:, None] * Vh[:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.lora_B.detach(), U[:, :4] * root, atol=1e-5, rtol=0)
    assert layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer.weight, (original.float() - layer.delta_weight()).to(torch.bfloat16))


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_keep_every_promise(init, flavor, tmp_path):
    """test_methods.py's promises for an init that equals the base only up to rounding."""
    idx, mask = tiny_batch()
    base_out = tiny_model(flavor).eval()(idx, attention_mask=mask)
    model = mp.apply(tiny_model(flavor), "lora", rank=4, targets="all", init=init)
    torch.testing.assert_close(model.eval()(idx, attention_mask=mask), base_out, atol=1e-5, rtol=0)
    assert model.num_parameters(trainable_only=True) == adapted.expected_trainable_parameters(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = loop.make_optimizer(model.train(), lr=1e-2, weight_decay=0.1)
    loss_of(model, idx, mask).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    model.eval()
    trained = model(idx, attention_mask=mask)
    mp.save_adapter(model, tmp_path / "a")  # loading computes the same residual of the fresh base again
    fresh = mp.load_adapter(tiny_model(flavor), tmp_path / "a").eval()
    torch.testing.assert_close(fresh(idx, attention_mask=mask), trained, atol=1e-5, rtol=0)
    mp.merge(fresh)
    torch.testing.assert_close(fresh(idx, attention_mask=mask), trained, atol=1e-5, rtol=0)


def test_lora_plus_gives_b_its_own_learning_rate():
    for ratio in (16.0, 2.0):
        model = mp.apply(tiny_model("llama"), "lora", lr_ratio=ratio)
        optimizer = loop.make_optimizer(model, lr=1e-3, weight_decay=0.01)
        lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert lrs[id(p)] == pytest.approx(ratio * 1e-3 if name.endswith("lora_B") else 1e-3), name
    plain = loop.make_optimizer(mp.apply(tiny_model("llama"), "lora"), lr=1e-3, weight_decay=0.01)
    assert [g["lr"] for g in plain.param_groups] == [1e-3]  # no ratio: the groups as before
    with pytest.raises(ValueError, match="lr_ratio must be > 0"):
        mp.apply(tiny_model("llama"), "lora", lr_ratio=0.0)


def test_dora_is_the_equation_and_its_norm_is_a_constant():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(12, 8), rank=2, alpha=4)
    nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        layer.magnitude.mul_(1.5)
    x = torch.randn(5, 12)
    direction = layer.weight + 2 * layer.lora_B @ layer.lora_A
    expected = x @ (layer.magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)).T + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    layer(x).sum().backward()  # with the norm detached, m's gradient is Σ_tokens (x Vᵀ)/‖V‖
    norm = direction.detach().norm(dim=1)
    torch.testing.assert_close(layer.magnitude.grad, (x @ direction.detach().T / norm).sum(0), atol=1e-5, rtol=0)
    A, B = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B))  # and A's, B's
    V = layer.weight + 2 * B @ A  # the same equation, its norm a constant (.detach(), as peft)
    (x @ (layer.magnitude.detach()[:, None] * V / V.norm(dim=1, keepdim=True).detach()).T).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, atol=1e-5, rtol=0)


def test_dora_under_dropout_is_peft_s_training_arithmetic():
    """With dropout d drawing, the W path of the update sees d(x) too (peft's training forward):
    h = x Wᵀ + b + (g − 1)·(d(x) Wᵀ) + g·s·(d(x) Aᵀ Bᵀ), g = m / ‖W + s·BA‖."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(12, 8), rank=2, alpha=4, dropout=0.5).train()
    nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        layer.magnitude.mul_(1.5)
    x = torch.randn(5, 12)
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    dropped = layer.lora_dropout(x)  # the same mask
    assert not torch.equal(dropped, x)
    W, A, B = layer.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach()
    g = layer.magnitude.detach() / (W + 2 * B @ A).norm(dim=1)
    expected = x @ W.T + layer.bias + (g - 1) * (dropped @ W.T) + g * 2 * (dropped @ A.T @ B.T)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_dora_starts_with_the_weight_norms_and_merges_exactly():
    model = mp.apply(tiny_model("gpt2"), "dora", rank=2, targets="q,down")
    q = model.blocks[0].attn.q
    assert torch.equal(q.magnitude, q.weight.norm(dim=1))
    perturb_trainable(model)
    weight = q.weight.detach().clone()
    g = q.magnitude / q.direction_norm()
    mp.merge(model)
    torch.testing.assert_close(q.weight, g[:, None] * (weight + q.delta_weight()), atol=1e-6, rtol=0)
    mp.unmerge(model)
    torch.testing.assert_close(q.weight, weight, atol=1e-6, rtol=0)

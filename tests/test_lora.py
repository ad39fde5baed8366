"""LoRA-specific behaviour beyond the conformance suite in test_methods.py."""
import pytest
import torch
import torch.nn as nn

import minipeft as mp
from minipeft.core.lora import LoRALinear, lora_parameter_count
from conftest import perturb_trainable, tiny_batch, tiny_model


def test_worked_example_1000x1000_rank_4():
    layer = LoRALinear(nn.Linear(1000, 1000), rank=4, alpha=8)
    assert layer.lora_A.numel() + layer.lora_B.numel() == 8_000


def test_worked_example_gpt2_medium_q_v_rank_4():
    cfg = mp.ModelConfig(flavor="gpt2", n_layer=24, n_head=16, d_model=1024, vocab_size=50257, max_seq_len=1024)
    assert lora_parameter_count(cfg, rank=4, targets=("q", "v")) == 393_216
    with torch.device("meta"):  # count on the real module structure without allocating 355M floats
        model = mp.Transformer(cfg)
    mp.apply(model, "lora", rank=4, targets="q,v")
    assert model.num_parameters(trainable_only=True) == 393_216


def test_init_and_keys():
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, rank=4, alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.abs().sum() > 0
    bound = 1 / 16 ** 0.5  # kaiming_uniform(a=√5) on fan_in 16
    assert layer.lora_A.abs().max() <= bound
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.scale == 2.0


def test_a_is_drawn_as_nn_linear_draws_its_weight():
    """A ~ U(−1/√in, 1/√in): Kaiming-uniform with a = √5, nn.Linear's own init and peft's for lora_A."""
    torch.manual_seed(0)
    A = LoRALinear(nn.Linear(256, 64), rank=64, alpha=8).lora_A.detach()  # 16,384 draws: they reach the edge
    bound = 1 / 256 ** 0.5
    assert 0.99 * bound < A.abs().max() <= bound
    assert A.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.03)  # the uniform law's standard deviation


def test_forward_is_the_equation():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), rank=4, alpha=12)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16)
    expected = x @ layer.weight.T + layer.bias + (12 / 4) * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)


def test_dropout_only_on_the_lora_path():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), rank=4, alpha=4, dropout=0.5)
    x = torch.randn(5, 16)
    base_out = nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), base_out)  # B = 0: dropout cannot leak into the frozen path
    nn.init.normal_(layer.lora_B)
    layer.eval()
    torch.testing.assert_close(layer(x), base_out + layer.lora_update(x))


def test_all_targets_and_errors():
    model = tiny_model("llama")
    mp.apply(model, "lora", targets="all", rank=2)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * 7
    with pytest.raises(ValueError, match="unknown target.*'gate'.*valid targets are: q, k, v, o, up, down"):
        mp.apply(tiny_model("gpt2"), "lora", targets="q,gate")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        mp.apply(tiny_model("gpt2"), "lora", rank=0)
    with pytest.raises(ValueError, match="larger than the layer"):
        mp.apply(tiny_model("gpt2"), "lora", rank=33)


def test_merge_adds_the_update_once_and_unmerge_restores_the_weight():
    """From a trained state (B != 0, so merging really changes W): .eval() merges nothing; merging twice
    adds ΔW = (α/r) B A exactly once; unmerge gives W back."""
    model = mp.apply(tiny_model("gpt2"), "lora", rank=4, alpha=8, targets="q,v,down")
    perturb_trainable(model)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(torch.count_nonzero(m.lora_B) > 0 for m in layers)
    original = [m.weight.detach().clone() for m in layers]
    deltas = [(m.alpha / m.rank) * (m.lora_B @ m.lora_A).detach() for m in layers]
    idx, mask = tiny_batch()
    model.eval()
    assert not any(m.merged for m in layers)
    unmerged = model(idx, attention_mask=mask)
    mp.merge(model)
    mp.merge(model)  # a second merge must not add the update again
    for layer, w, delta in zip(layers, original, deltas):
        assert layer.merged
        torch.testing.assert_close(layer.weight, w + delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(idx, attention_mask=mask), unmerged, atol=1e-5, rtol=0)
    mp.unmerge(model)
    mp.unmerge(model)  # and a second unmerge must not subtract it again
    for layer, w in zip(layers, original):
        assert not layer.merged
        torch.testing.assert_close(layer.weight, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(idx, attention_mask=mask), unmerged, atol=1e-6, rtol=0)

"""The conformance suite: every registered method × every flavour it supports, checked against what
the method declares (exact at init, mergeable, its parameter-count formula). A new method is tested
here just by registering it (DESIGN.md, "Tests that every method must pass")."""
import pytest
import torch

import minipeft as mp
from minipeft import adapter_io, methods, trainer
from conftest import FLAVORS, tiny_batch, tiny_model

CASES = [(m, f, head) for m in mp.METHODS for f in FLAVORS for head in ("lm", "classifier")
         if f in mp.METHODS[m].flavors]


def build(method, flavor, head, seed=0):
    model = tiny_model(flavor, n_classes=2 if head == "classifier" else None, seed=seed)
    return mp.apply(model, method)


def loss_of(model, idx, mask):
    out = model(idx, attention_mask=mask)
    return out.float().pow(2).mean()


def perturb_trainable(model, seed=3):
    """Move every trainable parameter a little, as a few training steps would: at init some gradients
    are exactly zero by design (LoRA's A while B = 0), which would hide a broken gradient path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method, flavor, head", CASES)
def test_output_equals_base_at_init(method, flavor, head):
    if not mp.METHODS[method].exact_at_init:
        pytest.skip(f"{method} does not promise identity at init")
    idx, mask = tiny_batch()
    base = tiny_model(flavor, n_classes=2 if head == "classifier" else None).eval()
    adapted = build(method, flavor, head).eval()
    assert torch.equal(adapted(idx, attention_mask=mask), base(idx, attention_mask=mask))


@pytest.mark.parametrize("method, flavor, head", CASES)
@pytest.mark.parametrize("warmup_pass", ["none", "no_grad", "eval"])
def test_exactly_the_trainable_parameters_get_gradients(method, flavor, head, warmup_pass):
    model = build(method, flavor, head)
    perturb_trainable(model)
    idx, mask = tiny_batch()
    if warmup_pass == "no_grad":
        with torch.no_grad():
            model(idx, attention_mask=mask)
    elif warmup_pass == "eval":
        model.eval()
        model(idx, attention_mask=mask)
        model.train()
    loss_of(model, idx, mask).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


@pytest.mark.parametrize("method, flavor, head", CASES)
def test_trainable_count_matches_formula(method, flavor, head):
    model = build(method, flavor, head)
    assert model.num_parameters(trainable_only=True) == methods.expected_trainable_parameters(model)
    assert set(mp.trainable_state_dict(model)) == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method, flavor, head", CASES)
def test_frozen_parameters_bit_identical_after_a_step(method, flavor, head):
    model = build(method, flavor, head)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = trainer.make_optimizer(model, lr=1e-2, weight_decay=0.1)
    idx, mask = tiny_batch()
    for _ in range(2):
        loss_of(model, idx, mask).backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(params[name], before), f"frozen {name} moved"
    for name, before in buffers.items():
        assert torch.equal(dict(model.named_buffers())[name], before), f"buffer {name} moved"
    assert any(not torch.equal(params[n], v) for n, v in trainable.items()), "nothing trained"


@pytest.mark.parametrize("method, flavor, head", CASES)
def test_with_dropout_only_the_trainable_parameters_learn(method, flavor, head):
    """Items 2 and 3 in training mode with dropout 0.1 (model.Dropout, attention written out, the
    method's own dropout where it has one): every trainable parameter gets a gradient, nothing frozen
    does, and the frozen weights stay bit-identical through AdamW steps."""
    model = tiny_model(flavor, n_classes=2 if head == "classifier" else None, dropout=0.1)
    options = {"dropout": 0.1} if "dropout" in mp.METHODS[method].options else {}
    mp.apply(model, method, **options)
    perturb_trainable(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = trainer.make_optimizer(model, lr=1e-2, weight_decay=0.1)
    idx, mask = tiny_batch()
    torch.manual_seed(0)
    for _ in range(2):
        loss_of(model.train(), idx, mask).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
            else:
                assert p.grad is None, f"frozen {name} got a gradient"
        optimizer.step()
        optimizer.zero_grad()
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(params[name], before), f"frozen {name} moved"


@pytest.mark.parametrize("method, flavor, head", CASES)
def test_save_load_roundtrip(method, flavor, head, tmp_path):
    model = build(method, flavor, head)
    perturb_trainable(model)
    mp.save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter" / adapter_io.ADAPTER_WEIGHTS))
    assert set(saved) == set(mp.trainable_state_dict(model))
    fresh = tiny_model(flavor, n_classes=2 if head == "classifier" else None)
    mp.load_adapter(fresh, tmp_path / "adapter")
    idx, mask = tiny_batch()
    model.eval(), fresh.eval()
    assert torch.equal(fresh(idx, attention_mask=mask), model(idx, attention_mask=mask))


@pytest.mark.parametrize("method, flavor, head", CASES)
def test_merge(method, flavor, head):
    model = build(method, flavor, head).eval()
    if not mp.METHODS[method].mergeable:
        with pytest.raises(ValueError, match="cannot be merged"):
            mp.merge(model)
        return
    perturb_trainable(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    idx, mask = tiny_batch()
    unmerged = model(idx, attention_mask=mask)
    mp.merge(model)
    torch.testing.assert_close(model(idx, attention_mask=mask), unmerged, atol=1e-5, rtol=0)
    mp.unmerge(model)
    params = dict(model.named_parameters())
    for name, before in base.items():
        torch.testing.assert_close(params[name], before, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(idx, attention_mask=mask), unmerged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method, flavor, head", CASES)
def test_padded_batch_equals_rows_alone(method, flavor, head):
    model = build(method, flavor, head).eval()
    perturb_trainable(model)
    idx, mask = tiny_batch()
    batched = model(idx, attention_mask=mask)
    for row in range(idx.shape[0]):
        n = int(mask[row].sum())
        alone = model(idx[row:row + 1, :n])[0]
        torch.testing.assert_close(batched[row] if head == "classifier" else batched[row, :n], alone,
                                   atol=1e-5, rtol=0)


def test_registry_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown method 'lorax'; valid methods are: full"):
        mp.apply(model, "lorax")
    with pytest.raises(ValueError, match="unknown option.*'rnak'.*its options are: rank, alpha"):
        mp.apply(model, "lora", rnak=4)
    with pytest.raises(ValueError, match="bitfit.*does not fit a llama model"):
        mp.apply(model, "bitfit")
    mp.apply(model, "lora")
    with pytest.raises(ValueError, match="already has method 'lora'"):
        mp.apply(model, "lora")


def test_adapter_from_another_base_model_is_refused(tmp_path):
    model = mp.apply(tiny_model("gpt2", seed=0), "lora")
    mp.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="trained on another base model"):
        mp.load_adapter(tiny_model("gpt2", seed=1), tmp_path / "a")


def test_corrupt_adapter_is_refused(tmp_path):
    model = mp.apply(tiny_model("gpt2"), "lora")
    mp.save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / adapter_io.ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        mp.load_adapter(tiny_model("gpt2"), tmp_path / "a")
    (tmp_path / "a" / adapter_io.ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="is corrupt"):
        mp.load_adapter(tiny_model("gpt2"), tmp_path / "a")


@pytest.mark.parametrize("method, flavor, head", [c for c in CASES if c[1] != "bert" and c[2] == "lm"])
def test_cached_generation_matches_uncached(method, flavor, head):
    model = build(method, flavor, head).eval()
    perturb_trainable(model)
    idx, _ = tiny_batch(B=1, T=6)
    cached = model.generate(idx, 12)
    assert torch.equal(cached, model.generate(idx, 12, use_cache=False))
    assert cached.shape == (1, 18)

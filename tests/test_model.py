"""Behaviour of the transformer itself, independent of any PEFT method."""
import pytest
import torch
import torch.nn.functional as F

import minipeft as mp
import minipeft.fast as fast
from minipeft.core import model as core_model
from minipeft.fast import dropout as fast_drop
from conftest import tiny_batch, tiny_model


def test_shapes(flavor):
    idx, mask = tiny_batch()
    lm = tiny_model(flavor)
    assert lm(idx).shape == (3, 12, 97)
    assert lm.encode(idx, mask).shape == (3, 12, 32)
    clf = tiny_model(flavor, n_classes=5)
    assert clf(idx, attention_mask=mask).shape == (3, 5)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_causal_future_tokens_do_not_matter(flavor):
    model = tiny_model(flavor).eval()
    idx, _ = tiny_batch(B=1)
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    assert torch.equal(model(idx)[:, :8], model(changed)[:, :8])
    assert not torch.allclose(model(idx)[:, 8:], model(changed)[:, 8:])


def test_bert_is_bidirectional():
    model = tiny_model("bert").eval()
    idx, _ = tiny_batch(B=1)
    changed = idx.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 97
    assert not torch.allclose(model(idx)[:, 0], model(changed)[:, 0])


def test_padded_batch_equals_rows_alone(flavor):
    for n_classes in (None, 2):
        model = tiny_model(flavor, n_classes=n_classes).eval()
        idx, mask = tiny_batch()
        batched = model(idx, attention_mask=mask)
        for row in range(idx.shape[0]):
            n = int(mask[row].sum())
            alone = model(idx[row:row + 1, :n])
            if n_classes:
                torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=0)
            else:
                torch.testing.assert_close(batched[row, :n], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_kv_cache_matches_full_forward(flavor):
    model = tiny_model(flavor).eval()
    idx, _ = tiny_batch(B=1)
    full = model(idx)
    cache = mp.KVCache(model.cfg.n_layer)
    first = model(idx[:, :5], cache=cache)
    rest = [model(idx[:, t:t + 1], cache=cache) for t in range(5, idx.shape[1])]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=0)
    assert torch.equal(model.generate(idx[:, :4], 10), model.generate(idx[:, :4], 10, use_cache=False))


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
@pytest.mark.parametrize("past", [1, 2])
def test_several_tokens_after_a_cache_see_only_earlier_tokens(flavor, past):
    """Tokens fed together after `past` cached ones (a chunked prompt) attend causally among themselves, as in
    one pass over the whole row: the mask must be built for any past > 0, one cached token included."""
    model = tiny_model(flavor).eval()
    idx, _ = tiny_batch(B=1)
    cache = mp.KVCache(model.cfg.n_layer)
    chunks = [model(idx[:, :past], cache=cache), model(idx[:, past:], cache=cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(idx), atol=1e-5, rtol=0)


def test_tied_head_shares_the_embedding():
    model = tiny_model("gpt2")
    assert model.head.weight is model.tok_emb.weight
    assert tiny_model("llama").head.weight is not tiny_model("llama").tok_emb.weight


def test_checkpointing_gives_the_same_gradients(flavor):
    idx, mask = tiny_batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(flavor, n_classes=2)
        model.checkpointing = checkpointing
        model(idx, attention_mask=mask).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=0)


def test_too_long_input_is_a_clear_error():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="longer than the model's 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("kw, message", [
    (dict(flavor="t5"), "unknown flavor 't5'"),
    (dict(flavor="llama", n_head=4, n_kv_head=3, d_model=32), r"n_head \(4\) must divide by n_kv_head \(3\)"),
    (dict(flavor="bert", pool="max"), "pool must be"),
])
def test_bad_config(kw, message):
    with pytest.raises(ValueError, match=message):
        mp.ModelConfig(**kw)


def test_add_classifier_unties_and_reshapes(flavor):
    model = tiny_model(flavor).add_classifier(3)
    idx, mask = tiny_batch()
    assert model(idx, attention_mask=mask).shape == (3, 3)
    assert model.head.weight is not model.tok_emb.weight and model.head.bias is not None
    built_with_head = tiny_model(flavor, n_classes=3).state_dict()
    assert set(model.state_dict()) == set(built_with_head)
    trunk = [k for k in built_with_head if not k.startswith("head.")]
    assert all(torch.equal(model.state_dict()[k], built_with_head[k]) for k in trunk)


def test_classifier_dropout_only_where_transformers_has_one(flavor):
    """In training, BertForSequenceClassification drops out the pooled vector before its classifier;
    GPT2ForSequenceClassification and the decoders' `score` read the last hidden states as they are."""
    model = tiny_model(flavor, n_classes=3, dropout=0.5).train()
    idx, mask = tiny_batch()
    head_input = {}
    model.head.register_forward_hook(lambda module, args, output: head_input.setdefault("x", args[0]))
    torch.manual_seed(0)
    model(idx, attention_mask=mask)
    torch.manual_seed(0)
    pooled = model.pool(model.encode(idx, attention_mask=mask), idx, attention_mask=mask)
    assert torch.equal(head_input["x"], pooled) == model.cfg.causal


@pytest.mark.parametrize("n_classes", [0, -2, True, 2.5, "3"])
def test_add_classifier_refuses_what_is_not_a_number_of_classes(n_classes):
    """One sentence, not torch's RuntimeError or TypeError from nn.Linear (nor no head at all for 0)."""
    with pytest.raises(ValueError, match=r"n_classes must be a whole number >= 1 \(the classes of the classifier"):
        tiny_model("llama").add_classifier(n_classes)


# ------------------------------------------------------------------------------------------ dropout
# The core's dropout is F.dropout; its fast twin (minipeft/fast/dropout.py) draws four elements per random
# number, its rate p rounded to a multiple of 2^-15. The twin is checked against F.dropout's promises.

@pytest.fixture(params=["core", "fast"])
def version(request):
    """Each test taking it runs twice: with the core functions, then with the fast twins swapped in."""
    if request.param == "fast":
        fast.enable()
    yield request.param
    fast.disable()


def test_dropout_drops_at_rate_p_and_keeps_the_mean():
    torch.manual_seed(0)
    y = fast_drop.dropout(torch.ones(2_000_000), 0.1, True)
    dropped = (y == 0).double().mean().item()
    # 2M Bernoulli(0.1) draws: standard error 2.1e-4; p is rounded to round(0.1 · 2^15) / 2^15
    assert abs(dropped - 3277 / 2**15) < 1e-3
    assert abs(y.mean().item() - 1.0) < 2e-3
    assert torch.equal(y.unique(), torch.tensor([0.0, 2**15 / (2**15 - 3277)]))  # in fp32
    # every one of the 15 bits each element uses is fair: a rate of p = 0.5 is exact too
    assert abs((fast_drop.dropout(torch.ones(2_000_000), 0.5, True) == 0).double().mean().item() - 0.5) < 1e-3
    reference = F.dropout(torch.ones(2_000_000), 0.1, True)  # the core's: the same rate and scale, up to rounding
    assert abs((reference == 0).double().mean().item() - dropped) < 1e-3
    assert abs(reference.max().item() - y.max().item()) < 1e-4


def test_dropout_masks_are_independent_across_positions():
    """Neighbours share a 64-bit draw (four elements per word): their masks must still be independent."""
    torch.manual_seed(1)
    kept = (fast_drop.dropout(torch.ones(400_000, 4), 0.5, True) != 0).double()
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs((kept[:, i] * kept[:, j]).mean().item() - 0.25) < 5e-3


def test_dropout_is_the_identity_in_eval_and_seeded_in_training(version):
    x = torch.randn(5, 7, requires_grad=True)
    drop = core_model.Dropout(0.3)
    assert drop.eval()(x) is x
    drop.train()
    torch.manual_seed(3)
    y = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)
    y.sum().backward()  # the gradient is the mask itself: 0 where dropped, else the one scale
    assert torch.equal(x.grad == 0, y == 0) and len(x.grad.unique()) == 2
    torch.testing.assert_close(x.grad, y.detach() / x.detach(), rtol=1e-6, atol=0)


def test_fast_dropout_refuses_p_of_one():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        fast_drop.dropout(torch.ones(3), 1.0, True)


def test_fast_enable_swaps_the_dropout_every_module_calls():
    """fast.enable() reaches Dropout modules built before it: they look the function up when called."""
    drop = core_model.Dropout(0.1).train()
    try:
        fast.enable()
        torch.manual_seed(0)
        y = drop(torch.ones(2_000_000))
    finally:
        fast.disable()
    assert core_model.dropout is not fast_drop.dropout
    assert torch.equal(y.unique(), torch.tensor([0.0, 2**15 / (2**15 - 3277)]))  # the twin's rounded rate


@pytest.mark.parametrize("case", ["causal", "mask", "none", "gqa"])
def test_attention_with_dropout_is_sdpa_without_dropping(case):
    """The written-out attention (used when training with dropout) computes what SDPA computes."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    B, H, T, hd = 2, 4, 6, 8
    Hkv = 2 if case == "gqa" else H
    q, k, v = torch.randn(B, H, T, hd), torch.randn(B, Hkv, T, hd), torch.randn(B, Hkv, T, hd)
    mask = torch.rand(B, 1, T, T) > 0.3 if case == "mask" else None
    if mask is not None:
        mask[..., 0] = True  # every query sees a key
    causal = case in ("causal", "gqa")
    no_drop = core_model.Dropout(0.0)
    ours = core_model.attention_with_dropout(q, k, v, mask, causal, no_drop)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=Hkv != H)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm", [core_model.RMSNorm, core_model.OffsetRMSNorm])
def test_norms_compute_in_fp64_for_an_fp64_model(norm):
    """Norms compute in fp32 when x is narrower, and an fp64 model stays in fp64: x / rms(x) written out."""
    layer = norm(16, eps=1e-6).double()
    with torch.no_grad():
        layer.weight.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e3
    scale = layer.weight + 1 if norm is core_model.OffsetRMSNorm else layer.weight
    expected = x / (x.square().mean(-1, keepdim=True) + 1e-6).sqrt() * scale
    assert layer(x).dtype == torch.float64
    assert (layer(x) - expected).abs().max().item() < 1e-13
    half = x.bfloat16()
    assert (layer.bfloat16()(half).float() - expected.float()).abs().max().item() < 0.05 * expected.abs().max().item()


@pytest.mark.parametrize("fast_twin", [False, True])
def test_lm_loss_of_an_fp64_model_is_fp64(fast_twin):
    """The LM loss (core's and the tiled twin) sums in fp32, or in fp64 for fp64 hidden states: equal to
    F.cross_entropy over fp64 logits, value and gradient, within 1e-12."""
    from minipeft.fast import losses
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    loss_fn = losses.lm_loss if fast_twin else core_model.lm_loss
    loss = loss_fn(hidden, weight, shift_labels=targets, reduction="sum")
    (grad,) = torch.autograd.grad(loss, hidden)
    expected = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), reduction="sum")
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected.item()) < 1e-12 * expected.item()
    assert (grad - expected_grad).abs().max().item() < 1e-12


def test_a_classifier_refuses_labels_naming_the_loss_transformers_takes():
    """transformers' …ForSequenceClassification takes the MSE for one label (cross-entropy over one class is 0)."""
    model = tiny_model("llama", n_classes=1)
    idx, mask = tiny_batch()
    with pytest.raises(ValueError, match=r"F.cross_entropy for class ids, F.mse_loss for one label \(regression\)"):
        model(idx, attention_mask=mask, labels=torch.tensor([0.5, -1.0, 2.0]))


def test_classification_loss_of_an_fp64_model_is_fp64():
    """loop.loss_fn's classification loss takes an fp64 classifier's logits as they are (fp32 for narrower)."""
    from minipeft.core import loop
    model = tiny_model("bert", n_classes=3).double().eval()
    idx, mask = tiny_batch()
    batch = {"input_ids": idx, "attention_mask": mask, "labels": torch.tensor([0, 2, 1])}
    loss = loop.loss_fn(model, batch, "classification", reduction="sum")
    expected = F.cross_entropy(model(idx, attention_mask=mask), batch["labels"], reduction="sum")
    assert loss.dtype == torch.float64 and abs(loss.item() - expected.item()) < 1e-12 * expected.item()

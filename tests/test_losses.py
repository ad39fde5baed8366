"""The LM loss: the core's F.cross_entropy over the logits (minipeft/core/model.py) and its fast twin, the tiled
cross-entropy (minipeft/fast/losses.py), each against the plain loss over the full logits as transformers
computes it."""
import pytest
import torch
import torch.nn.functional as F

import minipeft as mp
import minipeft.fast as fast
from minipeft.core import loop
from minipeft.core import model as core_model
from minipeft.core.model import IGNORE_INDEX
from minipeft.fast import losses
from minipeft.fast.losses import lm_loss
from conftest import perturb_trainable, tiny_batch, tiny_model


@pytest.fixture(params=["core", "fast"])
def version(request, monkeypatch):
    """Each test taking it runs twice: with the core's loss, then with the fast twin in, in tiles of 4 tokens
    × 10 vocabulary entries (so that a tiny model's batch spans many tiles)."""
    if request.param == "fast":
        monkeypatch.setattr(losses, "CHUNK_SIZE", 4)
        monkeypatch.setattr(losses, "VOCAB_BLOCK", 10)
        fast.enable()
    yield request.param
    fast.disable()


def shift(labels):
    """transformers' causal-LM shift: the target of position t is the label of position t + 1."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)


def full_logits_loss(logits, targets):
    """The reference: every token's logits (B, T, V) at once, targets aligned with them."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def batch_with_holes():
    """Ids (3, 12), their padding mask, and next-token targets with -100 on padding, on a few tokens and
    on the whole of row 1."""
    idx, mask = tiny_batch()
    targets = shift(idx.masked_fill(mask == 0, IGNORE_INDEX))
    targets[0, 2:5] = IGNORE_INDEX
    targets[1] = IGNORE_INDEX
    return idx, mask, targets


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_size, vocab_block", [(1, 7), (5, 16), (None, None)])  # tiles; one tile
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_function_matches_full_logits_for_hidden_and_head(softcap, chunk_size, vocab_block):
    torch.manual_seed(0)
    hidden = (0.3 * torch.randn(3, 12, 16)).requires_grad_()  # logits of a few units, as a trained LM
    weight = torch.randn(50, 16).requires_grad_()
    _, _, targets = batch_with_holes()
    targets = targets.clamp(max=49)
    chunked = lm_loss(hidden, weight, shift_labels=targets, softcap=softcap, chunk_size=chunk_size,
                      vocab_block=vocab_block)
    grad_h, grad_w = torch.autograd.grad(chunked, (hidden, weight))
    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    full = full_logits_loss(logits, targets)
    full_h, full_w = torch.autograd.grad(full, (hidden, weight))
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_h, full_h, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_w, full_w, atol=1e-6, rtol=0)
    assert grad_h[1].abs().sum() == 0 and grad_h[0, 2:5].abs().sum() == 0  # unlabelled: no gradient


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_fast_twin_equals_the_core_loss(softcap, reduction):
    """The tiled twin and the core's F.cross_entropy: the same loss and gradients within float rounding."""
    torch.manual_seed(1)
    hidden = (0.3 * torch.randn(3, 12, 16)).requires_grad_()
    weight = torch.randn(50, 16).requires_grad_()
    _, _, targets = batch_with_holes()
    targets = targets.clamp(max=49)
    results = []
    for loss in (core_model.lm_loss, lm_loss):
        value = loss(hidden, weight, shift_labels=targets, softcap=softcap, reduction=reduction)
        results.append((value, *torch.autograd.grad(value.sum(), (hidden, weight))))
    for core, twin in zip(*results):
        torch.testing.assert_close(twin, core, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("flavor", ["gpt2", "llama", "gemma2"])  # tied head; untied; untied + soft-cap
@pytest.mark.parametrize("method", ["lora", "full"])
def test_model_loss_and_gradients_match_full_logits(flavor, method, version):
    model = mp.apply(tiny_model(flavor), method).train()
    perturb_trainable(model)
    idx, mask, targets = batch_with_holes()
    full = full_logits_loss(model(idx, attention_mask=mask), targets)
    full_grads = grads_of(model, full)
    chunked = model(idx, attention_mask=mask, shift_labels=targets)
    chunked_grads = grads_of(model, chunked)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    assert chunked_grads.keys() == full_grads.keys() and chunked_grads
    if method == "full":
        assert "head.weight" in chunked_grads or model.cfg.tie_embeddings  # tied: tok_emb's gradient has both
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], atol=1e-6, rtol=0, msg=name)


def test_labels_are_shifted_inside_as_transformers_does(version):
    model = tiny_model("gpt2")
    idx, mask = tiny_batch()
    labels = idx.masked_fill(mask == 0, IGNORE_INDEX)
    logits = model(idx, attention_mask=mask)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())  # transformers' shift
    torch.testing.assert_close(model(idx, attention_mask=mask, labels=labels), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss", [core_model.lm_loss, lm_loss], ids=["core", "fast"])
def test_lm_loss_takes_labels_as_a_causal_lm_does_by_default(loss):
    """lm_loss(hidden, weight, labels=...) shifts the labels (transformers' causal-LM loss) unless told the
    model is not causal."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 12, 16), torch.randn(50, 16)
    labels = tiny_batch()[0].clamp(max=49)
    logits = hidden @ weight.T
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(loss(hidden, weight, labels=labels), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        loss(hidden, weight, labels=labels, shift_labels=labels)


def test_masked_lm_labels_are_not_shifted(version):
    model = tiny_model("bert")
    idx, _ = tiny_batch()
    labels = torch.full_like(idx, IGNORE_INDEX)
    labels[:, 3] = idx[:, 3]
    expected = F.cross_entropy(model(idx).flatten(0, 1), labels.flatten())
    torch.testing.assert_close(model(idx, labels=labels), expected, atol=1e-6, rtol=0)


def test_unlabelled_tokens_never_reach_the_head():
    """(The fast twin.) Hidden states of unlabelled tokens may be anything, even NaN: they are never multiplied by W."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 12, 16)
    weight = torch.randn(50, 16)
    _, _, targets = batch_with_holes()
    targets = targets.clamp(max=49)
    clean = lm_loss(hidden, weight, shift_labels=targets, chunk_size=4, vocab_block=10)
    poisoned = hidden.masked_fill((targets == IGNORE_INDEX)[..., None], float("nan")).requires_grad_()
    weight.requires_grad_()
    loss = lm_loss(poisoned, weight, shift_labels=targets, chunk_size=4, vocab_block=10)
    loss.backward()
    assert loss == clean and torch.isfinite(weight.grad).all()


def test_nothing_labelled_gives_nan_and_no_gradient(version):
    """As transformers (a mean over no tokens); the trainer's non-finite guard then skips the step."""
    model = mp.apply(tiny_model("llama"), "lora")
    idx, _ = tiny_batch()
    loss = model(idx, shift_labels=torch.full_like(idx, IGNORE_INDEX))
    assert torch.isnan(loss)
    grads = grads_of(model, loss)
    assert all(g.abs().sum() == 0 for g in grads.values())


def test_bfloat16_model_is_close_to_full_logits(version):
    model = mp.apply(tiny_model("gemma2"), "full").to(torch.bfloat16).train()
    idx, mask, targets = batch_with_holes()
    full = full_logits_loss(model(idx, attention_mask=mask), targets)
    full_grads = grads_of(model, full)
    chunked = model(idx, attention_mask=mask, shift_labels=targets)
    chunked_grads = grads_of(model, chunked)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full, atol=2e-2, rtol=0)
    for name in full_grads:
        g, ref = chunked_grads[name].float(), full_grads[name].float()
        assert (g - ref).norm() <= 0.05 * ref.norm() + 1e-6, name


def test_autocast_runs_the_head_in_bfloat16(version):
    model = mp.apply(tiny_model("llama"), "lora").train()
    perturb_trainable(model)
    idx, mask, targets = batch_with_holes()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = full_logits_loss(model(idx, attention_mask=mask), targets)
        chunked = model(idx, attention_mask=mask, shift_labels=targets)
    fp32 = model(idx, attention_mask=mask, shift_labels=targets)
    torch.testing.assert_close(chunked, full, atol=2e-2, rtol=0)
    assert chunked != fp32  # the bf16 head really ran
    full_grads, chunked_grads = grads_of(model, full), grads_of(model, chunked)
    for name in full_grads:
        assert (chunked_grads[name] - full_grads[name]).norm() <= 0.05 * full_grads[name].norm(), name


def test_trainer_summed_loss_is_the_labelled_tokens_cross_entropy(version):
    model = mp.apply(tiny_model("qwen2"), "lora")
    idx, mask, targets = batch_with_holes()
    batch = {"input_ids": idx, "attention_mask": mask, "labels": targets}
    labelled = targets != IGNORE_INDEX
    expected = F.cross_entropy(model(idx, attention_mask=mask)[labelled], targets[labelled], reduction="sum")
    torch.testing.assert_close(loop.loss_fn(model, batch, "lm", reduction="sum"), expected, atol=1e-5, rtol=0)
    assert loop.loss_terms(batch, "lm") == labelled.sum()


def test_labels_on_a_classifier_are_refused():
    with pytest.raises(ValueError, match="LM head"):
        tiny_model("gpt2", n_classes=2)(tiny_batch()[0], labels=tiny_batch()[0])


def test_fast_twins_come_in_and_go_out_whatever_the_order():
    """enable(nf4=False) then enable() (NF4's twins the second time), enable() twice: disable() always
    brings back the core's own functions, never a twin it saw as the current version."""
    from minipeft.core import nf4 as core_nf4
    fast.disable()
    fast.enable(nf4=False)
    assert fast.enabled(nf4=False) and not fast.enabled()
    fast.enable()
    fast.enable()
    assert fast.enabled()
    fast.disable()
    owners = [owner for owner, _, _ in fast.twins()]
    assert not any(getattr(owner, name) is twin for owner, name, twin in fast.twins())
    assert {getattr(owner, name).__module__ for owner, name, _ in fast.twins()} == {"minipeft.core.model",
                                                                                   "minipeft.core.nf4"}
    assert core_nf4 in owners

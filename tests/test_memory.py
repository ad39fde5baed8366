"""Activation checkpointing (model.checkpointing) and the memory ledger (minipeft/extras/memory.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minipeft as mp
import minipeft.fast
from minipeft.extras import memory
from minipeft.core import loop
from minipeft.core.nf4 import Linear4bit
from conftest import case_params, example_options, loss_of, perturb_trainable, tiny_batch, tiny_model, tiny_tokenizer

CASES = case_params()


@pytest.fixture(scope="module", autouse=True)
def fast_twins():
    """The ledger describes a run of train.py, which runs the fast twins (minipeft.fast): a 4-bit layer
    keeps no dequantized weight for backward there (the readable core's F.linear does), the tiled LM loss
    keeps no logits."""
    minipeft.fast.enable()
    yield
    minipeft.fast.disable()


def applied(method, example, flavor, head, dropout, **overrides):
    """A tiny model (model dropout `dropout`) with the method's example options, and its own dropout
    set to `dropout` where it has one."""
    model = tiny_model(flavor, n_classes=2 if head == "classifier" else None, dropout=dropout, **overrides)
    options = example_options(method, example)
    if "dropout" in mp.METHODS[method].defaults:
        options["dropout"] = dropout
    return mp.apply(model, method, tokenizer=tiny_tokenizer(), **options)


def gradients(model, idx, mask, checkpointing: bool, seed: int = 5):
    """Trainable parameters' gradients after one forward/backward, dropout masks drawn from `seed`."""
    model.zero_grad(set_to_none=True)
    model.checkpointing = checkpointing
    torch.manual_seed(seed)
    loss_of(model, idx, mask).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("method, example, flavor, head", CASES)
def test_checkpointing_never_changes_gradients(method, example, flavor, head, dropout):
    model = applied(method, example, flavor, head, dropout)  # frozen base: blocks see inputs needing no grad
    perturb_trainable(model)
    model.train()
    idx, mask = tiny_batch()
    plain = gradients(model, idx, mask, checkpointing=False)
    recomputed = gradients(model, idx, mask, checkpointing=True)
    assert plain.keys() == recomputed.keys() and plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=0, msg=name)
    if dropout:  # the masks really are random: another seed gives other gradients
        other = gradients(model, idx, mask, checkpointing=True, seed=6)
        assert any(not torch.allclose(other[n], plain[n]) for n in plain)


def test_checkpointing_leaves_a_kv_cache_alone():
    """Checkpointing is off with a cache: backward would rerun the block and append its keys and values
    again (and non-reentrant checkpointing stops with an error when the rerun's shapes differ)."""
    model = tiny_model("llama").train()
    model.checkpointing = True
    idx, _ = tiny_batch(B=1, T=6)
    cache = mp.KVCache(model.cfg.n_layer)
    model(idx, cache=cache).square().mean().backward()
    assert cache.length == 6


def saved_activation_bytes(model, idx, mask=None):
    """Bytes of the distinct tensors autograd still keeps for backward when the forward pass and the
    loss are done (weights and buffers excluded): what activation memory really is."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    holders, sizes = {}, {}

    class Held:  # counts how many live graph nodes keep a storage; a dropped node releases it
        def __init__(self, t):
            self.t, self.ptr = t, t.untyped_storage().data_ptr()
            holders[self.ptr] = holders.get(self.ptr, 0) + 1
            sizes[self.ptr] = t.untyped_storage().nbytes()

        def __del__(self):
            holders[self.ptr] -= 1

    def pack(t):
        return t if t.untyped_storage().data_ptr() in own else Held(t)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t if isinstance(h, Held) else h):
        if model.cfg.n_classes:  # class logits (B, C)
            logits = model(idx, attention_mask=mask)
            loss = torch.nn.functional.cross_entropy(logits, idx[:, 0] % logits.shape[1])
            del logits
        else:  # the trainer's chunked LM loss, every token labelled
            loss = model(idx, attention_mask=mask, shift_labels=idx)
    total = sum(sizes[ptr] for ptr, count in holders.items() if count > 0)
    del loss
    return total


@pytest.mark.parametrize("flavor", ["gpt2", "bert", "llama"])
def test_checkpointing_keeps_only_block_inputs(flavor):
    model = mp.apply(tiny_model(flavor, d_model=64), "lora").train()
    idx, _ = tiny_batch(B=2, T=32)
    without = saved_activation_bytes(model, idx)
    model.checkpointing = True
    with_checkpointing = saved_activation_bytes(model, idx)
    assert with_checkpointing < 0.6 * without


# ------------------------------------------------------------------------------------ the ledger

@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("method, example, flavor, head", CASES)
def test_activation_estimate_is_what_autograd_keeps(method, example, flavor, head, dropout, checkpointing):
    """The ledger's activation formula (derived from model.py) against the tensors autograd really
    keeps, for every method and example option set and flavour, with and without dropout, padding and
    checkpointing."""
    model = applied(method, example, flavor, head, dropout, d_model=64).train()
    model.checkpointing = checkpointing
    idx, mask = tiny_batch(B=3, T=24)
    for padded in (False, True):
        measured = saved_activation_bytes(model, idx, mask if padded else None)
        predicted = memory.activation_bytes(model, 3, 24, padded=padded)["saved"]
        assert predicted == pytest.approx(measured, rel=0.02), f"padded={padded}"


def test_qlora_keeps_no_dequantized_weights():
    """Linear4bit dequantizes again in backward instead of keeping W_hat: QLoRA's activations are LoRA's."""
    idx, _ = tiny_batch(B=2, T=32)
    lora = mp.apply(tiny_model("llama", d_model=128), "lora").train()
    qlora = mp.apply(tiny_model("llama", d_model=128), "qlora").train()
    assert saved_activation_bytes(qlora, idx) == saved_activation_bytes(lora, idx)


@pytest.mark.parametrize("flavor", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_checkpointing_shrinks_the_activation_estimate(method, flavor):
    model = mp.apply(tiny_model(flavor, d_model=64), method)
    report = mp.memory_report(model, batch_size=4, seq_len=32)
    assert report["activations_checkpointing"] < report["activations_no_checkpointing"]
    assert report["activations"] == report["activations_no_checkpointing"]
    model.checkpointing = True
    assert mp.memory_report(model, 4, 32)["activations"] == report["activations_checkpointing"]


def adamw_step(model):
    """One real training step with the trainer's AdamW; returns the optimizer (its state is allocated)."""
    optimizer = loop.make_optimizer(model, lr=1e-3, weight_decay=0.01)
    idx, mask = tiny_batch()
    loss_of(model, idx, mask).backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_ledger_weights_gradients_and_optimizer_state_are_exact(method, flavor):
    model = mp.apply(tiny_model(flavor, d_model=64), method)
    report = mp.memory_report(model, batch_size=3, seq_len=12)
    params = list(model.parameters())  # tied weights once
    trainable = [p for p in params if p.requires_grad]
    layers_4bit = [m for m in model.modules() if isinstance(m, Linear4bit)]
    buffers_4bit = {id(b) for m in layers_4bit for b in m.buffers(recurse=False)}
    other_buffers = [b for b in model.buffers() if id(b) not in buffers_4bit]  # RoPE tables
    assert report["weights_trainable"] == 4 * sum(p.numel() for p in trainable)
    assert report["weights_frozen"] == 4 * sum(p.numel() for p in params if not p.requires_grad) \
        + sum(b.nbytes for b in other_buffers)
    assert report["weights_4bit"] == sum(m.storage_bytes() for m in layers_4bit)
    assert (report["weights_4bit"] > 0) == (method == "qlora")
    if method == "full":  # 4 (weight) + 4 (gradient) + 8 (moments) bytes per parameter
        n = model.num_parameters()
        assert report["weights_trainable"] + report["gradients"] + report["optimizer"] \
            == 16 * n + 4 * len(trainable)  # + AdamW's step counter, one fp32 scalar per tensor
    optimizer = adamw_step(model)
    assert report["gradients"] == sum(p.grad.nbytes for p in trainable)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert report["optimizer"] == sum(t.nbytes for t in state)
    assert report["total"] == report["runtime"] + report["weights"] + report["optimizer"] + max(
        report["activations"], report["gradients"] + report["optimizer_temporaries"])


def test_qlora_frozen_base_costs_about_half_a_byte_per_parameter():
    model = mp.apply(tiny_model("llama", d_model=256, n_head=4, n_kv_head=2, d_ff=512), "qlora")
    report = mp.memory_report(model, 1, 8)
    base = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    assert report["weights_4bit"] / base == pytest.approx(0.516, abs=0.01)  # 4.127 bits


def test_format_report():
    model = mp.apply(tiny_model("gpt2"), "lora")
    text = mp.format_report(mp.memory_report(model, batch_size=4, seq_len=32))
    for words in ("batch 4 × 32", "runtime", "frozen, full prec.", "frozen, 4-bit", "trainable",
                  "gradients", "AdamW moments", "activations", "predicted peak RSS", "allocator"):
        assert words in text
    assert mp.memory_report is memory.memory_report


PEAK_SCRIPT = """
import json, sys, torch
import minipeft as mp
import minipeft.fast
from minipeft.core import loop
minipeft.fast.enable()  # as train.py does
mp.memory.mmap_large_tensors(128 * 1024)  # RSS follows the live tensors (see the function's doc)
method, checkpointing, n_classes = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]) or None
torch.manual_seed(0)
model = mp.Transformer(mp.ModelConfig(flavor="gpt2", n_layer=4, n_head=8, d_model=512, vocab_size=16384,
                                      max_seq_len=256, n_classes=n_classes))
mp.apply(model, method).train()
model.checkpointing = checkpointing
idx = torch.randint(0, 16384, (4, 256))
labels = idx % 2 if n_classes is None else torch.tensor([0, 1, 0, 1])
batch, kind = {"input_ids": idx, "attention_mask": None, "labels": labels}, "classification" if n_classes else "lm"
optimizer = loop.make_optimizer(model, lr=1e-5, weight_decay=0.01)
report = mp.memory_report(model, 4, 256)
open("/proc/self/clear_refs", "w").write("5")  # forget the peak of building the model
for _ in range(2):
    loop.loss_fn(model, batch, kind).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
# VmHWM, not ru_maxrss: a child started by vfork inherits its parent's peak in ru_maxrss
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"peak": peak, "predicted": report["total"], "report": report}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux /proc")
@pytest.mark.parametrize("method, checkpointing, n_classes", [("full", 0, 0), ("qlora", 1, 0), ("lora", 0, 2)])
def test_ledger_predicts_the_measured_peak(method, checkpointing, n_classes):
    """A 4-layer, d 512 model trained for two steps in a fresh process: peak RSS within 20% of the
    ledger (bench/memory.py checks GPT-2-small and SmolLM2, where it is within a few percent)."""
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, method, str(checkpointing), str(n_classes)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                          env={"OMP_NUM_THREADS": "1", "PYTHONPATH": ".", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["predicted"] == pytest.approx(result["peak"], rel=0.2), result["report"]

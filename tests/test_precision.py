"""Precision and devices (minipeft/scale/precision.py), everything a CPU can check: every method and every family
trains under bf16-mixed, bf16-true and fp16-mixed with the promises of the conformance suite (exactly
the trainable parameters get gradients, frozen weights stay bit-identical, trainable and frozen weights
in the dtypes the precision names, adapters saved in fp32 and loaded into any precision); bf16-mixed
losses track fp32's; fp16's loss scaler skips an overflowing step and lowers its scale without the
non-finite guard counting it; bad devices and a resume in another precision stop with exit code 2.

Each axis runs in full against one representative of the others (methods × precisions on llama, or gpt2
for methods without llama; families × precisions with LoRA); the product is under -m exhaustive.
CUDA-only checks are in tests/test_cuda.py."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minipeft as mp
from minipeft.formats import adapter_io
from minipeft.extras import memory
from minipeft.core import loop
from minipeft.core import model as core_model
from minipeft.core.kv_cache import KVCache
from minipeft.core.lora import FrozenLinear
from minipeft.core.nf4 import Linear4bit
from minipeft.run import report, trainer
from conftest import FAMILIES, example_options, perturb_trainable, tiny_batch, tiny_config, tiny_model, tiny_tokenizer
from test_memory import saved_activation_bytes

ROOT = Path(__file__).resolve().parent.parent
LOW = ("bf16-mixed", "bf16-true", "fp16-mixed")


def home_flavor(method: str) -> str:
    return "llama" if "llama" in mp.METHODS[method].flavors else "gpt2"


def precision_cases():
    default = {(m, home_flavor(m), p) for m in mp.METHODS for p in LOW} | {("lora", f, p) for f in FAMILIES for p in LOW}
    every = {(m, f, p) for m in mp.METHODS for f in FAMILIES if f in mp.METHODS[m].flavors for p in LOW}
    return [pytest.param(*c, id="-".join(c), marks=() if c in default else pytest.mark.exhaustive)
            for c in sorted(every)]


def lm_batches(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(1, vocab, (4, 16), generator=g)
        yield {"input_ids": idx, "labels": torch.cat([idx[:, 1:], torch.full((4, 1), -100)], dim=1)}


def build(method: str, flavor: str, precision: str, seed: int = 0):
    model = tiny_model(flavor, seed=seed)
    mp.apply(model, method, tokenizer=tiny_tokenizer(), **example_options(method, 0))
    return mp.set_precision(model, precision)


@pytest.mark.parametrize("method, flavor, precision", precision_cases())
def test_method_trains_in_precision(method, flavor, precision, tmp_path):
    chosen = mp.PRECISIONS[precision]
    model = build(method, flavor, precision)
    for name, p in model.named_parameters():
        assert p.dtype == (chosen.trainable if p.requires_grad else chosen.frozen), name
    if mp.METHODS[method].exact_at_init:  # still the base model, in the same precision
        base = mp.set_precision(tiny_model(flavor).requires_grad_(method == "full"), precision).eval()
        idx, mask = tiny_batch()
        ours, theirs = model.eval()(idx, attention_mask=mask), base(idx, attention_mask=mask)
        if method == "dora":  # m = ‖W‖ at init, divided by ‖W‖ recomputed in low precision: 1 up to rounding
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0.02)
        else:  # an additive update of zero, and scales of one, are exact in every dtype
            assert torch.equal(ours, theirs)
    perturb_trainable(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = loop.make_optimizer(model, lr=1e-2, weight_decay=0.1)
    scheduler = loop.make_scheduler(optimizer, 0.0, 3)
    scaling = mp.precision.loss_scaling(model, torch.device("cpu"))
    assert isinstance(scaling, mp.precision.LossScaling) == (precision == "fp16-mixed")
    batches = lm_batches(model.cfg.vocab_size)
    model.train()
    for _ in range(3):
        result = loop.train_step(model, optimizer, scheduler, batches, "lm", scaling=scaling)
        assert result.finite or result.overflow
    for name, p in model.named_parameters():
        assert p.grad is None  # freed after the step
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), f"frozen {name} moved"
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if p.requires_grad)
    for state in optimizer.state.values():  # AdamW's moments take the parameter's dtype
        assert state["exp_avg"].dtype == chosen.trainable
    # the adapter is written in fp32 and loads into a model held in another precision
    mp.save_adapter(model, tmp_path / "adapter")
    assert {t.dtype for t in load_file(tmp_path / "adapter" / adapter_io.ADAPTER_WEIGHTS).values()} == {torch.float32}
    other = "fp32" if precision != "fp32" else "bf16-mixed"
    fresh = mp.set_precision(tiny_model(flavor), other)
    mp.load_adapter(fresh, tmp_path / "adapter", tokenizer=tiny_tokenizer())
    for name, p in mp.trainable_state_dict(fresh).items():
        assert p.dtype == mp.PRECISIONS[other].trainable
        torch.testing.assert_close(p.float(), mp.trainable_state_dict(model)[name].float(), rtol=0, atol=0)


def device_cases():
    default = {(m, home_flavor(m)) for m in mp.METHODS} | {("lora", f) for f in FAMILIES}
    every = {(m, f) for m in mp.METHODS for f in FAMILIES if f in mp.METHODS[m].flavors}
    return [pytest.param(*c, id="-".join(c), marks=() if c in default else pytest.mark.exhaustive)
            for c in sorted(every)]


@pytest.mark.parametrize("method, flavor", device_cases())
def test_nothing_is_made_on_the_cpu_behind_the_models_back(method, flavor):
    """The CPU's stand-in for a GPU: on the meta device (shapes, no data) any tensor a forward or backward
    pass creates on the CPU instead of the model's device — a mask, positions, a dropout mask, a RoPE
    slice, a 4-bit layer's dequantized weight — meets meta tensors and raises."""
    model = tiny_model(flavor, dropout=0.1)
    mp.apply(model, method, tokenizer=tiny_tokenizer(), **example_options(method, 0))
    model = model.to("meta").train()
    idx, mask = tiny_batch()
    out = model(idx.to("meta"), attention_mask=mask.to("meta"))
    out.float().mean().backward()
    assert out.device.type == "meta"
    assert all(p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)


def test_bf16_mixed_loss_tracks_fp32():
    """Twenty LoRA steps on the same batches: the bf16-mixed losses stay within 0.02 of fp32's."""
    losses = {}
    for precision in ("fp32", "bf16-mixed", "bf16-true"):
        model = build("lora", "llama", precision, seed=1).train()
        optimizer = loop.make_optimizer(model, lr=1e-2, weight_decay=0.0)
        scheduler = loop.make_scheduler(optimizer, 0.0, 20)
        batches = lm_batches(model.cfg.vocab_size, seed=2)
        losses[precision] = [loop.train_step(model, optimizer, scheduler, batches, "lm").loss for _ in range(20)]
    assert losses["fp32"][-1] < losses["fp32"][0] - 0.02  # it learns
    assert max(abs(a - b) for a, b in zip(losses["fp32"], losses["bf16-mixed"])) < 0.02
    assert max(abs(a - b) for a, b in zip(losses["fp32"], losses["bf16-true"])) < 0.1


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    model = build("lora", "llama", "fp16-mixed").train()
    perturb_trainable(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = loop.make_optimizer(model, lr=1e-2, weight_decay=0.0)
    scheduler = loop.make_scheduler(optimizer, 0.0, 5)
    scaling = mp.precision.LossScaling(torch.device("cpu"), init_scale=2.0 ** 40)  # a scaled fp16 gradient this big overflows
    batches = lm_batches(model.cfg.vocab_size)
    result = loop.train_step(model, optimizer, scheduler, batches, "lm", scaling=scaling)
    assert result.overflow and not result.finite and result.loss_scale == 2.0 ** 40
    assert scaling.scale() == 2.0 ** 39
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    row = report.step_row(1, result)
    assert row["skipped"].startswith("fp16 gradient overflow") and row["loss"] == result.loss
    assert row["lr"] == 1e-2  # the rate of the skipped step, not of the next one


def test_train_py_counts_overflows_apart_from_divergence(tmp_path, monkeypatch):
    """A run whose loss scale starts far too high skips steps until the scale fits, says so, and goes on:
    the overflows are not non-finite steps (max_bad_steps 2 would otherwise stop it)."""
    monkeypatch.setattr(trainer, "loss_scaling", lambda model, device: mp.precision.LossScaling(device, init_scale=2.0 ** 30))
    from minipeft.formats import tasks
    model, tokenizer = mp.from_pretrained("tiny-llama", dtype="fp16-mixed")
    mp.apply(model, "lora")
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be that is the question " * 200)
    task = tasks.load_task(str(text), tokenizer, max_len=32)
    cfg = trainer.TrainConfig(steps=24, batch_size=4, lr=1e-3, out=str(tmp_path / "run"), max_bad_steps=2,
                              test_before=False, eval_every=24)
    summary = trainer.train(model, task, cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "step"]
    skipped = [r for r in steps if "skipped" in r]
    assert len(steps) == 24 and len(skipped) >= 10  # 2^30 scaled fp16 gradients overflow at first
    assert all(r["skipped"].startswith("fp16 gradient overflow") for r in skipped)
    assert steps[-1]["loss_scale"] < 2.0 ** 30 and "skipped" not in steps[-1]
    assert summary["steps"] == 24


def test_precision_resolution_and_bad_devices():
    cpu = torch.device("cpu")
    assert mp.precision.resolve_precision("auto", cpu).name == "fp32"
    assert mp.precision.resolve_precision(torch.bfloat16, cpu).name == "bf16-mixed"
    assert mp.precision.resolve_precision(torch.float16, cpu).name == "fp16-mixed"
    assert mp.precision.resolve_precision("bfloat16", cpu).name == "bf16-mixed"  # a dtype's name, as transformers
    assert mp.precision.resolve_precision("float32", cpu).name == "fp32"
    assert mp.resolve_device("cpu") == cpu
    with pytest.raises(ValueError, match="not one of"):
        mp.precision.resolve_precision("fp8", cpu)
    for dtype in (torch.float64, "float64", "int8"):
        with pytest.raises(ValueError, match="not one minipeft trains in"):
            mp.precision.resolve_precision(dtype, cpu)
    with pytest.raises(ValueError, match="not a device name"):
        mp.resolve_device("tpu:0:1")
    if not torch.cuda.is_available():
        assert mp.resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="no CUDA device"):
            mp.resolve_device("cuda:1")
        with pytest.raises(ValueError, match="no CUDA device"):
            mp.from_pretrained("tiny-gpt2", device="cuda")


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_train_py_refuses_a_missing_device_and_a_resume_in_another_precision(tmp_path):
    done = run("--model", "tiny-gpt2", "--task", "hamlet", "--device", "cuda", "--out", tmp_path / "x")
    assert done.returncode == 2 and "no CUDA device" in done.stderr and "Traceback" not in done.stderr
    common = ["--model", "tiny-gpt2", "--task", "hamlet", "--method", "lora", "--steps", "4", "--batch-size", "2",
              "--max-len", "32", "--skip-test-before", "--eval-every", "4", "--out", tmp_path / "run"]
    done = run(*common, "--precision", "bf16-mixed", "--stop-at", "2")
    assert done.returncode == 0, done.stderr
    assert "bf16-mixed on cpu" in done.stdout
    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = {p: p.read_bytes() for p in checkpoint.iterdir()}
    done = run(*common, "--precision", "fp32", "--resume", tmp_path / "run")
    assert done.returncode == 2 and "--precision bf16-mixed (this run: fp32)" in done.stderr
    assert {p: p.read_bytes() for p in checkpoint.iterdir()} == files  # untouched
    done = run(*common, "--precision", "bf16-mixed", "--resume", tmp_path / "run")
    assert done.returncode == 0, done.stderr


def test_pretrained_in_bf16_keeps_its_fingerprint_and_takes_fp32_adapters(tmp_path):
    """from_pretrained(dtype=torch.bfloat16) on a real checkpoint (MiniLM): frozen weights in bf16 (half the
    bytes), logits close to fp32's, the same base fingerprint, and an adapter trained in fp32 loads."""
    full, _ = mp.from_pretrained("minilm")
    half, _ = mp.from_pretrained("minilm", dtype=torch.bfloat16)
    assert half.precision == "bf16-mixed" and half.tok_emb.weight.dtype == torch.bfloat16
    assert sum(mp.precision.weight_bytes(half).values()) < 0.51 * sum(mp.precision.weight_bytes(full).values())
    idx = torch.randint(1000, 20000, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = full.encode(idx), half.encode(idx).float()
    assert (a - b).norm() / a.norm() < 0.03
    mp.apply(full, "lora", targets=("q", "v"))
    perturb_trainable(full)
    mp.save_adapter(full, tmp_path / "adapter")
    mp.load_adapter(half, tmp_path / "adapter")  # the fingerprints agree
    assert half.blocks[0].attn.q.lora_A.dtype == torch.float32
    assert half.peft_config["base_fingerprint"] == full.peft_config["base_fingerprint"]


LEDGER_CASES = [(m, f, p) for m, f in [("lora", "gpt2"), ("lora", "bert"), ("lora", "llama"), ("qlora", "llama"),
                                      ("ia3", "llama"), ("prefix", "llama")] for p in LOW] + \
               [("full", "bert", "bf16-true"), ("full", "llama", "bf16-true")]


@pytest.mark.parametrize("method, flavor, precision", LEDGER_CASES)
def test_ledger_counts_activations_in_their_dtype(method, flavor, precision):
    """The ledger's activations under low precision against the tensors autograd keeps: within 10%
    (fp32's own test holds it to 2%; under bf16 the fp32 pieces — norm inputs and statistics, the loss —
    are modelled per kind of tensor, not per op). Not held to it: full fine-tuning under *-mixed, whose
    fp32 residual stream and autocast's per-use bf16 copies the ledger counts as bf16 (≈ 13% under)."""
    model = mp.set_precision(mp.apply(tiny_model(flavor, d_model=64), method), precision).train()
    idx, _ = tiny_batch(B=3, T=24)
    measured = saved_activation_bytes(model, idx)
    predicted = memory.activation_bytes(model, 3, 24)["saved"]
    fp32 = memory.activation_bytes(mp.apply(tiny_model(flavor, d_model=64), method), 3, 24)["saved"]
    assert predicted == pytest.approx(measured, rel=0.10)
    assert predicted < 0.8 * fp32


@pytest.mark.parametrize("precision, trainable", [("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)])
def test_a_method_applied_to_a_model_in_low_precision_takes_its_dtypes(precision, trainable):
    """mp.apply after set_precision: the method's new parameters take the precision's trainable dtype, the
    frozen base keeps its frozen one (scale/precision.py adds this to mp.apply)."""
    model = mp.set_precision(mp.Transformer(tiny_config("llama")), precision)
    mp.apply(model, "lora", rank=2, targets=["all"])
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {trainable}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


LLAMA_EXAMPLES = [pytest.param(m, i, id=f"{m}-{i}") for m in mp.METHODS if "llama" in mp.METHODS[m].flavors
                  for i in range(len(mp.METHODS[m].examples))]


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
@pytest.mark.parametrize("method, example", LLAMA_EXAMPLES)
def test_a_method_hands_on_the_activations_dtype(method, example, precision):
    """Under *-mixed every layer a method wraps, and LLaMA-Adapter's gated attention, returns the compute dtype,
    as the frozen layer does under autocast and as peft casts its layers' outputs back: an fp32 trained tensor
    (DoRA's magnitude, a gate) must not turn the output, and every activation after it, fp32 (DoRA on every
    linear layer of a llama kept 1.3 times bf16-true's activations). The KV cache too holds the compute dtype
    (fp32 prefixes made it fp32, twice the bytes; peft casts its prefixes to the base model's dtype)."""
    model = mp.apply(tiny_model("llama"), method, tokenizer=tiny_tokenizer(), **example_options(method, example))
    model = mp.set_precision(model, precision).train()
    perturb_trainable(model)
    compute, dtypes = mp.PRECISIONS[precision].compute, {}
    for name, module in model.named_modules():
        if isinstance(module, (FrozenLinear, Linear4bit)) or name.endswith(".adaption"):
            module.register_forward_hook(lambda module, args, out, name=name: dtypes.update({name: out.dtype}))
    idx, mask = tiny_batch()
    model(idx, attention_mask=mask)
    assert {name: dtype for name, dtype in dtypes.items() if dtype != compute} == {}
    cache = KVCache(model.cfg.n_layer)
    with torch.no_grad():
        model.eval()(idx[:1], cache=cache)
    assert {t.dtype for layer in cache.layers for t in layer} == {compute}


def test_ia3_scales_take_their_gradient_in_fp32_under_fp16():
    """IA³ multiplies by its fp32 l in fp32 and casts the product back, as peft does, so the gradient of l sums
    fp32 products: in fp16 products (no loss scale here) underflowed, and l's gradients were 5-7 times further
    from float64's (median relative error 0.012, largest 0.26; now 0.002 and 0.04, as peft's)."""
    model = mp.apply(tiny_model("llama"), "ia3", targets=["all"], feedforward=["down", "gate"])
    perturb_trainable(model)
    idx, mask = tiny_batch()

    def gradients(model):
        out = model(idx, attention_mask=mask)
        trained = [p for p in model.parameters() if p.requires_grad]
        return torch.autograd.grad((out.float() * torch.linspace(-1, 1, out.shape[-1])).mean(), trained)

    exact = gradients(copy.deepcopy(model).double())
    errors = sorted(((g.double() - e).norm() / e.norm()).item()
                    for g, e in zip(gradients(mp.set_precision(model, "fp16-mixed")), exact))
    assert errors[len(errors) // 2] < 5e-3 and errors[-1] < 0.1


@pytest.mark.parametrize("precision", LOW)
def test_vera_matrices_stay_fp32_so_merges_round_once_and_peft_files_come_back(precision, tmp_path):
    """VeRA's shared random matrices stay fp32 in every precision, as peft keeps them: a merge in low precision
    is the fp32 merge of the same weights rounded once (bit for bit; with bf16 copies 14% of a bf16-mixed
    llama's merged elements differed from peft's), and an adapter saved in peft's format, which carries the
    matrices, loads back (bf16 copies were saved, then refused as matrices the seed does not draw)."""
    model = mp.set_precision(mp.apply(tiny_model("llama"), "vera", rank=4, targets=["q", "v", "down"]), precision)
    perturb_trainable(model)
    assert {b.dtype for b in model.blocks[0].attn.q.projections.buffers()} == {torch.float32}
    mp.save_adapter(model, tmp_path / "adapter", format="peft")
    back = mp.load_adapter(tiny_model("llama"), tmp_path / "adapter")
    for name, p in mp.trainable_state_dict(back).items():
        assert torch.equal(p, mp.trainable_state_dict(model)[name].float())
    exact = mp.apply(tiny_model("llama"), "vera", rank=4, targets=["q", "v", "down"])
    with torch.no_grad():  # the same values, held in fp32
        for name, p in exact.named_parameters():
            p.copy_(model.get_parameter(name))
    mp.merge(model), mp.merge(exact)
    for name, p in model.named_parameters():
        assert torch.equal(p, exact.get_parameter(name).to(p.dtype)), name


def test_a_resumed_fp16_run_goes_on_with_its_loss_scale(tmp_path, monkeypatch):
    """The loss scale is part of a checkpoint: a run stopped after its scale came down from 2^30 resumes at
    the scale it had (as torch.amp.GradScaler's state_dict carries it), not at the initial one."""
    monkeypatch.setattr(trainer, "loss_scaling", lambda model, device: mp.precision.LossScaling(device, init_scale=2.0 ** 30))
    from minipeft.formats import tasks
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be that is the question " * 200)

    def run(**changes):
        model, tokenizer = mp.from_pretrained("tiny-llama", dtype="fp16-mixed")
        mp.apply(model, "lora")
        task = tasks.load_task(str(text), tokenizer, max_len=32)
        cfg = trainer.TrainConfig(steps=20, batch_size=4, lr=1e-3, out=str(tmp_path / "run"), test_before=False,
                                  eval_every=20, save_every=0, **changes)
        try:
            trainer.train(model, task, cfg)
        except trainer.Stopped:
            pass
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["event"] == "step"]

    before = run(stop_at=14)
    after = run(resume=str(tmp_path / "run"))
    assert before[-1]["step"] == 14 and after[14]["step"] == 15
    assert before[-1]["loss_scale"] < 2.0 ** 30
    # the scale step 15 starts from is the one step 14 left (halved by one more overflow at the most)
    assert after[14]["loss_scale"] in (before[-1]["loss_scale"], before[-1]["loss_scale"] / 2)


# ------------------------------------------------------------------ attention under bf16 on the CPU

def grad_fn_names(tensor) -> set[str]:
    """The names of every node of tensor's autograd graph."""
    seen, todo, names = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [child for child, _ in node.next_functions]
    return names


ATTENTION_CASES = {  # (H, Hkv, T, causal, padded)
    "gqa-causal": (4, 2, 24, True, False), "padded": (4, 4, 24, False, True), "gqa-padded-64": (4, 2, 64, False, True)}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_bf16_attention_on_the_cpu_runs_the_fp32_kernel(case):
    """precision.attention on bf16 q, k, v (what set_precision installs for bf16): output and the three
    gradients against torch's own kernel in float64 on the same bf16 values, within bf16's rounding of
    the result (2⁻⁸ relative), and closer than torch's bf16 CPU kernel, which sums its gradients in bf16."""
    H, Hkv, T, causal, padded = ATTENTION_CASES[case]
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_y = (torch.randn(3, h, T, 16, generator=g).bfloat16() for h in (H, Hkv, Hkv, H))
    mask = tiny_batch(B=3, T=T)[1].bool()[:, None, None, :] if padded else None

    def run(attention, dtype):
        leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        y = attention(*leaves, mask, causal, 0.25, H != Hkv)
        y.backward(grad_y.to(dtype))
        return y, [y.double(), *(t.grad.double() for t in leaves)]

    y, ours = run(mp.precision.attention, torch.bfloat16)
    _, plain = run(mp.precision.CORE_ATTENTION, torch.bfloat16)
    _, reference = run(mp.precision.CORE_ATTENTION, torch.float64)
    assert "AttentionInFP32Backward" in grad_fn_names(y) and y.dtype == torch.bfloat16
    for name, a, b, r in zip(("y", "dq", "dk", "dv"), ours, plain, reference):
        ours_error, plain_error = ((a - r).norm() / r.norm()).item(), ((b - r).norm() / r.norm()).item()
        assert ours_error < 2 ** -8, name
        assert ours_error < (1.0 if name == "y" else 0.8) * plain_error, name


def test_fp32_attention_only_under_bf16_on_the_cpu():
    """set_precision installs precision.attention for a bf16 precision; it takes AttentionInFP32 for bf16
    on the CPU only: an fp32 model computes bit for bit what the core's kernel does, and neither fp16
    nor a GPU's bf16 goes through it."""
    idx, mask = tiny_batch(B=3, T=12)
    for precision in ("bf16-mixed", "bf16-true"):
        model = mp.set_precision(mp.apply(tiny_model("llama"), "lora"), precision)
        assert "AttentionInFP32Backward" in grad_fn_names(model(idx, attention_mask=mask, shift_labels=idx))
    assert core_model.attention is mp.precision.attention
    fp32 = mp.set_precision(mp.apply(tiny_model("llama"), "lora"), "fp32")
    loss = fp32(idx, attention_mask=mask, shift_labels=idx)
    assert "AttentionInFP32Backward" not in grad_fn_names(loss)
    core_model.attention = mp.precision.CORE_ATTENTION
    try:
        assert torch.equal(loss, fp32(idx, attention_mask=mask, shift_labels=idx))
    finally:
        core_model.attention = mp.precision.attention
    assert mp.precision.attention_in_fp32(torch.bfloat16, torch.device("cpu"))
    assert not mp.precision.attention_in_fp32(torch.bfloat16, torch.device("cuda"))
    assert not mp.precision.attention_in_fp32(torch.float16, torch.device("cpu"))
    assert not mp.precision.attention_in_fp32(torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("flavor, precision", [("llama", "bf16-mixed"), ("bert", "bf16-true"), ("gpt2", "bf16-mixed")])
def test_fp32_attention_keeps_no_more_than_the_bf16_kernel(flavor, precision):
    """What autograd keeps with AttentionInFP32 (q, k, v, the mask) against the bf16 kernel's (q, k, v,
    output, log-sum-exps, an fp32 mask), on a padded batch; and the ledger's count of it within 10%
    (test_ledger_counts_activations_in_their_dtype's bound)."""
    model = mp.set_precision(mp.apply(tiny_model(flavor, d_model=64), "lora"), precision).train()
    idx, mask = tiny_batch(B=3, T=24)
    measured = saved_activation_bytes(model, idx, mask)
    core_model.attention = mp.precision.CORE_ATTENTION
    try:
        measured_bf16_kernel = saved_activation_bytes(model, idx, mask)
    finally:
        core_model.attention = mp.precision.attention
    assert measured < measured_bf16_kernel
    assert memory.activation_bytes(model, 3, 24, padded=True)["saved"] == pytest.approx(measured, rel=0.10)


# ---------------------------------------------------------------------------------- --precision auto

@pytest.mark.parametrize("amx, avx512_bf16, chosen, why", [
    (True, True, "bf16-mixed", "this CPU multiplies bf16 matrices on its AMX tiles"),
    (False, True, "fp32", "this CPU has AVX-512-BF16 but no AMX: its bf16 matmuls run at about half fp32's rate"),
    (False, False, "fp32", "this CPU has neither AMX nor AVX-512-BF16: bf16 would be emulated, several times slower"),
])
def test_auto_picks_bf16_on_a_cpu_only_with_amx(monkeypatch, amx, avx512_bf16, chosen, why):
    """auto_precision is a function of what torch reports of the CPU (patched here to each kind of CPU)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cpu = torch.device("cpu")
    assert mp.precision.auto_precision(cpu) == (chosen, why)
    assert mp.precision.resolve_precision("auto", cpu).name == chosen


@pytest.mark.parametrize("bf16, chosen", [(True, "bf16-mixed"), (False, "fp32")])
def test_auto_on_a_gpu_follows_its_bf16(monkeypatch, bf16, chosen):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert mp.precision.auto_precision(torch.device("cuda"))[0] == chosen
    assert mp.precision.auto_precision(torch.device("mps"))[0] == "fp32"


def test_train_py_says_what_auto_chose_and_why(tmp_path):
    done = run("--model", "tiny-gpt2", "--task", "hamlet", "--steps", "1", "--batch-size", "2", "--max-len", "16",
               "--skip-test-before", "--eval-every", "0", "--out", tmp_path / "run")
    chosen, why = mp.precision.auto_precision(torch.device("cpu"))
    assert done.returncode == 0, done.stderr
    assert f"{chosen} (auto: {why}) on cpu" in done.stdout.splitlines()[0]

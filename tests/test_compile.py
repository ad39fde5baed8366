"""torch.compile (`train.py --compile`: `model.compile()`, torch's inductor) against eager PyTorch, the
reference: for every method, a tiny model's compiled forward and backward give the loss and every
trainable parameter's gradient of the eager ones within 1e-5, with the fast twins in (as train.py runs).

Compiling takes 5-50 s per method on a 2-core CPU (inductor writes and builds C++), so the default run
compiles LoRA only; `python -m pytest -m exhaustive tests/test_compile.py` compiles every method."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minipeft as mp
import minipeft.fast
from conftest import cpu_flags, example_options, tiny_batch, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")),
                                reason="torch's inductor builds its CPU kernels with a C++ compiler; none here")


def step(model, idx, mask):
    """Loss and the trainable parameters' gradients of one forward and backward pass."""
    loss = model(idx, attention_mask=mask, shift_labels=idx)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(autouse=True)
def fast_twins_and_a_fresh_compiler(monkeypatch):
    minipeft.fast.enable()
    torch._dynamo.reset()  # no graphs of another test's model
    if torch.backends.cpu.get_cpu_capability() != "AVX512" and "avx512f" in cpu_flags():
        # ATEN_CPU_CAPABILITY asks an AVX-512 host for a lesser ISA (to test what an AVX2 CPU runs): inductor
        # then loads vectors of AVX2's 8 floats but steps its loops by the host's 16 (torch 2.13), and its
        # index checks fail. An AVX2 CPU has 8 lanes for both; say so here too.
        monkeypatch.setattr(torch._inductor.config.cpp, "simdlen", 8)
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m == "lora" else pytest.mark.exhaustive)
                                    for m in mp.METHODS])
def test_compiled_step_equals_eager(method):
    flavor = "llama" if "llama" in mp.METHODS[method].flavors else "gpt2"
    models = []
    for _ in range(2):
        model = tiny_model(flavor)
        mp.apply(model, method, tokenizer=tiny_tokenizer(), **example_options(method, 0))
        models.append(model.train())
    eager, compiled = models
    compiled.compile()
    idx, mask = tiny_batch(B=2, T=16)
    for batch in ((idx, mask), (idx[:, :12], mask[:, :12])):  # a second shape: a recompile, or a dynamic graph
        loss, grads = step(eager, *batch)
        compiled_loss, compiled_grads = step(compiled, *batch)
        torch.testing.assert_close(compiled_loss, loss, rtol=0, atol=1e-5)
        assert compiled_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=0, atol=1e-5, msg=name)
        for model in models:
            model.zero_grad(set_to_none=True)


@pytest.mark.exhaustive
def test_compiled_bf16_step_tracks_eager():
    """Under bf16-mixed on the CPU the compiled attention is the fp32 product the eager path takes
    (precision.attention traces it without AttentionInFP32's autograd.grad): loss and gradients within
    bf16's rounding."""
    eager, compiled = (mp.set_precision(mp.apply(tiny_model("llama"), "lora"), "bf16-mixed").train() for _ in range(2))
    compiled.compile()
    idx, mask = tiny_batch(B=2, T=16)
    loss, grads = step(eager, idx, mask)
    compiled_loss, compiled_grads = step(compiled, idx, mask)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-3, atol=0)
    for name, grad in grads.items():
        assert (compiled_grads[name] - grad).norm() <= 2 ** -7 * grad.norm(), name


@pytest.mark.exhaustive
def test_train_py_compiles_and_reports_the_first_step_apart(tmp_path):
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "train.py"), "--model",
                           "tiny-gpt2", "--task", "hamlet", "--steps", "3", "--batch-size", "2", "--max-len", "16",
                           "--skip-test-before", "--eval-every", "0", "--compile", "--out", tmp_path / "run"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "first step" in done.stdout and "then a median of" in done.stdout

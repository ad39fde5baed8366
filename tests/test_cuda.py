"""What only a GPU can check; every test here skips itself on a machine without CUDA. On one with it:

    python -m pytest tests/test_cuda.py -v

The conformance promises on CUDA in every precision, a model moved between devices (4-bit codes and
their quantization state included) computing what it computed on the CPU, QLoRA's 4-bit layer on the
GPU against the CPU's, seeded sampling on the GPU, a short train.py run with --device cuda and its
adapter loaded back on the CPU, and data parallelism with nccl equal to one process when there are two GPUs.

GPU and CPU outputs differ by rounding only, so they are compared relative to what the adapter does: its
trainable parameters are moved until its effect on the output, ‖y − y_untrained‖ on the CPU, is clear (a
tenth of ‖y_untrained‖ at least), and the GPU must land within a small share of that effect,
‖y_gpu − y_cpu‖ ≤ share · ‖y − y_untrained‖. A fixed atol would pass a GPU path that dropped a small
effect whole (IA³'s, 0.008 at its largest, under an atol of 0.05)."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minipeft as mp
from minipeft.core import loop
from minipeft.core.generate import Sampling, generate
from conftest import (FLAVORS, example_options, perturb_trainable, random_words_file, tiny_batch, tiny_model,
                      tiny_tokenizer)

ROOT = Path(__file__).resolve().parent.parent
GPU = torch.device("cuda")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PRECISIONS = ("fp32", "bf16-mixed", "bf16-true", "fp16-mixed")
# the share of the adapter's effect by which GPU and CPU may differ. On the CPU, a format's whole rounding
# (the same trained weights run in it and in fp32) is at most 4.2 % of the effect in bf16 and 0.5 % in fp16
# (VeRA, whose effect is 11 % of the output); GPU and CPU round the same weights and activations alike
# and differ by less than that
EFFECT_SHARE = {"fp32": 0.01, "fp16-mixed": 0.02, "bf16-mixed": 0.1, "bf16-true": 0.1}
CLEAR_EFFECT = 0.1  # the adapter moves the output by at least this share of its norm


def output(model, idx, mask) -> torch.Tensor:
    """The model's output on the CPU batch (idx, mask), run on the model's device, as fp32 on the CPU."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(idx.to(device), attention_mask=mask.to(device)).float().cpu()


def move_until_clear(model, untrained, idx, mask) -> torch.nn.Module:
    """A copy of `model` whose trainable parameters moved off their initial values (perturb_trainable's
    draws, scaled up step by step) until the output moved by CLEAR_EFFECT of its norm: 0.02 is enough for
    LoRA, not for IA³'s scales or LLaMA-Adapter's zero-initialized gate."""
    base = output(untrained, idx, mask)
    for scale in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        moved = copy.deepcopy(model)
        perturb_trainable(moved, scale=scale)
        if (output(moved, idx, mask) - base).norm() >= CLEAR_EFFECT * base.norm():
            return moved
    raise AssertionError("the trainable parameters barely change the output, even moved by N(0, 1)")


def assert_gpu_matches_cpu(on_gpu, on_cpu, untrained, share):
    """‖y_gpu − y_cpu‖ ≤ share · ‖y_cpu − y_untrained‖, and the effect itself is clear (half of CLEAR_EFFECT
    at least, after whatever training did to it)."""
    effect = (on_cpu - untrained).norm().item()
    assert effect >= CLEAR_EFFECT / 2 * untrained.norm().item(), f"the adapter's effect {effect:.3g} is small"
    difference = (on_gpu - on_cpu).norm().item()
    assert difference <= share * effect, f"GPU vs CPU {difference:.3g} > {share} × the effect {effect:.3g}"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", list(mp.METHODS))
def test_every_method_trains_on_cuda(method, precision):
    flavor = "llama" if "llama" in mp.METHODS[method].flavors else "gpt2"
    model = mp.apply(tiny_model(flavor), method, tokenizer=tiny_tokenizer(), **example_options(method, 0)).eval()
    idx, mask = tiny_batch()
    untrained = copy.deepcopy(model)  # the reference point of the adapter's effect (on the CPU)
    model = move_until_clear(model, untrained, idx, mask)  # on the CPU: perturb_trainable's generator is a CPU one
    mp.set_precision(model, precision).to(GPU)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = loop.make_optimizer(model, lr=1e-2, weight_decay=0.0)
    scheduler = loop.make_scheduler(optimizer, 0.0, 3)
    scaling = mp.precision.loss_scaling(model, GPU)
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            ids = torch.randint(1, model.cfg.vocab_size, (4, 16), generator=g)
            yield {"input_ids": ids, "labels": ids}
    model.train()
    for _ in range(3):
        result = loop.train_step(model, optimizer, scheduler, batches(), "lm", scaling=scaling)
        assert result.finite or result.overflow
    for name, p in model.named_parameters():
        assert p.device.type == GPU.type
        if not p.requires_grad:
            assert torch.equal(p, frozen[name])
    model.eval()
    on_gpu = output(model, idx, mask)
    on_cpu = output(model.cpu(), idx, mask)
    untrained_output = output(mp.set_precision(untrained, precision), idx, mask)
    assert_gpu_matches_cpu(on_gpu, on_cpu, untrained_output, EFFECT_SHARE[precision])


@pytest.mark.parametrize("flavor", FLAVORS)
def test_qlora_layers_move_to_cuda_and_compute_the_same(flavor):
    model = mp.apply(tiny_model(flavor, d_model=64), "qlora").eval()
    idx, mask = tiny_batch()
    untrained = copy.deepcopy(model)  # the 4-bit base alone: LoRA's B is 0
    model = move_until_clear(model, untrained, idx, mask)
    on_cpu = output(model, idx, mask)
    on_gpu = output(model.to(GPU), idx, mask)
    assert_gpu_matches_cpu(on_gpu, on_cpu, output(untrained, idx, mask), EFFECT_SHARE["fp32"])
    layer = model.blocks[0].attn.q
    assert layer.weight_codes.device.type == GPU.type
    assert torch.equal(layer.dequantized_weight().cpu(), layer.cpu().dequantized_weight())


def test_generation_on_cuda_matches_cpu():
    model = tiny_model("llama").eval()
    idx, _ = tiny_batch(B=1, T=6)
    on_cpu = model.generate(idx, 10)
    assert torch.equal(model.to(GPU).generate(idx.to(GPU), 10).cpu(), on_cpu)


def test_seeded_sampling_on_cuda():
    """The seeded generator lives on the GPU with the logits (torch.multinomial refuses a CPU one there):
    sampling runs, repeats itself for a seed, and top-1 sampling is greedy decoding."""
    model = tiny_model("llama").eval().to(GPU)
    prompts = [[5, 17, 33, 2], [9, 4]]
    sampling = Sampling(temperature=1.5, top_k=20, top_p=0.95, seed=7)
    first = generate(model, prompts, 10, sampling=sampling)
    assert first == generate(model, prompts, 10, sampling=sampling)
    assert generate(model, prompts, 10, sampling=Sampling(temperature=1.0, top_k=1, seed=3)) == \
        generate(model, prompts, 10)


def test_train_py_on_cuda_and_its_adapter_on_the_cpu(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "tiny-llama", "--task", "hamlet",
                           "--method", "lora", "--steps", "20", "--batch-size", "4", "--max-len", "64",
                           "--device", GPU.type, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"bf16-mixed on {GPU.type}" in done.stdout or f"fp32 on {GPU.type}" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows].count("step") == 20
    model, _ = mp.from_pretrained("tiny-llama")
    mp.load_adapter(model, out / "adapter")  # saved on the GPU, loaded on the CPU
    assert model.blocks[0].attn.q.lora_A.device.type == "cpu"


def train_py(out, batch_size, processes, text):
    """6 steps of LoRA on tiny-gpt2 in fp32 on the GPU, two micro-batches per step (so DDP's no_sync is
    used), by `processes` processes (torchrun and nccl for more than one), as tests/test_distributed.py."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    command = [sys.executable, *launch, str(ROOT / "train.py"), "--model", "tiny-gpt2", "--task", str(text),
               "--max-len", "16", "--targets", "q,v,o,up", "--rank", "4", "--lr", "3e-3", "--steps", "6",
               "--grad-accum", "2", "--batch-size", str(batch_size), "--precision", "fp32",
               "--device", GPU.type, "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if r["event"] == "step"}
    return done.stdout, losses, load_file(out / "adapter" / "adapter.safetensors")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl data parallelism needs two GPUs")
def test_torchrun_with_nccl_equals_one_process(tmp_path):
    """Two GPUs joined by nccl take the steps that one GPU takes with the global batch: the same losses,
    the same adapter (within fp32's rounding of sums taken in another order)."""
    text = random_words_file(tmp_path)
    stdout, two_losses, two = train_py(tmp_path / "two", 4, 2, text)
    assert "2 processes" in stdout
    _, one_losses, one = train_py(tmp_path / "one", 8, 1, text)  # 8 = 4 per process × 2 processes
    assert one_losses.keys() == two_losses.keys() == set(range(1, 7))
    assert max(abs(one_losses[s] - two_losses[s]) for s in one_losses) < 1e-5
    assert one.keys() == two.keys()
    moved = max(t.abs().max().item() for name, t in one.items() if "lora_B" in name)  # B starts at 0
    difference = max((one[k] - two[k]).abs().max().item() for k in one)
    assert moved > 1e-3 and difference < 1e-3 * moved, f"one vs two processes {difference:.3g}, moved {moved:.3g}"

"""What only a GPU can check; every test here skips itself on a machine without CUDA. On one with it:

    python -m pytest tests/test_cuda.py -v

The conformance promises on CUDA in every precision, a model moved between devices (4-bit codes and
their quantization state included) computing what it computed on the CPU, QLoRA's 4-bit layer on the
GPU against the CPU's, a short train.py run with --device cuda and its adapter loaded back on the CPU,
and data parallelism with nccl when there are two GPUs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minipeft as mp
from minipeft import trainer
from conftest import FLAVORS, example_options, perturb_trainable, tiny_batch, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PRECISIONS = ("fp32", "bf16-mixed", "bf16-true", "fp16-mixed")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", list(mp.METHODS))
def test_every_method_trains_on_cuda(method, precision):
    flavor = "llama" if "llama" in mp.METHODS[method].flavors else "gpt2"
    model = tiny_model(flavor)
    mp.apply(model, method, tokenizer=tiny_tokenizer(), **example_options(method, 0))
    perturb_trainable(model)  # (on the CPU: its generator is a CPU one)
    mp.set_precision(model, precision).cuda()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = trainer.make_optimizer(model, lr=1e-2, weight_decay=0.0)
    scheduler = trainer.make_scheduler(optimizer, 0.0, 3)
    scaler = mp.precision.grad_scaler(model, torch.device("cuda"))
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            idx = torch.randint(1, model.cfg.vocab_size, (4, 16), generator=g)
            yield {"input_ids": idx, "labels": idx}
    model.train()
    for _ in range(3):
        result = trainer.train_step(model, optimizer, scheduler, batches(), "lm", scaler=scaler)
        assert result.finite or result.overflow
    for name, p in model.named_parameters():
        assert p.device.type == "cuda"
        if not p.requires_grad:
            assert torch.equal(p, frozen[name])
    idx, mask = tiny_batch()
    model.eval()
    on_gpu = model(idx.cuda(), attention_mask=mask.cuda()).float().cpu()
    on_cpu = model.cpu()(idx, attention_mask=mask).float()
    torch.testing.assert_close(on_gpu, on_cpu, rtol=0, atol=1e-4 if precision == "fp32" else 0.05)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_qlora_layers_move_to_cuda_and_compute_the_same(flavor):
    model = mp.apply(tiny_model(flavor, d_model=64), "qlora").eval()
    perturb_trainable(model)
    idx, mask = tiny_batch()
    on_cpu = model(idx, attention_mask=mask)
    on_gpu = model.cuda()(idx.cuda(), attention_mask=mask.cuda()).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, rtol=0, atol=1e-4)
    layer = model.blocks[0].attn.q
    assert layer.weight_codes.device.type == "cuda"
    assert torch.equal(layer.dequantized_weight().cpu(), layer.cpu().dequantized_weight())


def test_generation_on_cuda_matches_cpu():
    model = tiny_model("llama").eval()
    idx, _ = tiny_batch(B=1, T=6)
    on_cpu = model.generate(idx, 10)
    assert torch.equal(model.cuda().generate(idx.cuda(), 10).cpu(), on_cpu)


def test_train_py_on_cuda_and_its_adapter_on_the_cpu(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "tiny-llama", "--task", "hamlet",
                           "--method", "lora", "--steps", "20", "--batch-size", "4", "--max-len", "64",
                           "--device", "cuda", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "bf16-mixed on cuda" in done.stdout or "fp32 on cuda" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows].count("step") == 20
    model, _ = mp.from_pretrained("tiny-llama")
    mp.load_adapter(model, out / "adapter")  # saved on the GPU, loaded on the CPU
    assert model.blocks[0].attn.q.lora_A.device.type == "cpu"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl data parallelism needs two GPUs")
def test_torchrun_with_nccl(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train.py"), "--model", "tiny-llama", "--task", "hamlet", "--method", "lora", "--steps",
               "6", "--batch-size", "2", "--max-len", "32", "--out", str(tmp_path / "run")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert "2 processes" in done.stdout

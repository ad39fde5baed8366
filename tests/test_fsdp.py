"""Fully sharded data parallel (issue 18, sharding.py): 2 CPU processes over gloo with `--fsdp` take
the same steps as one process whose batch is the global batch (gradients, parameters and losses, for
full fine-tuning, LoRA and QLoRA), each process holds half of the weights (4-bit codes included),
checkpoints are gathered into the usual format and resume bit-identically, and a checkpoint resumes
only with the sharding and number of processes it was made with."""
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import minipeft as mp
from minipeft.core import loop
from minipeft.formats import tasks
from minipeft.run import trainer
from minipeft.scale.processes import Processes
from minipeft.scale import sharding
from minipeft.run.trainer import Progress
from conftest import join_gloo_group, random_words_file, spawn_gloo_group

ROOT = Path(__file__).resolve().parent.parent
STEPS = 20
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return random_words_file(tmp_path_factory.mktemp("text"))


# ----------------------------------------------------------------------------------------------------
# two processes (torch.multiprocessing, gloo) against one, inside each process: the sharded model
# trains on this process's half of every global batch, an unsharded copy on the whole global batch


METHODS = {  # method -> (model, options)
    "full": ("tiny-gpt2", {}),
    "lora": ("tiny-gpt2", dict(rank=4, targets=("q", "v", "o", "up"))),
    "qlora": ("tiny-llama", dict(rank=4, targets=("q", "k", "v", "o", "up", "gate", "down"))),
}


def clipped_gradients(model, optimizer, every_step: list):
    """Record the whole gradients of the trainable parameters just before each optimizer step (after
    clipping): a collective under FSDP, which every process reaches at the same step."""
    def hook(*_):
        every_step.append({n: sharding.whole_tensor(p.grad) for n, p in model.named_parameters() if p.requires_grad})
    optimizer.register_step_pre_hook(hook)


def _compare_worker(rank, world_size, folder, method, text, out):
    join_gloo_group(rank, world_size, folder)
    try:
        name, options = METHODS[method]
        torch.manual_seed(0)
        model, tokenizer = mp.from_pretrained(name, dropout=0.0)
        task = tasks.load_task(text, tokenizer, max_len=16)
        mp.apply(model, method, **options)
        single = copy.deepcopy(model)  # the one-process run, on the global batch
        initial = {n: p.detach().clone() for n, p in single.named_parameters() if p.requires_grad}
        sharding.shard(model)
        held = sharding.bytes_per_process(model)
        four_bit = [layer for layer in model.modules() if isinstance(layer, mp.quant.Linear4bit)]
        left_whole = sum(b.nbytes for layer in four_bit for b in layer.buffers())  # not sharded

        losses, gradients, norms = {}, {}, {}
        for run, net, batch_size, (r, n) in (("one", single, 8, (0, 1)), ("two", model, 4, (rank, world_size))):
            cfg = trainer.TrainConfig(steps=STEPS, batch_size=batch_size, grad_accum=2, lr=3e-3)
            optimizer = loop.make_optimizer(net, cfg.lr, cfg.weight_decay)
            scheduler = loop.make_scheduler(optimizer, cfg.warmup, STEPS)
            gradients[run] = []
            clipped_gradients(net, optimizer, gradients[run])
            batches = trainer.training_batches(task.splits["train"], cfg, Progress(), r, n)
            net.train()
            processes = Processes() if n > 1 else loop.ONE_PROCESS
            results = [loop.train_step(net, optimizer, scheduler, batches, task.kind, cfg.grad_accum,
                                       cfg.max_grad_norm, processes) for _ in range(STEPS)]
            losses[run] = [result.loss for result in results]
            norms[run] = [result.grad_norm for result in results]
        assert len(gradients["one"]) == len(gradients["two"]) == STEPS
        with sharding.whole(model):
            trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        reference = dict(single.named_parameters())
        measured = {
            "gradient": max((g[k] - h[k]).abs().max().item()
                            for g, h in zip(gradients["one"], gradients["two"]) for k in g),
            "parameter": max((trained[k] - reference[k]).abs().max().item() for k in trained),
            "loss": max(abs(a - b) for a, b in zip(losses["one"], losses["two"])),
            "grad_norm": max(abs(a - b) / b for a, b in zip(norms["one"], norms["two"])),  # relative: ‖g‖ ≫ 1
            # how far training moved the weights: far more than the tolerance, or equality proves nothing
            "update": max((trained[k] - initial[k]).abs().max().item() for k in trained),
            "bytes": held, "four_bit_layers": len(four_bit), "four_bit_buffer_bytes": left_whole,
        }
        if rank == 0:
            Path(out).write_text(json.dumps(measured))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", list(METHODS))
def test_two_sharded_processes_equal_one_process_and_hold_half(method, text, tmp_path):
    out = tmp_path / "measured.json"
    spawn_gloo_group(_compare_worker, tmp_path, method, str(text), str(out))
    m = json.loads(out.read_text())
    whole, processes = m["bytes"]["whole"], m["bytes"]["processes"]
    print(f"\n{method}: 2 processes vs 1 after {STEPS} steps: max |difference| gradients {m['gradient']:.3g}, "
          f"parameters {m['parameter']:.3g}, losses {m['loss']:.3g}, gradient norms {m['grad_norm']:.3g} (relative), "
          f"update {m['update']:.3g}; "
          f"bytes whole {whole}, per process {processes}")
    assert m["gradient"] < 1e-5 and m["parameter"] < 1e-5 and m["loss"] < 1e-5
    # the norm sums the squares of every gradient element in another order in each layout: full fine-tuning's
    # ~10⁵ elements, each within 1e-5, move it by ~2e-5 relative (measured); a summed-instead-of-averaged
    # gradient would move it by 100%
    assert m["grad_norm"] < 1e-4
    assert m["update"] > 1e-3
    for kind in ("frozen", "trainable"):  # each process: half of the rows, plus at most FSDP's padding
        assert sum(p[kind] for p in processes) >= whole[kind]
        assert all(p[kind] <= 0.5 * whole[kind] * 1.02 for p in processes), (kind, whole, processes)
    assert all(p["buffers"] == whole["buffers"] for p in processes)  # buffers stay whole in every process
    if method == "qlora":  # the 4-bit codes and state are sharded: only the 0-d fp32 offsets stay whole
        assert m["four_bit_layers"] == 2 * 7 and m["four_bit_buffer_bytes"] == 4 * m["four_bit_layers"]


# ----------------------------------------------------------------------------------------------------
# train.py --fsdp under torchrun: stop and resume, files, and what cannot be resumed


def torchrun(*args, processes=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(ROOT / "train.py"), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def python(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})


def cli_args(text, out, batch_size, method, *extra):
    options = ["--targets", "q,v,o,up", "--rank", "4"] if method in ("lora", "qlora") else []
    return ["--model", "tiny-gpt2", "--task", text, "--max-len", "16", "--method", method, *options,
            "--lr", "3e-3", "--steps", STEPS, "--grad-accum", "2", "--batch-size", batch_size, "--eval-every", "10",
            "--out", out, *extra]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in rows(out) if r["event"] == "step"}


def fingerprint(folder: Path) -> dict:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def stopped(text, tmp_path_factory):
    """A QLoRA run with --fsdp on 2 processes stopped after step 10 (a copy that no test resumes)."""
    out = tmp_path_factory.mktemp("fsdp-stopped") / "run"
    result = torchrun(*cli_args(text, out, 4, "qlora", "--fsdp", "--stop-at", 10))
    assert result.returncode == 0 and "--resume" in result.stderr, result.stderr[-3000:]
    return out


def test_torchrun_fsdp_resume_is_bit_identical_and_equals_one_process(text, stopped, tmp_path):
    resumed, straight, one = tmp_path / "resumed", tmp_path / "straight", tmp_path / "one"
    shutil.copytree(stopped, resumed)
    result = torchrun(*cli_args(text, resumed, 4, "qlora", "--fsdp", "--resume", resumed))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sum(line.startswith("trainable parameters") for line in result.stdout.splitlines()) == 1  # rank 0
    assert "process 1 holds" in result.stdout  # the bytes each process holds
    result = torchrun(*cli_args(text, straight, 4, "qlora", "--fsdp"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert step_losses(resumed) == step_losses(straight)  # bit-identical: AdamW's state resumed exactly
    last = {run: load_file(run / "adapter" / "adapter.safetensors") for run in (resumed, straight)}
    assert all(torch.equal(last[resumed][k], last[straight][k]) for k in last[straight])
    assert sum(r["event"] == "step" for r in rows(resumed)) == STEPS
    result = python(*cli_args(text, one, 8, "qlora"))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = step_losses(one), step_losses(straight)
    assert a.keys() == set(range(1, STEPS + 1))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    # the adapter is gathered whole on rank 0, in the usual format: it loads into a plain model
    adapters = {run: load_file(run / "adapter" / "adapter.safetensors") for run in (one, straight)}
    assert adapters[one].keys() == adapters[straight].keys()
    assert max((adapters[one][k] - adapters[straight][k]).abs().max().item() for k in adapters[one]) < 1e-5
    model, _ = mp.from_pretrained("tiny-gpt2")
    mp.load_adapter(model, straight / "adapter")
    assert rows(straight)[-1]["world_size"] == 2
    assert rows(straight)[-1]["total_parameters"] == rows(one)[-1]["total_parameters"]  # 4-bit codes not counted


def test_fsdp_without_torchrun_stops_with_one_sentence(text, tmp_path):
    result = python(*cli_args(text, tmp_path / "run", 4, "lora", "--fsdp"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --fsdp shards the model across processes, but this is a single process (WORLD_SIZE unset); "
        "start it with torchrun --nproc_per_node 2 (or more) train.py ... --fsdp"]
    assert not (tmp_path / "run").exists()


def test_fsdp_checkpoint_resumes_only_as_it_was_made(text, stopped, tmp_path):
    before = fingerprint(stopped)
    checkpoint = stopped / "checkpoint-10"
    # opened in one process: the run's config.yaml gives it --fsdp, which needs torchrun
    result = python(*cli_args(text, stopped, 8, "qlora", "--resume", stopped))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --fsdp shards the model across processes, but this is a single process (WORLD_SIZE unset); start "
        "it with torchrun --nproc_per_node 2 (or more) train.py ... --fsdp"]
    assert checkpoint.exists()
    # a copy without config.yaml (as runs of older versions left them) resumed by data parallel (DDP) instead of
    # FSDP: each process stops with exit code 2
    older = tmp_path / "older"
    shutil.copytree(stopped, older)
    (older / "config.yaml").unlink()
    result = torchrun(*cli_args(text, older, 4, "qlora", "--resume", older))
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr
    assert "was saved by a run with --fsdp on 2 processes, but this run does not shard" in result.stderr
    # FSDP on 3 processes instead of 2
    result = torchrun(*cli_args(text, stopped, 4, "qlora", "--fsdp", "--resume", stopped), processes=3)
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr
    assert "was made with other options: processes 2 (this run: 3)" in result.stderr
    assert fingerprint(stopped) == before  # nothing written, nothing removed


def test_unsharded_checkpoint_does_not_resume_under_fsdp(text, tmp_path):
    out = tmp_path / "one"
    result = python(*cli_args(text, out, 8, "lora", "--stop-at", 2))
    assert result.returncode == 0, result.stderr[-3000:]
    before = fingerprint(out)
    result = torchrun(*cli_args(text, out, 4, "lora", "--fsdp", "--resume", out))
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr
    assert (f"error: checkpoint {out / 'checkpoint-2'} was saved by a run without --fsdp (1 process), but this "
            "run shards the model") in result.stderr  # every other difference follows in the same sentence
    assert "resume it without --fsdp" in result.stderr
    assert fingerprint(out) == before

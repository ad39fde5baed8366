"""Data-parallel training (issue 8): `torchrun --nproc_per_node 2 train.py ...` on CPU (gloo) takes the
same steps as one process whose batch is the global batch (batch_size × 2), also across a stop and
resume, writes its files once (rank 0), evaluates to the same numbers, and copes with trainable
parameters that a forward pass does not use."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import minipeft as mp
import train as train_cli
from minipeft.formats import tasks
from minipeft.run import trainer
from conftest import join_gloo_group, random_words_file, spawn_gloo_group

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def torchrun(*args, processes=2, cwd=ROOT):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(ROOT / "train.py"), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in rows(out) if r["event"] == "step"}


def adapter(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return random_words_file(tmp_path_factory.mktemp("text"))


def args(text, out, batch_size, *extra):
    """LoRA on q,v,o,up of tiny-gpt2, two micro-batches per step (so DDP's no_sync is used); out None:
    no --out."""
    return ["--model", "tiny-gpt2", "--task", text, "--max-len", "16", "--targets", "q,v,o,up", "--rank", "4",
            "--lr", "3e-3", "--steps", STEPS, "--grad-accum", "2", "--batch-size", batch_size,
            "--eval-every", "3", *(["--out", out] if out is not None else []), *extra]


def test_torchrun_two_processes_stop_resume_and_equal_one_process(text, tmp_path):
    """torchrun with 2 processes: stop after step 3 (checkpoint), resume to step 6; the result equals
    6 straight steps of one process whose batch is the global batch."""
    two, one = tmp_path / "two", tmp_path / "one"
    stopped = torchrun(*args(text, two, 4, "--stop-at", "3"))
    assert stopped.returncode == 0 and "--resume" in stopped.stderr, stopped.stderr[-3000:]
    state = load_file(two / "checkpoint-3" / "trainer_state.safetensors")
    assert {"rng.torch.0", "rng.torch.1"} <= state.keys()  # every process's RNG is saved
    resumed = torchrun(*args(text, two, 4, "--resume", two))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("trainable parameters") == 1  # one summary, printed by rank 0
    train_cli.main([str(a) for a in args(text, one, 8)])  # 8 = 4 per process × 2 processes

    difference = max_difference(adapter(one), adapter(two))
    print(f"max |one process - two processes| over the trainable parameters: {difference:.3g}")
    assert difference < 1e-6
    a, b = step_losses(one), step_losses(two)
    assert a.keys() == b.keys() == set(range(1, STEPS + 1))
    assert sum(r["event"] == "step" for r in rows(two)) == STEPS  # rank 0 alone writes: one row per step
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    summary_one, summary_two = rows(one)[-1], rows(two)[-1]
    assert summary_two["world_size"] == 2
    assert summary_two["examples_per_step"] == summary_one["examples_per_step"] == 16
    # evaluation is sharded and summed: the same numbers as one process
    for split in ("test_before", "test_after"):
        assert summary_two[split]["loss"] == pytest.approx(summary_one[split]["loss"], abs=1e-5)
    validation = lambda out: [(r["step"], r["loss"]) for r in rows(out) if r["event"] == "validation"]  # noqa: E731
    assert [s for s, _ in validation(one)] == [s for s, _ in validation(two)] == [3, 6]
    assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(validation(one), validation(two)))


def test_torchrun_without_out_writes_into_one_new_folder(text, tmp_path):
    """Without --out rank 0 creates the run's folder and tells the other process its name: one folder,
    named on the first line, holding the whole run."""
    done = torchrun(*args(text, None, 4, "--steps", "2", "--save-every", "1"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    folders = list((tmp_path / "checkpoints").iterdir())
    assert len(folders) == 1, folders
    folder = folders[0]
    assert done.stdout.splitlines()[0].endswith(f", output in {folder.relative_to(tmp_path)}")
    assert step_losses(folder).keys() == {1, 2} and rows(folder)[-1]["world_size"] == 2
    assert (folder / "latest_checkpoint").read_text() == "checkpoint-2" and (folder / "adapter").is_dir()


# ----------------------------------------------------------------------------------------------------
# torch.multiprocessing with gloo (conftest.spawn_gloo_group), calling trainer.train directly; the model
# has a trainable parameter that no forward pass uses (DDP must not wait for its gradient)


def tiny_run(text, out, batch_size):
    """LoRA on tiny-gpt2 plus one trainable parameter that forward never touches."""
    torch.manual_seed(0)
    model, tokenizer = mp.from_pretrained("tiny-gpt2")
    task = tasks.load_task(text, tokenizer, max_len=16)
    mp.apply(model, "lora", rank=2)
    model.unused = torch.nn.Parameter(torch.ones(3))
    cfg = trainer.TrainConfig(steps=3, batch_size=batch_size, eval_every=100, out=str(out), save_every=0)
    return trainer.train(model, task, cfg)


def _worker(rank, world_size, folder, text, out):
    join_gloo_group(rank, world_size, folder)
    try:
        tiny_run(text, out, batch_size=2)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_with_an_unused_parameter(text, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    spawn_gloo_group(_worker, tmp_path, text, two)
    tiny_run(text, one, batch_size=4)  # 4 = 2 per process × 2 processes
    assert max_difference(adapter(one), adapter(two)) < 1e-6
    assert torch.equal(adapter(two)["unused"], torch.ones(3))  # no gradient, no update, no weight decay


@pytest.mark.parametrize("world_size, code", [("2", 2), ("2", None), ("1", 2), ("1", None)])
def test_a_torchrun_process_leaves_without_finalization(world_size, code):
    """processes.exit_process: under torchrun (WORLD_SIZE > 1) with the code and the printed text flushed,
    but without the interpreter's finalization (no atexit handler runs: that is where gloo's threads abort
    a process that FSDP2 ran in); alone, as sys.exit does (or nothing for None)."""
    script = ("import atexit, sys\n"
              "from minipeft.scale.processes import exit_process\n"
              "atexit.register(print, 'finalized')\n"
              "print('error: the run says why', end='', file=sys.stderr)\n"
              "print('summary', end='')\n"
              f"exit_process({code})\n"
              "print(' and goes on')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a pipe normally is
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**env, "WORLD_SIZE": world_size, "PYTHONPATH": str(ROOT)})
    assert done.returncode == (code or 0) and done.stderr == "error: the run says why"
    if world_size == "2":
        assert done.stdout == "summary"
    else:
        assert done.stdout.startswith("summary") and "finalized" in done.stdout
        assert ("goes on" in done.stdout) == (code is None)

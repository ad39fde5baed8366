"""The training loop: AdamW, linear warmup then cosine decay, gradient accumulation and clipping,
evaluation on the validation split during training and on the test split before and after, checkpoints
that a run resumes from exactly, a guard against non-finite steps, and data parallelism with torchrun.

    for step in 1..steps:
        for micro in 1..grad_accum:  loss = L(model(batch)) / grad_accum;  loss.backward()
        if loss and ‖g‖₂ are finite:  clip ‖g‖₂ ≤ max_grad_norm;  AdamW step
        else:                         skip the update (max_bad_steps in a row stop the run)
        lr ← schedule(step)
        every save_every steps, at the end, and on Ctrl-C / SIGTERM:  save a checkpoint

    schedule(s) = lr · s / warmup                                   for s < warmup
                = lr · ½ (1 + cos(π · (s − warmup) / (steps − warmup)))   afterwards

Only parameters with requires_grad reach the optimizer, so frozen weights cannot move and AdamW keeps
no state for them. Biases and norm weights (1-D tensors) get no weight decay. Metrics go to
`<out>/metrics.jsonl`, the adapter to `<out>/adapter/` (written atomically by adapter_io.save_adapter).

Checkpoints (checkpoint.py: `<out>/checkpoint-<step>/`) hold the trainable parameters, AdamW's state,
the scheduler, the RNG states and the data position (epoch, batch). The batches of an epoch are a
permutation fixed by (seed, epoch) and dropout draws from the restored torch RNG, so a run resumed
with `resume=<out>` logs bit-identical losses to one that was never stopped. A resumed run must have
the same options (model, task, method, learning rate, batch size, ...); only where and how often it
saves, evaluates and stops may change. SIGINT (Ctrl-C) and SIGTERM finish the current step, save a
checkpoint and stop (raising `Stopped`); a second signal quits at once.

Data parallel (`torchrun --nproc_per_node N train.py ...`): each process holds the whole model and
trains on its own interleaved shard of every global batch of batch_size × N examples
(data.Dataset.batches); DistributedDataParallel averages the gradients, so a step equals one
single-process step on the global batch (up to float rounding) and the copies stay identical.
Validation and test are sharded the same way and their sums added up across processes. Only rank 0
writes files and shows progress.
"""
import contextlib
import json
import math
import os
import platform
import random
import resource
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import checkpoint
from .adapter_io import ADAPTER_WEIGHTS, save_adapter
from .quant import frozen_weight_bytes, values_in_4bit_layers


@dataclass
class TrainConfig:
    epochs: float = 1.0  # used when steps is None
    steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 16  # per process: a step sees batch_size × processes × grad_accum examples
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of the steps
    max_grad_norm: float = 1.0
    eval_every: int = 0  # steps between validation passes; 0 = four per run
    eval_batch_size: int = 64
    seed: int = 0
    out: str = "checkpoints/run"
    save_every: int = 100  # steps between checkpoints; 0 = only at the end and when stopped
    max_bad_steps: int = 10  # non-finite steps in a row that stop the run
    resume: str | None = None  # a run's output folder (or one of its checkpoints) to continue
    stop_at: int | None = None  # save a checkpoint and stop after this step (resume later)
    run: dict = field(default_factory=dict)  # what else defines the run: model, task, max_len, ...


# options that may change when a run is resumed: where and how often it saves, evaluates and stops
MAY_CHANGE_ON_RESUME = ("out", "resume", "save_every", "stop_at", "max_bad_steps", "eval_every",
                        "eval_batch_size", "init_adapter")
FLAG_NAMES = {"max_grad_norm": "--clip", "world_size": "processes"}  # for messages; else --the-name


class Stopped(Exception):
    """The run stopped before its end on purpose: interrupted or at stop_at (a checkpoint was saved),
    or after max_bad_steps non-finite steps in a row (the last good checkpoint is kept)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint and restored on resume."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # the next batch of `epoch`
    examples: int = 0
    train_seconds: float = 0.0
    bad_steps: int = 0  # steps skipped for a non-finite loss or gradient
    bad_streak: int = 0  # of them, in a row up to `step`
    test_before: dict | None = None
    validation: list = field(default_factory=list)  # [{"step": s, **metrics}, ...]

    def count(self, step: int, examples: int, seconds: float, finite: bool):
        self.step, self.examples = step, self.examples + examples
        self.train_seconds += seconds
        self.bad_steps += not finite
        self.bad_streak = 0 if finite else self.bad_streak + 1


def loss_fn(model, batch, kind: str) -> torch.Tensor:
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    if kind == "classification":
        return F.cross_entropy(logits, batch["labels"])  # logits (B, C)
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)  # (B·T, V)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, dataset, kind: str, batch_size: int = 64, rank: int = 0, world_size: int = 1) -> dict:
    """Accuracy (classification) or mean token loss and perplexity (LM) over a whole split; with
    world_size > 1 each process scores its shard and the sums are added up (every process must call)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    loss_sum = 0.0
    for batch in dataset.batches(batch_size, rank=rank, world_size=world_size):
        if len(batch["labels"]) == 0:  # this process's shard of the last global batch is empty
            continue
        batch = to_device(batch, device)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        if kind == "classification":
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            total += len(batch["labels"])
        else:
            targets = batch["labels"].flatten()
            loss_sum += F.cross_entropy(logits.flatten(0, 1), targets, ignore_index=-100,
                                        reduction="sum").item()
            total += (targets != -100).sum().item()
    if world_size > 1:
        sums = torch.tensor([correct, total, loss_sum], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        correct, total, loss_sum = sums.tolist()
    model.train(was_training)
    if kind == "classification":
        return {"accuracy": correct / max(total, 1)}
    loss = loss_sum / max(total, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


def headline(metrics: dict) -> str:
    return f"accuracy {metrics['accuracy']:.4f}" if "accuracy" in metrics \
        else f"perplexity {metrics['perplexity']:.2f}"


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: no parameter has requires_grad")
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]  # biases and norm weights
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def make_scheduler(optimizer, warmup: float, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """warmup_cosine over `steps`, warming up for a `warmup` fraction of them (at least one step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(max(1, int(warmup * steps)), steps))


def peak_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------
# the loop


def training_batches(dataset, cfg: TrainConfig, progress: Progress, rank: int = 0, world_size: int = 1):
    """This process's shard of the shuffled training batches, epoch after epoch, starting from the
    data position in `progress` and advancing it (so a checkpoint knows where to continue)."""
    while True:
        epoch = dataset.batches(cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=progress.epoch,
                                rank=rank, world_size=world_size, drop_last=True)
        for index, batch in enumerate(epoch):
            if index >= progress.batch:  # earlier batches were trained on before the resume
                progress.batch = index + 1
                yield batch
        progress.epoch, progress.batch = progress.epoch + 1, 0


def accumulate_gradients(net, batches, kind: str, grad_accum: int, device, world_size: int):
    """Forward and backward over grad_accum micro-batches; returns (this process's loss, examples)."""
    loss_sum, examples = 0.0, 0
    for micro in range(grad_accum):
        batch = to_device(next(batches), device)
        # DDP averages the gradients across processes in backward; once per step is enough
        last = micro == grad_accum - 1
        with contextlib.nullcontext() if world_size == 1 or last else net.no_sync():
            loss = loss_fn(net, batch, kind) / grad_accum
            loss.backward()
        loss_sum += loss.item()
        examples += len(batch["input_ids"]) * world_size
    return loss_sum, examples


def train(model, data, cfg: TrainConfig) -> dict:
    """Fine-tune `model` (a method already applied) on `data` (minipeft.data.TaskData); returns a summary.

    Every check (output folder, batch size, the checkpoint to resume) runs before anything is written.
    Raises Stopped when the run ends early on purpose (see the class)."""
    rank, world_size = distributed()
    out = Path(cfg.out)
    check_output_folder(out, resume=cfg.resume)
    train_split = data.splits["train"]
    batches_per_epoch = train_split.num_batches(cfg.batch_size, world_size, drop_last=True)
    if batches_per_epoch == 0:
        processes = f" ({cfg.batch_size} × {world_size} processes)" if world_size > 1 else ""
        raise ValueError(f"the training split has {len(train_split)} examples, fewer than one batch of "
                         f"{cfg.batch_size * world_size}{processes}; lower --batch-size")
    steps = cfg.steps or max(1, int(cfg.epochs * batches_per_epoch / cfg.grad_accum))
    eval_every = cfg.eval_every or max(1, steps // 4)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.warmup, steps)
    options = run_options(cfg, world_size)
    progress, resumed = Progress(), None
    if cfg.resume:
        resumed = checkpoint.load(cfg.resume)
        check_resumable(resumed, model, options)
        progress = restore(resumed, model, optimizer, scheduler)

    # nothing has been written until here; from now on rank 0 writes
    log = MetricsLog(out if rank == 0 else None)
    try:
        if resumed:
            log.record(event="resume", step=progress.step, checkpoint=str(resumed.path))
        else:
            log.record(event="start", config=asdict(cfg), method=model.peft_config, steps=steps,
                       world_size=world_size, versions=versions())
        if progress.test_before is None:
            progress.test_before = evaluate(model, data.splits["test"], data.kind, cfg.eval_batch_size,
                                            rank, world_size)
            log.record(event="test_before", **progress.test_before)
        saved = resumed.path if resumed else None
        saved_step = progress.step if resumed else None

        def save():
            nonlocal saved, saved_step
            saved = save_checkpoint(out, model, optimizer, scheduler, progress, steps, options,
                                    rank, world_size)
            saved_step = progress.step
            log.record(event="checkpoint", step=progress.step, path=str(saved))

        device = next(model.parameters()).device
        net = model if world_size == 1 else DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=True,  # a method may own trainable parameters a batch does not use
            forward_sync_buffers=False)  # buffers (RoPE tables, 4-bit weights) never change
        if resumed:
            checkpoint.restore_rng(resumed, rank)
        else:
            torch.manual_seed(cfg.seed + rank)  # dropout; rank 0 draws what a single process would
            random.seed(cfg.seed + rank)
        trainable = [p for p in model.parameters() if p.requires_grad]
        model.train()
        batches = training_batches(train_split, cfg, progress, rank, world_size)
        bar = tqdm(range(progress.step + 1, steps + 1), initial=progress.step, total=steps, desc="train",
                   unit="step", dynamic_ncols=True, disable=rank != 0)
        say = bar.write if rank == 0 else (lambda message: None)
        with bar, StopSignal(quiet=rank != 0) as stop:
            for step in bar:
                start = time.perf_counter()
                loss, examples = accumulate_gradients(net, batches, data.kind, cfg.grad_accum, device,
                                                      world_size)
                loss, interrupted = agree(loss, stop.signum is not None, world_size, device)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm).item()
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                if finite:  # else the update is skipped; the step still counts, for the schedule
                    optimizer.step()
                step_scheduler(scheduler)
                optimizer.zero_grad(set_to_none=True)
                progress.count(step, examples, time.perf_counter() - start, finite)
                bar.set_postfix(loss=f"{loss:.4f}",
                                ex_per_s=f"{progress.examples / progress.train_seconds:.1f}")
                log.record(**step_row(step, loss, grad_norm, scheduler.get_last_lr()[0], finite))
                if not finite:
                    say(f"step {step}: non-finite loss or gradient; update skipped "
                        f"({progress.bad_streak} in a row)")
                    if progress.bad_streak >= cfg.max_bad_steps:
                        log.record(event="stopped", step=step, reason="non-finite steps")
                        raise Stopped(diverged_message(progress, cfg, saved, saved_step), exit_code=1)
                if step % eval_every == 0 or step == steps:
                    metrics = evaluate(model, data.splits["validation"], data.kind, cfg.eval_batch_size,
                                       rank, world_size)
                    progress.validation.append({"step": step, **metrics})
                    log.record(event="validation", step=step, **metrics)
                    say(f"step {step}/{steps}: validation {headline(metrics)}")
                if step < steps and (interrupted or step == cfg.stop_at):
                    save()
                    log.record(event="stopped", step=step, reason="interrupted" if interrupted else "stop_at")
                    signum = (stop.signum or signal.SIGTERM) if interrupted else 0  # maybe another process's
                    raise stopped_early(step, steps, signum, saved, out)
                if cfg.save_every and step % cfg.save_every == 0 and progress.bad_streak == 0:
                    save()
        if saved_step != progress.step:
            save()
        adapter_dir = out / "adapter"
        if rank == 0:
            save_adapter(model, adapter_dir)
        after = evaluate(model, data.splits["test"], data.kind, cfg.eval_batch_size, rank, world_size)
        summary = make_summary(model, cfg, progress, steps, after, adapter_dir, saved, world_size)
        log.record(event="summary", **summary)
        return summary
    finally:
        log.close()


def make_summary(model, cfg, progress: Progress, steps: int, after: dict, adapter_dir: Path, saved,
                 world_size: int) -> dict:
    total = sum(p.numel() for p in model.parameters()) + values_in_4bit_layers(model)  # 4-bit: buffers
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_bytes, frozen_fp32_bytes = frozen_weight_bytes(model)
    adapter_file = adapter_dir / ADAPTER_WEIGHTS
    return {
        "method": model.peft_config["method"], "options": model.peft_config["options"],
        "steps": steps, "trainable_parameters": trainable, "total_parameters": total,
        "trainable_percent": 100.0 * trainable / total,
        "adapter_bytes": adapter_file.stat().st_size if adapter_file.exists() else None,
        "frozen_weight_bytes": frozen_bytes, "frozen_weight_fp32_bytes": frozen_fp32_bytes,
        "peak_memory_bytes": peak_memory_bytes(), "seconds_per_step": progress.train_seconds / steps,
        "train_seconds": progress.train_seconds, "test_before": progress.test_before, "test_after": after,
        "adapter": str(adapter_dir), "checkpoint": str(saved), "skipped_steps": progress.bad_steps,
        "seed": cfg.seed, "world_size": world_size,
        "examples_per_step": cfg.batch_size * world_size * cfg.grad_accum, "versions": versions(),
    }


def format_summary(s: dict) -> str:
    v = s["versions"]
    return "\n".join([
        f"method               {s['method']} {s['options']}",
        f"trainable parameters {s['trainable_parameters']:,} of {s['total_parameters']:,} "
        f"({s['trainable_percent']:.3f}%)",
        f"adapter file         {s['adapter_bytes']:,} bytes  ({s['adapter']})",
        f"checkpoint           {s['checkpoint']}",
        f"frozen weights       {s['frozen_weight_bytes'] / 2**20:,.1f} MiB in memory "
        f"({s['frozen_weight_fp32_bytes'] / 2**20:,.1f} MiB if fp32)",
        f"peak memory (RSS)    {s['peak_memory_bytes'] / 2**20:,.0f} MiB",
        f"time                 {s['train_seconds']:.1f} s for {s['steps']} steps "
        f"({s['seconds_per_step']:.3f} s/step), {s['examples_per_step']} examples per step on "
        f"{s['world_size']} process{'es' if s['world_size'] > 1 else ''}",
        f"skipped steps        {s['skipped_steps']} (non-finite loss or gradient)",
        f"test before          {headline(s['test_before'])}",
        f"test after           {headline(s['test_after'])}",
        f"seed                 {s['seed']} (torch {v['torch']}, python {v['python']}, "
        f"minipeft {v['minipeft']})",
    ])


def step_scheduler(scheduler):
    with warnings.catch_warnings():  # a skipped first step would warn that the optimizer never stepped
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()


def step_row(step: int, loss: float, grad_norm: float, lr: float, finite: bool) -> dict:
    if finite:
        return dict(event="step", step=step, loss=loss, grad_norm=grad_norm, lr=lr)
    return dict(event="step", step=step, loss=None, grad_norm=None, lr=lr,
                skipped="non-finite loss or gradient")


def stopped_early(step: int, steps: int, signum: int, saved: Path, out: Path) -> Stopped:
    """At --stop-at (signum 0: exit code 0) or after a signal (exit code 128 + its number)."""
    why = "interrupted" if signum else "reached --stop-at"
    return Stopped(f"{why}: stopped after step {step} of {steps}; checkpoint saved to {saved}. Continue "
                   f"with the same options and --resume {out}", exit_code=128 + signum if signum else 0)


def diverged_message(progress: Progress, cfg: TrainConfig, saved, saved_step) -> str:
    first = progress.step - progress.bad_streak + 1
    kept = (f"the last good checkpoint, {saved} (step {saved_step}), is kept" if saved
            else "no checkpoint had been saved yet")
    return (f"stopped: the loss or gradient was not finite for {progress.bad_streak} steps in a row "
            f"(steps {first}-{progress.step}, --max-bad-steps {cfg.max_bad_steps}); {kept}. Lower --lr "
            "or check the data")


class MetricsLog:
    """Rows of JSON appended to <out>/metrics.jsonl; a no-op where folder is None (ranks other than 0)."""

    def __init__(self, folder: Path | None):
        self.file = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.file = open(folder / "metrics.jsonl", "a")

    def record(self, **row):
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


class StopSignal:
    """Within `with StopSignal() as stop:` the first SIGINT (Ctrl-C) or SIGTERM only sets
    stop.signum (the loop then saves a checkpoint and stops after its step); another one more than
    GRACE seconds later quits at once (KeyboardInterrupt). Signals within GRACE count as the same
    request: under torchrun, Ctrl-C reaches each worker twice, from the terminal and from torchrun."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    GRACE = 1.0

    def __init__(self, quiet: bool = False):
        self.quiet = quiet  # say nothing (processes other than rank 0)

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # only there can handlers be set
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum, self.first = signum, time.monotonic()
            if not self.quiet:
                print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
                      "(send it again to quit at once)", file=sys.stderr, flush=True)
        elif time.monotonic() - self.first > self.GRACE:
            self._restore()
            raise KeyboardInterrupt

    def _restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def __exit__(self, *exc):
        self._restore()


# ----------------------------------------------------------------------------------------------------
# checkpoints and resuming


def save_checkpoint(out: Path, model, optimizer, scheduler, progress: Progress, steps: int, options: dict,
                    rank: int, world_size: int) -> Path:
    """Every process calls this (the RNG states are gathered); rank 0 writes the checkpoint."""
    rng = checkpoint.rng_states(world_size)
    path = out / f"checkpoint-{progress.step}"
    if rank == 0:
        state = {"step": progress.step, "steps": steps, "progress": asdict(progress),
                 "scheduler": scheduler.state_dict(),
                 "run": options, "method": model.peft_config, "versions": versions()}
        path = checkpoint.save(out, model, optimizer, state, rng)
    return path


def run_options(cfg: TrainConfig, world_size: int) -> dict:
    """What determines a run's results, as a checkpoint stores it: the training options, cfg.run
    (model, task, ...) and the number of processes; not where or how often it saves or evaluates."""
    options = {k: v for k, v in asdict(cfg).items() if k not in ("run", *MAY_CHANGE_ON_RESUME)}
    options.update({k: v for k, v in cfg.run.items() if k not in MAY_CHANGE_ON_RESUME})
    options["world_size"] = world_size
    return json.loads(json.dumps(options))


def check_resumable(ckpt: checkpoint.Checkpoint, model, options: dict):
    """The checkpoint must come from the same base model, method and options as this run."""
    saved, mine = ckpt.state["method"], model.peft_config
    saved_run = ckpt.state["run"]
    if saved.get("base_fingerprint") != mine["base_fingerprint"]:
        raise ValueError(f"checkpoint {ckpt.path} was trained on another base model "
                         f"({saved_run.get('model', 'unknown')}, fingerprint "
                         f"{saved.get('base_fingerprint')}) than this run's ({options.get('model', 'this model')}, fingerprint "
                         f"{mine['base_fingerprint']}); resume with the model it was trained on")
    my_options = json.loads(json.dumps(mine["options"]))
    if saved.get("method") != mine["method"] or saved.get("options") != my_options:
        raise ValueError(f"checkpoint {ckpt.path} is method {saved.get('method')} {saved.get('options')}, "
                         f"but this run is {mine['method']} {my_options}; resume with the checkpoint's "
                         "method and options")
    differ = [k for k in sorted(saved_run.keys() | options.keys()) if saved_run.get(k) != options.get(k)]
    if differ:
        listed = ", ".join(f"{FLAG_NAMES.get(k, '--' + k.replace('_', '-'))} {saved_run.get(k)} "
                           f"(this run: {options.get(k)})" for k in differ)
        raise ValueError(f"checkpoint {ckpt.path} was made with other options: {listed}; resume with "
                         f"the same options, or start a new run from its weights with --init-adapter "
                         f"{ckpt.path}")


def restore(ckpt: checkpoint.Checkpoint, model, optimizer, scheduler) -> Progress:
    """Trainable parameters, optimizer and scheduler as saved; the RNG comes back later, just before
    the first step (checkpoint.restore_rng)."""
    checkpoint.restore_parameters(model, ckpt)
    checkpoint.restore_optimizer(optimizer, ckpt)
    try:
        scheduler.load_state_dict(ckpt.state["scheduler"])
        return Progress(**ckpt.state["progress"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {ckpt.path}: {checkpoint.STATE_JSON} is corrupt ({e}); resume "
                         "from another copy or start a new run") from None


def check_output_folder(out: Path, resume=None):
    """Stop before any work if `out` cannot be written, or if it holds an unfinished run that this run
    would replace (unless this run is that run, resumed)."""
    out = Path(out)
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder; choose another --out")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in {existing} ({e.strerror}); choose a writable "
                         "folder") from None
    if not (out / checkpoint.LATEST).exists():
        return
    if resume is not None and checkpoint.run_folder(resume).resolve() == out.resolve():
        return
    try:
        folder, state = checkpoint.read_state(out)
    except (ValueError, OSError) as e:
        raise ValueError(f"--out {out} holds a checkpoint that cannot be read ({e}); move it away or "
                         "choose another --out") from None
    if state["step"] < state["steps"]:
        raise ValueError(f"--out {out} holds an unfinished run ({folder.name}, step {state['step']} of "
                         f"{state['steps']}); continue it with --resume {out}, or choose another --out")


# ----------------------------------------------------------------------------------------------------
# processes and versions


def init_distributed() -> tuple[int, int]:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK,
    MASTER_ADDR, MASTER_PORT): nccl when CUDA is present (one GPU per process, by LOCAL_RANK), gloo
    on CPU. Without torchrun, or with one process, nothing happens. Returns (rank, world_size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return distributed()


def distributed() -> tuple[int, int]:
    """(rank, world_size) of this process: (0, 1) unless torch.distributed is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device_for_process():
    """The device a process trains on: its own GPU under torchrun with CUDA, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(loss: float, interrupted: bool, world_size: int, device) -> tuple[float, bool]:
    """The step's loss averaged over the processes, and whether any process was interrupted, so that
    every process takes the same decisions (skip, stop)."""
    if world_size == 1:
        return loss, interrupted
    both = torch.tensor([loss, float(interrupted)], dtype=torch.float64, device=device)
    dist.all_reduce(both)
    return both[0].item() / world_size, both[1].item() > 0


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "minipeft": _git_commit() or "unknown"}


def _git_commit() -> str | None:
    """The commit of a minipeft git checkout, read from .git (no git needed); None if not one."""
    git = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[len("ref: "):]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()[:12]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        pass
    return None

"""A training run around core/loop.py's train_step: the data, validation during training and the test
split before and after, checkpoints that a run resumes from exactly, signals, data parallelism with
torchrun, and the summary.

    for step in 1..steps:
        train_step(...)                                           (core/loop.py: one optimizer step)
        after max_bad_steps non-finite steps in a row:  stop, keeping the last good checkpoint
        at the validation steps:  evaluate the validation split
        every save_every steps, at the end, and on Ctrl-C / SIGTERM:  save a checkpoint

Metrics go to `<out>/metrics.jsonl` (and to train()'s writers: watch.py, runconfig.py), the adapter to
`<out>/adapter/` (written atomically by adapter_io.save_adapter). `train` runs in three parts
(TrainingRun): every check and the restore of a resumed checkpoint before anything is written, then the
loop, then the last checkpoint, the adapter and the summary (its rows and lines: report.py).

Checkpoints (scale/checkpoint.py: `<out>/checkpoint-<step>/`) hold the trainable parameters, AdamW's
state, the scheduler, the RNG states and the data position (epoch, batch). The batches of an epoch are a
permutation fixed by (seed, epoch) and dropout draws from the restored torch RNG, so a run resumed with
`resume=<out>` logs bit-identical losses to one that was never stopped. A resumed run must have the same
options (model, task, method, learning rate, batch size, ...); only where and how often it saves,
evaluates and stops may change (checkpoint.check_resumable). SIGINT (Ctrl-C) and SIGTERM finish the
current step, save a checkpoint and stop (raising `Stopped`); a second signal quits at once
(processes.StopSignal).

Data parallel (`torchrun --nproc_per_node N train.py ...`, scale/processes.py): each process holds the
whole model and trains on its own interleaved shard of every global batch of batch_size × N examples
(data.Dataset.batches); DistributedDataParallel averages the gradients, so a step equals one
single-process step on the global batch (up to float rounding) and the copies stay identical.
Validation and test are sharded the same way and their sums added up across processes. Only rank 0
writes files and shows progress. A model sharded with FSDP (scale/sharding.py, `train.py --fsdp`) is
trained as it is, without the DDP wrapper: fully_shard reduce-scatters the averaged gradients itself,
and checkpoints are saved and restored inside sharding.whole, so they hold whole tensors as usual.
"""
import contextlib
import json
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from minipeft.core.loop import StepResult, evaluate, make_optimizer, make_scheduler, train_step
from minipeft.core.adapted import task_defaults
from minipeft.formats.adapter_io import save_adapter
from minipeft.run.report import first_and_median_step, headline, make_summary, step_row, versions
from minipeft.scale import output
from minipeft.scale.precision import LossScaling, loss_scaling
from minipeft.scale.processes import Processes, StopSignal, check_same_options, data_parallel, is_sharded


def whole(model, optimizer=None, only: int | None = None):
    """sharding.whole (whole tensors inside the `with`) for a model FSDP sharded; nothing for any other."""
    if not is_sharded(model):
        return contextlib.nullcontext()
    from minipeft.scale.sharding import whole as gathered
    return gathered(model, optimizer, only)


def preference_objective(cfg):
    """The DPO loss the run's preference pairs train with (cfg.dpo, or DPO's defaults)."""
    from minipeft.extras.dpo import DPOLoss
    return cfg.dpo or DPOLoss()


# TrainConfig's whole-number options and their least values; of them, those that may be None
WHOLE_NUMBERS = {"batch_size": 1, "grad_accum": 1, "steps": 1, "eval_every": 0, "eval_batch_size": 1,
                 "eval_generate": 0, "save_every": 0, "max_bad_steps": 1, "stop_at": 1}
MAY_BE_NONE = ("steps", "eval_every", "stop_at")


@dataclass
class TrainConfig:
    epochs: float = 1.0  # used when steps is None
    steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 16  # per process: a step sees batch_size × processes × grad_accum examples
    grad_accum: int = 1
    batching: str = "by-length"  # or "random" (see BATCHING)
    lr: float | None = None  # peak learning rate; None: the method's own (registry Method.lr), as train.py
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of the steps, in [0, 1)
    max_grad_norm: float = 1.0  # 0 or less: no clipping, as transformers' Trainer
    eval_every: int | None = None  # steps between validation passes (and the last); None: four per run; 0: none
    eval_batch_size: int = 64
    eval_generate: int = 100  # sft: validation examples answered and scored by exact match each validation
    test: bool | None = None  # score the test split after training (and before); None: unless eval_every is 0
    test_before: bool = True  # score the test split before training too (the base model's result)
    seed: int = 0
    out: str | None = None  # None: the resume folder, or a new one (output.new_run_folder)
    overwrite: bool = False  # out may hold another run: its files are removed once every check has passed
    save_every: int = 100  # steps between checkpoints, and one at the end; 0: only when stopped early
    max_bad_steps: int = 10  # non-finite steps in a row that stop the run
    resume: str | None = None  # a run's output folder (or one of its checkpoints) to continue
    stop_at: int | None = None  # save a checkpoint and stop after this step (resume later)
    run: dict = field(default_factory=dict)  # what else defines the run: model, task, max_len, ...
    dpo: Any = None  # preference pairs: extras/dpo.py's DPOLoss, β and the loss variant (None: its defaults)

    def peak_lr(self, model, kind: str) -> float:
        """lr, or when lr is None the learning rate of the model's method for this kind of task
        (adapted.task_defaults, as train.py)."""
        return self.lr if self.lr is not None else task_defaults(model.peft_config["method"], kind)[0]

    def check(self):
        """Stop in one sentence on an option that makes no sense, naming it (train.py has checked its flags
        already, under their own names: train_args.check_numbers). A whole number of 0 steps or micro-batches
        trained nothing, and a batch of 0 divided by zero."""
        for name, least in WHOLE_NUMBERS.items():
            value = getattr(self, name)
            if not (value is None and name in MAY_BE_NONE) and (type(value) is not int or value < least):
                raise ValueError(f"TrainConfig.{name} must be a whole number >= {least}, got {value!r}")
        for name, ok, allowed in [("epochs", 0 < self.epochs < math.inf, "a finite number > 0"),
                                  ("lr", self.lr is None or 0 < self.lr < math.inf, "a finite number > 0"),
                                  ("weight_decay", 0 <= self.weight_decay < math.inf, "a finite number >= 0")]:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {allowed}, got {getattr(self, name)!r}")

    @property
    def scores_test(self) -> bool:
        """Whether the run scores its test split: test, or when test is None, unless eval_every is 0 (a run
        without evaluation, such as a smoke test, spends its time training)."""
        return self.test if self.test is not None else self.eval_every != 0


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


# options that may change when a run is resumed: where and how often it saves, evaluates and stops
MAY_CHANGE_ON_RESUME = ("out", "overwrite", "resume", "save_every", "stop_at", "max_bad_steps",
                        "eval_every", "eval_batch_size", "test", "init_adapter")


def run_options(cfg, world_size: int, sharded: bool = False) -> dict:
    """What determines a run's results, as a checkpoint stores it: the training options of `cfg`, cfg.run
    (model, task, ...), the number of processes and, for a model sharded with FSDP (sharding.py),
    "sharding": "fsdp"; not where or how often it saves or evaluates."""
    options = {k: v for k, v in asdict(cfg).items() if k not in ("run", *MAY_CHANGE_ON_RESUME)}
    options.update({k: v for k, v in cfg.run.items() if k not in MAY_CHANGE_ON_RESUME})
    options["world_size"] = world_size
    if sharded:  # absent otherwise, as in checkpoints older than --fsdp
        options["sharding"] = "fsdp"
    return json.loads(json.dumps(options))


# how the training split is cut into batches: each shuffled batch holds examples of about one length
# (data.Dataset.grouped_by_length: little padding), or batches as drawn, padded to their longest example
BATCHING = ("by-length", "random")


class Stopped(Exception):
    """The run stopped before its end on purpose: interrupted or at stop_at (a checkpoint was saved),
    or after max_bad_steps non-finite steps in a row (the last good checkpoint is kept)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def steps_changed(before: int, steps: int, step: int, lr: float) -> str:
    """The line a resumed run says when --steps changed its length."""
    what = "extending the finished run" if step == before else "changing the run's length"
    return (f"{what} from {before} to {steps} steps: AdamW's state carries on, and the warmup-cosine "
            f"learning-rate schedule now spans {steps} steps (lr {lr:.3g} at step {step + 1})")


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


def count_steps(train_split, cfg: TrainConfig, world_size: int) -> int:
    """The run's optimizer steps: cfg.steps, or cfg.epochs over the training split in whole global batches
    (batch_size × processes; an epoch's partial last batch is left out, where transformers' Trainer trains on
    it, so that every step sees as many examples; a step's micro-batches may span two epochs); the split must
    hold at least one global batch."""
    batches_per_epoch = train_split.num_batches(cfg.batch_size, world_size, drop_last=True)
    if batches_per_epoch == 0:
        processes = f" ({cfg.batch_size} × {world_size} processes)" if world_size > 1 else ""
        raise ValueError(f"the training split has {len(train_split)} examples, fewer than one batch of "
                         f"{cfg.batch_size * world_size}{processes}; lower --batch-size")
    if cfg.grad_accum > batches_per_epoch:
        raise ValueError(f"--grad-accum {cfg.grad_accum} takes {cfg.grad_accum} batches per step, but the training "
                         f"split's {len(train_split)} examples make {batches_per_epoch} batches of "
                         f"{cfg.batch_size * world_size}, so one step would see examples twice; lower --grad-accum "
                         "or --batch-size")
    return cfg.steps or max(1, int(cfg.epochs * batches_per_epoch / cfg.grad_accum))


class MetricsLog:
    """Rows of JSON appended to <out>/metrics.jsonl, each also handed to the writers (watch.py: CSV,
    TensorBoard, W&B, the plot; runconfig.py: config.yaml); a no-op where folder is None (ranks other
    than 0). `writers`: callables that take the folder and return an object with record(row) and close().
    A context manager: the file and the writers close on leaving `with`, also when the run stops early."""

    def __init__(self, folder: Path | None, writers=()):
        self.file, self.writers = None, []
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.file = open(folder / "metrics.jsonl", "a")
            self.writers = [open_writer(folder) for open_writer in writers]

    def record(self, **row):
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        for writer in self.writers:
            writer.record(row)

    def close(self):
        if self.file:
            self.file.close()
        for writer in self.writers:
            writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def validation_steps(steps: int, eval_every: int | None) -> set[int]:
    """The steps after which validation runs: every eval_every steps and the last; eval_every None: four
    times, after steps ⌈k·steps/4⌉ for k = 1..4 (fewer when steps < 4); 0: never."""
    if eval_every == 0:
        return set()
    if eval_every is None:
        return {math.ceil(k * steps / 4) for k in range(1, 5)}
    return set(range(eval_every, steps + 1, eval_every)) | {steps}


def train(model, data, cfg: TrainConfig, writers=()) -> dict:
    """Fine-tune `model` (a method already applied) on `data` (minipeft.core.data.TaskData); returns a summary.

    Every check (output folder, batch size, the checkpoint to resume) runs before anything is written.
    Raises Stopped when the run ends early on purpose (see the class). `writers`: more records of the
    run beside metrics.jsonl (MetricsLog), opened once the checks have passed."""
    run = TrainingRun(model, data, cfg)  # the checks; nothing has been written until here
    with MetricsLog(run.out if run.rank == 0 else None, writers) as log:  # from now on rank 0 writes
        run.start(log)
        try:
            run.loop()
        finally:
            # the DDP wrapper goes now, also when the loop raises (Stopped), while the process group is
            # alive: kept by a traceback until interpreter exit, its reducer would be freed after
            # destroy_process_group, and gloo's worker thread can deadlock on the GIL there
            run.net = None
        return run.finish()


class TrainingRun:
    """One call of train(). Creating it checks everything and restores the checkpoint to resume, if
    any, and only then creates the output folder (or, with overwrite, removes the previous run's files
    from it); start() logs and prepares the first step, loop() takes the steps, finish() saves the last
    checkpoint and the adapter and returns the summary."""

    def __init__(self, model, data, cfg: TrainConfig):
        cfg.check()
        if cfg.batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {cfg.batching!r}")
        if cfg.batching == "by-length":
            data = replace(data, splits={**data.splits, "train": data.splits["train"].grouped_by_length()})
        self.model, self.data = model, data
        self.processes = Processes()
        self.rank, self.world_size = self.processes.rank, self.processes.size
        out = cfg.out or (output.run_folder(cfg.resume) if cfg.resume else None)
        if out is not None:
            output.check_output_folder(out, resume=cfg.resume, overwrite=cfg.overwrite)
        self.cfg = cfg = replace(cfg, lr=cfg.peak_lr(model, data.kind))
        self.steps = count_steps(data.splits["train"], cfg, self.world_size)
        self.objective = preference_objective(cfg) if data.kind == "dpo" else None  # core/loop.py's Objective
        self.validation_steps = validation_steps(self.steps, cfg.eval_every)
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg.warmup, self.steps)
        self.scaling = loss_scaling(model, next(model.parameters()).device)  # fp16-mixed: LossScaling
        self.options = run_options(cfg, self.world_size, sharded=is_sharded(model))
        check_same_options(self.options, self.world_size)
        self.progress, self.resumed = Progress(), None
        if cfg.resume:
            from minipeft.scale import checkpoint  # loaded by a run that saves or resumes only
            self.resumed = checkpoint.load(cfg.resume)
            checkpoint.check_resumable(self.resumed, model, self.options, self.steps)
            with whole(model, self.optimizer):  # FSDP: every process keeps its rows of what is restored
                self.progress = checkpoint.restore(self.resumed, model, self.optimizer, self.scheduler, Progress)
            if self.steps != self.resumed.state["steps"]:  # --steps changed: the schedule spans the new count
                self.scheduler = make_scheduler(self.optimizer, cfg.warmup, self.steps, done=self.progress.step)
            if isinstance(self.scaling, LossScaling):
                self.scaling.load_state_dict(self.resumed.state["scaler"])
        # the newest checkpoint of this run and its step: the one kept if later steps diverge
        self.saved = self.resumed.path if self.resumed else None
        self.saved_step = self.progress.step if self.resumed else None
        self.log, self.net = None, None  # set by start()
        self.step_seconds = []  # this process's steps, timed (the first builds kernels; with --compile, compiles)
        # every check has passed: only now may the output folder change
        self.out = Path(out) if out is not None else output.new_run_folder(cfg.run, model.peft_config["method"])
        self.cfg = replace(cfg, out=str(self.out))
        if cfg.overwrite and self.rank == 0 and (removed := output.remove_run_files(self.out)):
            self.say(f"--overwrite: removed the previous run's {', '.join(removed)} from {self.out}")

    def start(self, log: MetricsLog):
        """Log the start (or the resume), score the test split before training (once per run), wrap
        the model for data parallelism, and seed the RNGs (or put back the checkpoint's)."""
        self.log = log
        if self.resumed:
            log.record(event="resume", step=self.progress.step, checkpoint=str(self.resumed.path), steps=self.steps)
            if self.steps != self.resumed.state["steps"]:
                self.say(steps_changed(self.resumed.state["steps"], self.steps, self.progress.step,
                                       self.scheduler.get_last_lr()[0]))
        else:
            log.record(event="start", config=asdict(self.cfg), method=self.model.peft_config, steps=self.steps,
                       world_size=self.world_size, versions=versions())
        if self.progress.test_before is None and self.cfg.test_before and self.cfg.scores_test:
            self.progress.test_before = self.evaluate("test")
            log.record(event="test_before", **self.progress.test_before)
        self.net = self.model if self.world_size == 1 or is_sharded(self.model) else data_parallel(self.model)
        if self.resumed:
            from minipeft.scale import checkpoint
            checkpoint.restore_rng(self.resumed, self.rank)
        else:
            torch.manual_seed(self.cfg.seed + self.rank)  # dropout; rank 0 draws what a single process would
            random.seed(self.cfg.seed + self.rank)

    def loop(self):
        """The steps from where the run is to its end; raises Stopped after a signal, at stop_at, or
        after max_bad_steps non-finite steps in a row."""
        cfg, progress = self.cfg, self.progress
        self.model.train()
        batches = training_batches(self.data.splits["train"], cfg, progress, self.rank, self.world_size)
        # the bar's s/step is the summary's: the time in train_step only (tqdm's own rate would count
        # validation and checkpoints too); its time left is by the wall clock
        bar = tqdm(range(progress.step + 1, self.steps + 1), initial=progress.step, total=self.steps,
                   desc="train", unit="step", dynamic_ncols=True, disable=self.rank != 0,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
        with bar, StopSignal(quiet=self.rank != 0) as stop:
            for step in bar:
                start = time.perf_counter()
                result = train_step(self.net, self.optimizer, self.scheduler, batches, self.data.kind,
                                    cfg.grad_accum, cfg.max_grad_norm, self.processes,
                                    stop_requested=stop.signum is not None, scaling=self.scaling,
                                    objective=self.objective)
                self.step_seconds.append(time.perf_counter() - start)
                progress.count(step, result.examples, self.step_seconds[-1], result.finite or result.overflow)
                bar.set_postfix_str(f"loss {result.loss:.4f}, {progress.train_seconds / progress.step:.3f} s/step, "
                                    f"{progress.examples / progress.train_seconds:.1f} examples/s")
                self.record_step(step, result)
                if step in self.validation_steps:
                    self.validate(step)
                if step < self.steps and (result.interrupted or step == cfg.stop_at):
                    # the signal may have reached another process only: then stop as on SIGTERM
                    self.stop_early(step, signum=(stop.signum or signal.SIGTERM) if result.interrupted else 0)
                if cfg.save_every and step % cfg.save_every == 0 and progress.bad_streak == 0:
                    self.save()

    def record_step(self, step: int, result: StepResult):
        """Log the step; after max_bad_steps non-finite steps in a row, stop (keeping the last good
        checkpoint)."""
        self.log.record(**step_row(step, result))
        if result.finite:
            return
        if result.overflow:  # dynamic loss scaling at work, not a divergence
            self.say(f"step {step}: the fp16 gradient overflowed at loss scale {result.loss_scale:g}; update "
                     f"skipped, scale lowered to {self.scaling.scale():g}")
            return
        streak = self.progress.bad_streak
        self.say(f"step {step}: non-finite loss or gradient; update skipped ({streak} in a row)")
        if streak >= self.cfg.max_bad_steps:
            self.log.record(event="stopped", step=step, reason="non-finite steps")
            raise Stopped(diverged_message(self.progress, self.cfg, self.saved, self.saved_step), exit_code=1)

    def validate(self, step: int):
        metrics = self.evaluate("validation")
        self.progress.validation.append({"step": step, **metrics})
        self.log.record(event="validation", step=step, **metrics)
        self.say(f"step {step}/{self.steps}: validation {headline(metrics)}")

    def stop_early(self, step: int, signum: int):
        """Save a checkpoint and raise Stopped: at --stop-at (signum 0: exit code 0) or after a signal
        (exit code 128 + its number)."""
        self.save()
        self.log.record(event="stopped", step=step, reason="interrupted" if signum else "stop_at")
        why = "interrupted" if signum else "reached --stop-at"
        raise Stopped(f"{why}: stopped after step {step} of {self.steps}; checkpoint saved to {self.saved}. "
                      f"Continue with --resume {self.out} (train.py reads the run's settings from its config.yaml)",
                      exit_code=128 + signum if signum else 0)

    def finish(self) -> dict:
        """The last checkpoint (if the run saves any, and the last step did not), the adapter, the test split
        after training, and the summary."""
        if self.cfg.save_every and self.saved_step != self.progress.step:
            self.save()
        adapter_dir = self.out / "adapter"
        with whole(self.model, only=0):  # FSDP: the trainable parameters gathered in rank 0 (all enter)
            if self.rank == 0:
                save_adapter(self.model, adapter_dir)
        after = self.evaluate("test") if self.cfg.scores_test else None
        summary = make_summary(self.model, self.cfg, self.progress, self.steps, after, adapter_dir, self.saved,
                               self.world_size, self.data.info)
        summary.update(first_and_median_step(self.step_seconds))
        self.log.record(event="summary", **summary)
        return summary

    def save(self):
        """Every process calls this (the RNG states are gathered); rank 0 writes the checkpoint."""
        from minipeft.scale import checkpoint  # loaded by a run that saves or resumes only
        rng = checkpoint.rng_states(self.world_size)
        path = self.out / f"checkpoint-{self.progress.step}"
        with whole(self.model, self.optimizer, only=0):  # FSDP: parameters and AdamW's state, in rank 0
            if self.rank == 0:
                state = {"step": self.progress.step, "steps": self.steps, "progress": asdict(self.progress),
                         "scheduler": self.scheduler.state_dict(), "run": self.options,
                         **({"scaler": self.scaling.state_dict()} if isinstance(self.scaling, LossScaling) else {}),
                         "method": self.model.peft_config, "versions": versions()}
                path = checkpoint.save(self.out, self.model, self.optimizer, state, rng)
        self.saved, self.saved_step = path, self.progress.step
        self.log.record(event="checkpoint", step=self.progress.step, path=str(path))

    def evaluate(self, split: str) -> dict:
        """The split's metrics. Instruction data is scored by the exact match of greedy answers: on the
        whole test split; on the first cfg.eval_generate validation examples, with their answer loss (every
        validation example's loss when eval_generate is 0)."""
        dataset, kind = self.data.splits[split], self.data.kind
        if kind != "sft" or (split == "validation" and not self.cfg.eval_generate):
            return evaluate(self.model, dataset, kind, self.cfg.eval_batch_size, self.processes, self.objective)
        from minipeft.run.exact_match import exact_match  # generation: instruction data only
        metrics = {}
        if split == "validation":
            dataset = dataset.head(self.cfg.eval_generate)
            metrics = evaluate(self.model, dataset, kind, self.cfg.eval_batch_size, self.processes)
        scored = exact_match(self.model, self.data.tokenizer, dataset, self.data.info["eos_id"], self.cfg.eval_batch_size)
        scored.pop("predictions")
        scored["exact_match_examples"] = scored.pop("examples")
        return {**metrics, **scored}  # exact_match (and choice_accuracy)

    def say(self, message: str):
        """A line for the user, above the progress bar; from rank 0 only."""
        if self.rank == 0:
            tqdm.write(message)


def diverged_message(progress: Progress, cfg: TrainConfig, saved, saved_step) -> str:
    first = progress.step - progress.bad_streak + 1
    kept = (f"the last good checkpoint, {saved} (step {saved_step}), is kept" if saved
            else "no checkpoint had been saved yet")
    return (f"stopped: the loss or gradient was not finite for {progress.bad_streak} steps in a row "
            f"(steps {first}-{progress.step}, --max-bad-steps {cfg.max_bad_steps}); {kept}. Lower --lr "
            "or check the data")

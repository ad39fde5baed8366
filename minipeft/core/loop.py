"""The training loop's lesson: AdamW, linear warmup then cosine decay, one optimizer step with gradient
accumulation, clipping and a guard against non-finite steps, and evaluation.

    for step in 1..steps:                                                       (train_step: one step)
        N = labelled tokens (or examples) in all micro-batches of all processes
        for micro in 1..grad_accum:  loss = Σ_i ℓ_i(model(batch)) / N;  loss.backward()
        if loss and ‖g‖₂ are finite:  clip ‖g‖₂ ≤ max_grad_norm (if > 0);  AdamW step
        else:                         skip the update
        lr ← schedule(step)

    schedule(s) = lr · (s + 1) / warmup                             for s < warmup     (s = 0, 1, ...)
                = lr · ½ (1 + cos(π · (s − warmup) / (steps − warmup)))   afterwards
    warmup      = ⌈fraction · steps⌉

This is transformers' get_cosine_schedule_with_warmup with warmup steps counted as its Trainer counts
a warmup ratio, except that the warmup runs one step ahead: transformers' first step has lr 0 (s / warmup)
and moves no weight, so a one-step run with warmup trains nothing. Without warmup the two are equal.

The loss of a step is the mean over every labelled token of its global batch (classification: over its
examples; an objective's own terms, e.g. preference pairs), however the batch is split into micro-batches,
processes or packed rows:

    L = 1/N · Σ_processes Σ_micro Σ_i ℓ_i        ℓ_i the cross-entropy of labelled token (or example) i

Each micro-batch backpropagates its own sum divided by N, so accumulation adds up exactly ∇L. Averaging
each micro-batch's mean instead would weigh a token of a micro-batch with few labels more than one of a
micro-batch with many (an instruction set whose answers are 1 and 20 tokens long: 59 % apart in
gradient norm). Data parallel averages the processes' gradients, so each process multiplies its sum by
the number of processes W before backward.

Only parameters with requires_grad reach the optimizer, so frozen weights cannot move and AdamW keeps
no state for them. Biases and norm weights get no weight decay; every other tensor does (undecayed).

Three hooks let the outer rings in without changing a line here: `processes` (OneProcess: the sums over
the other processes, none here; scale/processes.py's Processes adds them up across torchrun's processes),
`scaling` (NoLossScaling; fp16's dynamic loss scaling in scale/precision.py) and `objective` (Objective: a
loss other than cross-entropy, such as extras/dpo.py's preference losses). The whole run around
train_step — the data, validation, checkpoints, signals, the summary — is run/trainer.py's `train`.
"""
import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .model import at_least_fp32
from .adapted import lr_factors


class OneProcess:
    """What a step needs of the other processes, when there are none: sums over one process are the values
    themselves. scale/processes.py's Processes does the same over torchrun's processes."""
    rank, size = 0, 1

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """Σ over the processes of `values` (every process calls)."""
        return values

    def backward_context(self, net, last: bool):
        """The context of one micro-batch's backward (data parallel: exchange gradients on the last only)."""
        return contextlib.nullcontext()

    def whole_norm(self, norm: torch.Tensor) -> float:
        """‖g‖₂ of the whole model from clip_grad_norm_'s result (sharded models: a norm over the shards)."""
        return norm.item()


class NoLossScaling:
    """How the loss is scaled before backward, when it is not. fp16-mixed (scale/precision.py) multiplies
    it by S and divides the gradients by S before clipping, and skips a step whose gradients overflowed."""

    def backward(self, loss: torch.Tensor):
        loss.backward()

    def unscale(self, optimizer):
        pass

    def step(self, optimizer, loss: float, grad_norm: float) -> bool:
        """AdamW's step, unless the loss or the gradient is not finite; returns whether it overflowed."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            optimizer.step()
        return False

    def scale(self) -> float | None:
        return None


ONE_PROCESS, NO_LOSS_SCALING = OneProcess(), NoLossScaling()


class Objective(Protocol):
    """A loss the loop does not know, brought by an outer ring (extras/dpo.py's DPOLoss): what a batch
    adds to the step's loss and metrics, and how a split is scored."""

    def losses(self, net, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(the batch's summed loss, its metric sums: added up over micro-batches and processes)."""

    def terms(self, batch: dict) -> int:
        """How many terms the batch adds to the loss (the N the step's loss divides by)."""

    def step_metrics(self, sums: torch.Tensor) -> dict:
        """The step's metrics from the metric sums over its global batch."""

    def evaluate(self, model, dataset, batch_size: int, processes: OneProcess) -> dict:
        """The metrics over a whole split (every process calls)."""


MODEL_INPUTS = ("attention_mask", "position_ids", "document_ids")  # batch keys the model reads (packing: all)


def loss_fn(model, batch, kind: str, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the classes (one term per example), or over the tokens that have a label (lm,
    sft: labels -100 elsewhere, e.g. on the prompt; the LM logits are computed for those tokens only, a
    tile at a time). reduction "mean" divides the summed terms by their number (loss_terms), "sum" not.
    The datasets' labels are already the next tokens, aligned with input_ids: the model's shift_labels."""
    if kind == "dpo":
        raise ValueError("preference pairs train and score with their own loss: pass objective=DPOLoss()")
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    if kind == "classification":
        logits = at_least_fp32(model(batch["input_ids"], **inputs))  # (B, C)
        return F.cross_entropy(logits, batch["labels"], reduction=reduction)
    return model(batch["input_ids"], shift_labels=batch["labels"], reduction=reduction, **inputs)


def loss_terms(batch, kind: str) -> int:
    """How many terms the batch adds to a loss: its examples (classification) or labelled tokens."""
    labels = batch["labels"]
    return len(labels) if kind == "classification" else int((labels != IGNORE_INDEX).sum())


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, dataset, kind: str, batch_size: int = 64, processes: OneProcess = ONE_PROCESS,
             objective: Objective | None = None) -> dict:
    """Accuracy (classification) or mean token loss and perplexity (lm, sft: over the labelled tokens)
    over a whole split; with several processes each scores its shard and the sums are added up (every
    process must call). Exact match of generated answers: run/exact_match.py. With an objective: its own.

    The loss weighs every labelled token of the split alike, whatever batch_size. transformers' Trainer.evaluate
    reports the mean of its batches' token means weighted by their examples, which moves with its batch size
    (5 rows with answers of 1 to 20 tokens: 4.5949 in batches of 1, 4.5929 of 2, 4.6089 of 5); it equals this
    loss when it scores the split in one batch."""
    if objective is not None:
        return objective.evaluate(model, dataset, batch_size, processes)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    loss_sum = 0.0
    for batch in dataset.batches(batch_size, rank=processes.rank, world_size=processes.size, sort_by_length=True):
        if len(batch["labels"]) == 0:  # this process's shard of the last global batch is empty
            continue
        batch = to_device(batch, device)
        if kind == "classification":
            inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
            logits = model(batch["input_ids"], **inputs)  # (B, C)
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            total += len(batch["labels"])
        else:
            loss_sum += loss_fn(model, batch, kind, reduction="sum").item()
            total += loss_terms(batch, kind)
    sums = processes.total(torch.tensor([correct, total, loss_sum], dtype=torch.float64, device=device))
    correct, total, loss_sum = sums.tolist()
    model.train(was_training)
    if kind == "classification":
        return {"accuracy": correct / total if total else math.nan}
    loss = loss_sum / total if total else math.nan  # no labelled token scored: no loss (not a perfect 0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


def undecayed(model) -> set[int]:
    """The ids of the biases and the norms' weights: AdamW does not decay them (transformers' Trainer's rule,
    get_decay_parameter_names). Every other tensor decays, a method's vectors too (DoRA's magnitude, (IA)³'s
    and VeRA's scales, LLaMA-Adapter's gate), as the Trainer decays peft's."""
    norms = (torch.nn.LayerNorm, torch.nn.RMSNorm)
    return {id(p) for module in model.modules() for name, p in module.named_parameters(recurse=False)
            if name == "bias" or isinstance(module, norms)}


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: no parameter has requires_grad")
    factors = lr_factors(model)  # the method's per-parameter learning-rate factors (LoRA+: B × lr_ratio)
    no_decay = undecayed(model)
    groups = []
    for decay in (True, False):
        for factor in sorted({factors.get(n, 1.0) for n, _ in trainable}):
            params = [p for n, p in trainable if (id(p) not in no_decay) == decay and factors.get(n, 1.0) == factor]
            groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * factor})
    groups = [g for g in groups if g["params"]]
    try:  # one fused kernel per step (CPU: 36 instead of 157 ms for MiniLM's 22.6M parameters), as
        # transformers' Trainer defaults to; the same update up to float rounding
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=lr)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """The learning rate's factor at step s = 0, 1, ...: (s + 1) / warmup_steps while warming up, then
    half a cosine from 1 down to 0 at total_steps (the module docstring)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def make_scheduler(optimizer, warmup: float, steps: int, done: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """warmup_cosine over `steps`, warming up for ⌈warmup · steps⌉ of them (warmup: a fraction in [0, 1),
    counted as transformers' TrainingArguments counts a ratio; 0: no warmup); `done` steps already taken (a
    resumed optimizer, whose param_groups hold their initial_lr). transformers reads a warmup of 1 or more as
    a number of steps; this one refuses it rather than warm up for that many times `steps`."""
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup is the fraction of the run's {steps} steps that warm up the learning rate, in "
                         f"[0, 1), got {warmup}; for n warmup steps pass n / {steps}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(math.ceil(warmup * steps), steps),
                                             last_epoch=done - 1)


def step_scheduler(scheduler):
    with warnings.catch_warnings():  # a skipped first step would warn that the optimizer never stepped
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()



# ----------------------------------------------------------------------------------------------------
# one step


@dataclass
class StepResult:
    loss: float  # the mean over the labelled tokens (or examples) of the whole global batch
    lr: float  # the learning rate the step ran at (of the first parameter group)
    grad_norm: float  # ‖g‖₂ before clipping
    finite: bool  # loss and grad_norm are finite; if not, the update was skipped
    examples: int  # trained on in this step, by all processes together
    interrupted: bool  # some process was asked to stop (stop_requested)
    loss_scale: float | None = None  # fp16-mixed: the loss scale this step used (None without scaling)
    overflow: bool = False  # fp16-mixed: the scaled gradient overflowed; the scaler skipped the update
    #                         and lowered loss_scale (expected now and then: not a divergence)
    metrics: dict | None = None  # an objective's step_metrics (preference pairs: reward margin, accuracy, …)


def accumulate_gradients(net, batches, kind: str, grad_accum: int, device, processes: OneProcess = ONE_PROCESS,
                         scaling: NoLossScaling = NO_LOSS_SCALING, objective: Objective | None = None):
    """Forward and backward over the next grad_accum micro-batches of `batches`, each scaled so that the
    gradients add up to those of the step's loss L (the mean over the N labelled tokens, examples or pairs
    of all micro-batches of all processes; module docstring). Returns (W · this process's share of L, the
    examples of the step on all processes, and with an objective this process's metric sums, else None):
    averaged over the processes, the first is L."""
    W = processes.size
    micro_batches = [to_device(next(batches), device) for _ in range(grad_accum)]
    terms = sum(objective.terms(b) if objective is not None else loss_terms(b, kind) for b in micro_batches)
    terms = int(processes.total(torch.tensor(terms, dtype=torch.int64, device=device)))  # N
    loss_sum, examples, sums = 0.0, 0, None
    for micro, batch in enumerate(micro_batches):
        with processes.backward_context(net, last=micro == grad_accum - 1):
            if objective is not None:
                summed, batch_sums = objective.losses(net, batch)
                sums = batch_sums if sums is None else sums + batch_sums
            else:
                summed = loss_fn(net, batch, kind, reduction="sum")
            loss = summed * (W / max(terms, 1))
            scaling.backward(loss)
        loss_sum += loss.item()
        # a packed batch says how many examples its rows hold (a batch of pairs: how many pairs)
        examples += (int(batch["examples"]) if "examples" in batch else len(batch["input_ids"])) * W
    return loss_sum, examples, sums


def clip_gradients(trainable, max_grad_norm: float | None, processes: OneProcess = ONE_PROCESS) -> float:
    """‖g‖₂ of the whole model before clipping, the gradient scaled down to at most max_grad_norm. As in
    transformers' Trainer, a max_grad_norm of 0, below 0 or None clips nothing (clip_grad_norm_ would zero
    the gradient for 0 and flip its sign below 0); the norm is still measured, clipped to ∞ (a factor of 1)."""
    limit = max_grad_norm if max_grad_norm is not None and max_grad_norm > 0 else math.inf
    return processes.whole_norm(torch.nn.utils.clip_grad_norm_(trainable, limit))


def train_step(net, optimizer, scheduler, batches, kind: str, grad_accum: int = 1, max_grad_norm: float = 1.0,
               processes: OneProcess = ONE_PROCESS, stop_requested: bool = False,
               scaling: NoLossScaling = NO_LOSS_SCALING, objective: Objective | None = None) -> StepResult:
    """One optimizer step, as run/trainer.py's train() takes it and bench/parity.py measures it: forward and
    backward over grad_accum micro-batches drawn from the iterator `batches`, the loss (and stop_requested,
    this process's) agreed across the processes, the gradient clipped to max_grad_norm, an AdamW step unless
    the loss or the gradient is not finite, the schedule advanced either way, the gradients freed.

    `net` is the model, in training mode (or the wrapper data parallel puts around it); `kind` is the task's
    ("classification", "lm", "sft" or "dpo"); `objective` replaces the cross-entropy (Objective)."""
    device = next(net.parameters()).device
    loss_scale = scaling.scale()
    lr = scheduler.get_last_lr()[0]  # before the schedule advances below
    loss, examples, sums = accumulate_gradients(net, batches, kind, grad_accum, device, processes, scaling, objective)
    agreed = processes.total(torch.tensor([loss, float(stop_requested)], dtype=torch.float64, device=device))
    loss, interrupted = agreed[0].item() / processes.size, agreed[1].item() > 0
    metrics = None if sums is None else objective.step_metrics(processes.total(sums))
    trainable = [p for p in net.parameters() if p.requires_grad]
    scaling.unscale(optimizer)
    grad_norm = clip_gradients(trainable, max_grad_norm, processes)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    overflow = scaling.step(optimizer, loss, grad_norm)  # steps unless not finite (the step counts either way)
    step_scheduler(scheduler)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, lr, grad_norm, finite, examples, interrupted, loss_scale, overflow, metrics)

"""The training loop: AdamW, linear warmup then cosine decay, gradient accumulation and clipping,
evaluation on the validation split during training and on the test split before and after.

    for step in 1..steps:
        for micro in 1..grad_accum:  loss = L(model(batch)) / grad_accum;  loss.backward()
        clip ‖g‖₂ ≤ max_grad_norm;  AdamW step;  lr ← schedule(step)

    schedule(s) = lr · s / warmup                                   for s < warmup
                = lr · ½ (1 + cos(π · (s − warmup) / (steps − warmup)))   afterwards

Only parameters with requires_grad reach the optimizer, so frozen weights cannot move and AdamW keeps
no state for them. Biases and norm weights (1-D tensors) get no weight decay. Metrics go to
`<out>/metrics.jsonl`, the adapter to `<out>/adapter/` (written atomically by peft.save_adapter).
"""
import json
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import peft
from .quant import frozen_weight_bytes


@dataclass
class TrainConfig:
    epochs: float = 1.0  # used when steps is None
    steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of the steps
    max_grad_norm: float = 1.0
    eval_every: int = 0  # steps between validation passes; 0 = four per run
    eval_batch_size: int = 64
    seed: int = 0
    out: str = "checkpoints/run"


def loss_fn(model, batch, kind: str) -> torch.Tensor:
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    if kind == "classification":
        return F.cross_entropy(logits, batch["labels"])  # logits (B, C)
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)  # (B·T, V)


@torch.no_grad()
def evaluate(model, dataset, kind: str, batch_size: int = 64) -> dict:
    """Accuracy (classification) or mean token loss and perplexity (LM) over a whole split."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for batch in dataset.batches(batch_size):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        if kind == "classification":
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            total += len(batch["labels"])
        else:
            targets = batch["labels"].flatten()
            loss_sum += F.cross_entropy(logits.flatten(0, 1), targets, ignore_index=-100,
                                        reduction="sum").item()
            total += (targets != -100).sum().item()
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


def peak_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _endless_batches(dataset, cfg: TrainConfig):
    epoch = 0
    while True:
        yield from dataset.batches(cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, drop_last=True)
        epoch += 1


def train(model, data, cfg: TrainConfig) -> dict:
    """Fine-tune `model` (a method already applied) on `data` (minipeft.data.TaskData); returns a summary."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train_split = data.splits["train"]
    batches_per_epoch = train_split.num_batches(cfg.batch_size, drop_last=True)
    if batches_per_epoch == 0:
        raise ValueError(f"the training split has {len(train_split)} examples, fewer than one batch of "
                         f"{cfg.batch_size}; lower --batch-size")
    steps = cfg.steps or max(1, int(cfg.epochs * batches_per_epoch / cfg.grad_accum))
    eval_every = cfg.eval_every or max(1, steps // 4)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(max(1, int(cfg.warmup * steps)), steps))
    log = open(out / "metrics.jsonl", "a")

    def record(**row):
        log.write(json.dumps(row) + "\n")
        log.flush()

    record(event="start", config=asdict(cfg), method=model.peft_config)
    before = evaluate(model, data.splits["test"], data.kind, cfg.eval_batch_size)
    record(event="test_before", **before)

    model.train()
    batches = _endless_batches(train_split, cfg)
    examples, train_seconds = 0, 0.0
    bar = tqdm(range(1, steps + 1), desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        start = time.perf_counter()
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            loss = loss_fn(model, batch, data.kind) / cfg.grad_accum
            loss.backward()
            step_loss += loss.item()
            examples += len(batch["input_ids"])
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - start
        bar.set_postfix(loss=f"{step_loss:.4f}", ex_per_s=f"{examples / train_seconds:.1f}")
        record(event="step", step=step, loss=step_loss, grad_norm=grad_norm.item(),
               lr=scheduler.get_last_lr()[0])
        if step % eval_every == 0 or step == steps:
            metrics = evaluate(model, data.splits["validation"], data.kind, cfg.eval_batch_size)
            record(event="validation", step=step, **metrics)
            bar.write(f"step {step}/{steps}: validation {headline(metrics)}")
    bar.close()

    adapter_dir = peft.save_adapter(model, out / "adapter")
    after = evaluate(model, data.splits["test"], data.kind, cfg.eval_batch_size)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_bytes, frozen_fp32_bytes = frozen_weight_bytes(model)
    summary = {
        "method": model.peft_config["method"], "options": model.peft_config["options"],
        "steps": steps, "trainable_parameters": trainable, "total_parameters": total,
        "trainable_percent": 100.0 * trainable / total,
        "adapter_bytes": (adapter_dir / peft.ADAPTER_WEIGHTS).stat().st_size,
        "frozen_weight_bytes": frozen_bytes, "frozen_weight_fp32_bytes": frozen_fp32_bytes,
        "peak_memory_bytes": peak_memory_bytes(), "seconds_per_step": train_seconds / steps,
        "train_seconds": train_seconds, "test_before": before, "test_after": after,
        "adapter": str(adapter_dir),
    }
    record(event="summary", **summary)
    log.close()
    return summary


def format_summary(s: dict) -> str:
    return "\n".join([
        f"method               {s['method']} {s['options']}",
        f"trainable parameters {s['trainable_parameters']:,} of {s['total_parameters']:,} "
        f"({s['trainable_percent']:.3f}%)",
        f"adapter file         {s['adapter_bytes']:,} bytes  ({s['adapter']})",
        f"frozen weights       {s['frozen_weight_bytes'] / 2**20:,.1f} MiB in memory "
        f"({s['frozen_weight_fp32_bytes'] / 2**20:,.1f} MiB if fp32)",
        f"peak memory (RSS)    {s['peak_memory_bytes'] / 2**20:,.0f} MiB",
        f"time                 {s['train_seconds']:.1f} s for {s['steps']} steps "
        f"({s['seconds_per_step']:.3f} s/step)",
        f"test before          {headline(s['test_before'])}",
        f"test after           {headline(s['test_after'])}",
    ])

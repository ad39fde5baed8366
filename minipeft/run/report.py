"""What a run reports: a row of metrics.jsonl per step, the summary at its end (also printed), and the
versions it ran with. trainer.py calls these; they only read what the run already holds. The printed
summary of `train.py --method lora --rank 8 --steps 5 --eval-every 5 --skip-test-before` begins and ends:

    method               lora {'rank': 8, 'alpha': 16.0, 'dropout': 0.0, 'targets': ['q', 'v'], ...}
    trainable parameters 74,498 of 22,639,874 (0.329%)
    ...
    test after           accuracy 0.6220
    seed                 0 (torch 2.13.0+cpu, python 3.11.7, minipeft 1aa7417bbab8)
    output folder        checkpoints/minilm-rotten_tomatoes-lora-<date>-<time>
    {"test_before": null, "test_after": {"accuracy": 0.6220095693779905}}
"""
import importlib.metadata
import json
import platform
import resource
import statistics
from pathlib import Path

import torch

from minipeft.core.loop import StepResult
from minipeft.formats.adapter_io import ADAPTER_WEIGHTS
from minipeft.scale.precision import tensors_of_4bit_layers, values_in_4bit_layers, weight_bytes


def peak_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def headline(metrics: dict | None) -> str:
    if metrics is None:
        return "not scored"
    if "reward_accuracy" in metrics:
        return f"reward accuracy {metrics['reward_accuracy']:.4f}, margin {metrics['reward_margin']:.4f}"
    if "exact_match" in metrics:
        return f"exact match {metrics['exact_match']:.4f}"
    return f"accuracy {metrics['accuracy']:.4f}" if "accuracy" in metrics \
        else f"perplexity {metrics['perplexity']:.2f}"


def step_row(step: int, result: StepResult) -> dict:
    lr = result.lr
    scale = {} if result.loss_scale is None else {"loss_scale": result.loss_scale}
    if result.finite:
        return dict(event="step", step=step, loss=result.loss, grad_norm=result.grad_norm, lr=lr, **scale,
                    **{k: v for k, v in (result.metrics or {}).items() if k != "loss"})
    if result.overflow:
        return dict(event="step", step=step, loss=result.loss, grad_norm=None, lr=lr, **scale,
                    skipped="fp16 gradient overflow: loss scale lowered")
    return dict(event="step", step=step, loss=None, grad_norm=None, lr=lr, **scale,
                skipped="non-finite loss or gradient")


def frozen_weight_bytes(model, as_fp32: bool = False) -> int:
    """The frozen weights' bytes as the memory ledger counts them: full-precision and 4-bit (`as_fp32`: were
    every frozen value an fp32 number)."""
    weights = weight_bytes(model, as_fp32=as_fp32)
    return weights["frozen"] + weights["frozen_4bit"]


def make_summary(model, cfg, progress, steps: int, after: dict, adapter_dir: Path, saved,
                 world_size: int, data_info: dict | None = None) -> dict:
    """The run's summary: metrics.jsonl's last row, which format_summary prints (`progress`: trainer.Progress)."""
    four_bit = {id(t) for t in tensors_of_4bit_layers(model)}  # buffers, or parameters under FSDP
    total = sum(p.numel() for p in model.parameters() if id(p) not in four_bit) + values_in_4bit_layers(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter_file = adapter_dir / ADAPTER_WEIGHTS
    return {
        "method": model.peft_config["method"], "options": model.peft_config["options"],
        "steps": steps, "trainable_parameters": trainable, "total_parameters": total,
        "trainable_percent": 100.0 * trainable / total,
        "adapter_bytes": adapter_file.stat().st_size if adapter_file.exists() else None,
        "frozen_weight_bytes": frozen_weight_bytes(model),
        "frozen_weight_fp32_bytes": frozen_weight_bytes(model, as_fp32=True),
        "peak_memory_bytes": peak_memory_bytes(), "seconds_per_step": progress.train_seconds / steps,
        "train_seconds": progress.train_seconds, "test_before": progress.test_before, "test_after": after,
        "adapter": str(adapter_dir), "checkpoint": str(saved), "skipped_steps": progress.bad_steps,
        "seed": cfg.seed, "world_size": world_size,
        "examples_per_step": cfg.batch_size * world_size * cfg.grad_accum, "versions": versions(),
        "data": data_info or {},  # instruction data: row shape, chat template, rows cut to --max-len
    }


def first_and_median_step(seconds: list[float]) -> dict:
    """The first step apart from the median of the others: the first builds the kernels, and with --compile
    compiles the model (a new batch shape may recompile later ones, which the median leaves out)."""
    if not seconds:
        return {}
    return {"first_step_seconds": seconds[0], "median_step_seconds": statistics.median(seconds[1:] or seconds)}


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
        *([f"first step           {s['first_step_seconds']:.2f} s (it builds the kernels, and under --compile compiles "
           f"the model), then a median of {s['median_step_seconds']:.3f} s/step"] if "first_step_seconds" in s else []),
        f"skipped steps        {s['skipped_steps']} (non-finite loss or gradient)",
        *([f"instruction data     {d['shape']} rows, chat template {d['template']}, {d['truncated']} rows cut "
           f"from the left to --max-len, loss on {'every token' if d['train_on_prompt'] else 'the answers'}"]
          if (d := s.get("data")) else []),
        f"test before          {headline(s['test_before'])}",
        f"test after           {headline(s['test_after'])}",
        f"seed                 {s['seed']} (torch {v['torch']}, python {v['python']}, "
        f"minipeft {v['minipeft']})",
    ])


def print_results(summary: dict, out: str, ledger: dict | None, held: dict | None):
    """The summary, (--memory-report) the memory ledger against the measured peak, and (--fsdp) the bytes each
    process held."""
    print(format_summary(summary))
    print(f"output folder        {out}")
    if ledger is not None:
        from minipeft.extras import memory
        print(memory.format_report(ledger))
        print(f"  measured peak RSS              {summary['peak_memory_bytes'] / 2**20:10,.1f} MiB   "
              f"(ledger / measured {ledger['total'] / summary['peak_memory_bytes']:.2f}; the measured "
              "peak also covers loading and evaluation)")
    if held is not None:
        from minipeft.scale import sharding
        print(sharding.format_bytes_per_process(held))
    print(json.dumps({k: summary[k] for k in ("test_before", "test_after")}))


def versions() -> dict:
    """The versions a run used; minipeft's is the commit of a git checkout, else the installed package's."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "minipeft": _git_commit() or _installed_version() or "unknown"}


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("minipeft")
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The commit of a minipeft git checkout, read from .git (no git needed); None if not one."""
    root = Path(__file__).resolve().parents[2]
    git = root / ".git"
    try:
        if git.is_file():  # a worktree: .git names its own folder, whose commondir holds the refs
            git = root / git.read_text().split("gitdir:", 1)[1].strip()
        common = git / (git / "commondir").read_text().strip() if (git / "commondir").is_file() else git
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[len("ref: "):]
        if (common / ref).is_file():
            return (common / ref).read_text().strip()[:12]
        for line in (common / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        pass
    return None

"""Every PEFT method on the same task with the same step budget, one fresh process each.

    python bench/methods.py                      # minilm on rotten_tomatoes, 150 steps per method
    python bench/methods.py --steps 300 --methods lora,adapter

Prints a Markdown table: trainable parameters (count, % of the model), adapter file bytes, peak RSS,
seconds per optimizer step and test accuracy before/after. Each method trains with its own default
learning rate (see `python train.py --list-methods`) and otherwise identical settings.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minipeft import METHODS  # noqa: E402
from minipeft.trainer import headline  # noqa: E402

# options that differ from the method defaults, so each method fits the 6-layer MiniLM and a short run
OPTIONS = {"last_k": ["--layers", "2"], "llama_adapter": ["--layers", "6"]}


def run_method(method, args) -> dict:
    out = Path(args.out) / method
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", args.model, "--task", args.task,
           "--method", method, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--seed", str(args.seed), "--out", str(out), *OPTIONS.get(method, [])]
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = rows[-1]
    summary["wall_seconds"] = time.time() - started
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="model to fine-tune")
    p.add_argument("--task", default="rotten_tomatoes", help="task to fine-tune on")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to compare")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step")
    p.add_argument("--seed", type=int, default=0, help="seed shared by every run")
    p.add_argument("--out", default=str(ROOT / "checkpoints" / "bench_methods"), help="where runs are written")
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(f"{args.model} on {args.task}: {args.steps} steps × batch {args.batch_size}, seed {args.seed}\n")
    print("| method | trainable params | % of model | adapter bytes | peak RSS MiB | s/step | test before | test after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method in methods:
        s = run_method(method, args)
        options = ", ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in s["options"].items())
        print(f"| {method} {options} | {s['trainable_parameters']:,} | {s['trainable_percent']:.3f} | "
              f"{s['adapter_bytes']:,} | {s['peak_memory_bytes'] / 2**20:,.0f} | {s['seconds_per_step']:.3f} | "
              f"{headline(s['test_before'])} | {headline(s['test_after'])} |", flush=True)


if __name__ == "__main__":
    main()

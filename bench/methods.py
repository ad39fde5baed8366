"""Every PEFT method on the same task with the same step budget, one fresh process each.

    python bench/methods.py                      # minilm on rotten_tomatoes, 150 steps per method
    python bench/methods.py --steps 300 --methods lora,adapter
    python bench/methods.py --methods dora,ia3 --plot-with README.md   # new rows; the plot keeps the others

Prints a Markdown table — trainable parameters (count, % of the model), adapter file bytes, peak RSS,
seconds per optimizer step, inference milliseconds per test example (the adapter merged into the base
where the method merges) and test accuracy before/after — and writes it to `<out>/methods.md`, with a
plot of test accuracy against trainable parameters (log scale) in `<out>/methods.png`. Each method
trains with its own default learning rate (see `python train.py --list-methods`) and otherwise
identical settings; inference is timed in this process, one method at a time, batches of 64.

Then the same sentences as instructions: SmolLM2-135M-Instruct fine-tuned by supervised fine-tuning
(`--sft lora,qlora`) on rotten_tomatoes_instruct, loss on the answer only, `--sft-steps` steps of
`--batch-size` with `--sft-flags`, scored by exact match of its greedy answer ("positive" / "negative")
on the whole test split; the zero-shot row is the instruct model before training (the first run's test
before). `--sft-runs DIR,DIR` makes these rows from runs already made (their metrics.jsonl) instead of
training; either way the validation exact match over the steps (the first --eval-generate validation
examples, at every validation pass) is printed as an accuracy curve. `--sft ''` leaves them out.

The last rows train nothing: the few-shot in-context baseline of a causal LM (`--few-shot-model`,
default smollm2) with K labelled examples in its prompt (eval.py --few-shot; minipeft/extras/fewshot.py),
on the first `--few-shot-limit` test examples, plain and with contextual calibration (--calibrate);
`--few-shot ''` leaves them out.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minipeft as mp  # noqa: E402
from minipeft import METHODS
from minipeft.formats import tasks
from minipeft.extras import fewshot  # noqa: E402
from minipeft.core.loop import evaluate  # noqa: E402
from minipeft.run.report import headline  # noqa: E402

mp.fast.enable()  # minipeft as train.py runs it: the fast twins of the core (minipeft/fast/)

# options that differ from the method defaults, so each method fits the 6-layer MiniLM and a short run
OPTIONS = {"last_k": ["--layers", "2"], "llama_adapter": ["--layers", "6"]}


def run_method(method, args) -> dict:
    out = Path(args.out) / method
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", args.model, "--task", args.task,
           "--method", method, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--seed", str(args.seed), "--out", str(out), "--overwrite", *OPTIONS.get(method, [])]
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = rows[-1]
    summary["wall_seconds"] = time.time() - started
    return summary


def inference_ms_per_example(args, summary) -> float:
    """Time one pass over the test split with the trained adapter loaded (merged when it merges)."""
    n_classes = mp.read_adapter_config(summary["adapter"])["base"]["config"].get("n_classes")
    model, tokenizer = mp.from_pretrained(args.model, n_classes=n_classes)
    task = tasks.load_task(args.task, tokenizer, seed=args.seed)
    if task.kind == "classification" and not model.cfg.n_classes:
        model.add_classifier(task.n_classes)
    mp.load_adapter(model, summary["adapter"])
    if METHODS[summary["method"]].mergeable:
        mp.merge(model)
    test = task.splits["test"]
    evaluate(model, test, task.kind)  # warm-up
    start = time.perf_counter()
    evaluate(model, test, task.kind)
    return 1e3 * (time.perf_counter() - start) / len(test)


def few_shot_row(args, k: int, calibrate: bool) -> str:
    model, tokenizer = mp.from_pretrained(args.few_shot_model)
    task = tasks.load_task(args.task, tokenizer, seed=args.seed)
    start = time.perf_counter()
    result = fewshot.few_shot_accuracy(model, tokenizer, task, k=k, seed=args.seed, limit=args.few_shot_limit,
                                       calibrate=calibrate)
    ms = 1e3 * (time.perf_counter() - start) / result["examples"]
    how = ", calibrated" if calibrate else ""
    return (f"| no training: {args.few_shot_model} {k}-shot in context{how} (first {result['examples']} "
            f"test examples) | 0 | 0 | 0 | — | — | {ms:.1f} | — | accuracy {result['accuracy']:.4f} |")


def sft_runs(args) -> list[tuple[str, list[dict]]]:
    """(name, metrics rows) of each SFT run: trained now by train.py, or read from --sft-runs folders."""
    if args.sft_runs:
        folders = [Path(f) for f in args.sft_runs.split(",") if f]
        return [(f.name, [json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()])
                for f in folders]
    runs = []
    for i, method in enumerate(m for m in args.sft.split(",") if m):
        out = Path(args.out) / f"sft_{method}"
        cmd = [sys.executable, str(ROOT / "train.py"), "--model", args.sft_model, "--task", args.sft_task,
               "--method", method, "--steps", str(args.sft_steps), "--batch-size", str(args.batch_size),
               "--seed", str(args.seed), "--out", str(out), "--overwrite", *args.sft_flags.split(),
               *(["--skip-test-before"] if i else [])]  # the base model's score once
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"SFT {method} failed:\n{done.stderr[-2000:]}")
        runs.append((method, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]))
    return runs


def sft_rows(args) -> tuple[list[str], list[str]]:
    """Table rows (zero-shot, then each run) and the validation exact-match curve of each run."""
    rows, curves = [], []
    for i, (name, metrics) in enumerate(sft_runs(args)):
        s = metrics[-1]
        before = next((r for r in metrics if r.get("event") == "test_before"), None)
        if i == 0 and before:
            rows.append(f"| no training: {args.sft_model} zero-shot, instruction in its chat template (whole test "
                        f"split, greedy) | 0 | 0 | 0 | — | — | — | — | exact match {before['exact_match']:.4f} |")
        options = ", ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in s["options"].items())
        rows.append(f"| SFT {s['method']} {options}, {s['steps']} steps (exact match, whole test split) | "
                    f"{s['trainable_parameters']:,} | {s['trainable_percent']:.3f} | {s['adapter_bytes']:,} | "
                    f"{s['peak_memory_bytes'] / 2**20:,.0f} | {s['seconds_per_step']:.3f} | — | "
                    f"{headline(s['test_before'])} | {headline(s['test_after'])} |")
        curve = [f"{r['step']}: {r['exact_match']:.2f}" for r in metrics if r.get("event") == "validation"]
        curves.append(f"{name}: validation exact match by step ({metrics[-1]['steps']} steps) — " + ", ".join(curve))
    return rows, curves


def points_from_table(path: Path) -> list[tuple[str, int, float]]:
    """(method, trainable parameters, test accuracy after) of the method rows of a table this script wrote."""
    points = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[1].replace(",", "").isdigit() and cells[8].startswith("accuracy") \
                and cells[0].split()[0] in METHODS:
            points.append((cells[0].split()[0], int(cells[1].replace(",", "")), float(cells[8].split()[1])))
    return points


def plot(rows, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = {}  # methods landing on the same point share one label ("lora, qlora")
    for name, params, accuracy in rows:
        names.setdefault((params, accuracy), []).append(name)
    for (params, accuracy), same in names.items():
        ax.scatter(params, accuracy)
        ax.annotate(", ".join(same), (params, accuracy), textcoords="offset points", xytext=(5, 3), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="model to fine-tune")
    p.add_argument("--task", default="rotten_tomatoes", help="task to fine-tune on")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to compare")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step")
    p.add_argument("--seed", type=int, default=0, help="seed shared by every run")
    p.add_argument("--out", default=str(ROOT / "checkpoints" / "bench_methods"),
                   help="where runs, methods.md and methods.png are written")
    p.add_argument("--few-shot", default="0,4", help="comma-separated numbers of demonstrations, one "
                   "no-training baseline row each ('' for none)")
    p.add_argument("--few-shot-model", default="smollm2", help="causal LM for the few-shot row")
    p.add_argument("--few-shot-limit", type=int, default=300, help="test examples the few-shot row scores")
    p.add_argument("--sft", default="lora,qlora", help="comma-separated methods for the SFT rows ('' for none)")
    p.add_argument("--sft-model", default="smollm2", help="instruct model the SFT rows fine-tune")
    p.add_argument("--sft-task", default="rotten_tomatoes_instruct", help="instruction task of the SFT rows")
    p.add_argument("--sft-steps", type=int, default=60, help="optimizer steps of each SFT run")
    p.add_argument("--sft-flags", default="--targets all --pack --max-len 256 --eval-every 20 --eval-generate 64",
                   help="further train.py flags of the SFT runs")
    p.add_argument("--sft-runs", default=None, help="comma-separated output folders of SFT runs already made: "
                   "rows from their metrics.jsonl instead of training")
    p.add_argument("--threads", type=int, default=2, help="torch threads for timing inference")
    p.add_argument("--plot-with", default=None, metavar="FILE", help="a Markdown file holding an earlier table "
                   "of this script (README.md, a methods.md): its methods that this run leaves out join the plot")
    args = p.parse_args()
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in args.method_list if m not in METHODS]:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return args


def main():
    args = parse_args()
    methods = args.method_list
    torch.set_num_threads(args.threads)
    lines = [f"{args.model} on {args.task}: {args.steps} steps × batch {args.batch_size}, seed {args.seed}",
             "",
             "| method | trainable params | % of model | adapter bytes | peak RSS MiB | s/step "
             "| inference ms/example | test before | test after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    points = []
    for method in methods:
        s = run_method(method, args)
        ms = inference_ms_per_example(args, s)
        merged = " (merged)" if METHODS[method].mergeable else ""
        options = ", ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in s["options"].items())
        lines.append(f"| {method} {options} | {s['trainable_parameters']:,} | {s['trainable_percent']:.3f} | "
                     f"{s['adapter_bytes']:,} | {s['peak_memory_bytes'] / 2**20:,.0f} | {s['seconds_per_step']:.3f} | "
                     f"{ms:.2f}{merged} | {headline(s['test_before'])} | {headline(s['test_after'])} |")
        print(lines[-1], flush=True)
        if "accuracy" in s["test_after"]:
            points.append((method, s["trainable_parameters"], s["test_after"]["accuracy"]))
    curves = []
    if args.sft or args.sft_runs:
        rows, curves = sft_rows(args)
        lines += rows
        print("\n".join(rows), flush=True)
    for k in (int(k) for k in args.few_shot.split(",") if k):
        for calibrate in (False, True):
            lines.append(few_shot_row(args, k, calibrate))
            print(lines[-1], flush=True)
    lines += [""] + curves
    print("\n".join(curves), flush=True)
    out = Path(args.out)
    (out / "methods.md").write_text("\n".join(lines) + "\n")
    if args.plot_with:  # the methods this run left out, from an earlier table
        points += [p for p in points_from_table(Path(args.plot_with)) if p[0] not in methods]
    if points:
        plot(points, out / "methods.png", f"{args.model} on {args.task}, {args.steps} steps")
    print(f"\nwrote {out / 'methods.md'}" + (f" and {out / 'methods.png'}" if points else ""))


if __name__ == "__main__":
    main()

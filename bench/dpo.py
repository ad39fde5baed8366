"""DPO on real data: SmolLM2-135M-Instruct learns to prefer the right Rotten Tomatoes label to the wrong one.

    python bench/dpo.py                         # the tables of docs/dpo.md
    python bench/dpo.py --quality-only          # only the reward-accuracy table
    python bench/dpo.py --quality-only --reuse-runs   # finish a stopped run: keeps the training runs that ended
    python bench/dpo.py --costs-only            # only the cost of a step (on the data a full run wrote)
    python bench/dpo.py --costs-only --mmap-threshold 131072   # peak RSS that follows the live tensors
    python bench/dpo.py --model tiny-llama --train-pairs 32 --dpo-steps 4 --sft-steps 4 --validation 8 --test 16

The pairs are rotten_tomatoes_preference's (preference.py): each review sentence asked as
rotten_tomatoes_instruct asks it ("Is this movie review positive or negative? Answer with one word."),
the right label chosen and the wrong one rejected, split by movie. They are written to
<out>/data/pairs/{train,validation,test}.jsonl: a random draw of --train-pairs training pairs, --validation
and --test pairs of held-out movies. <out>/data/sft/ holds the same prompts with
the chosen answers as prompt/completion rows: the instruction task SFT trains on and exact match scores.

  1. SFT (train.py): LoRA on every linear layer, --sft-steps of --batch-size conversations; exact match of
     the greedy answers to the test prompts before and after
  2. DPO (train.py --precompute-reference) from the base model (at --base-lr: its rewards start at 0) and
     from the SFT adapter (--init-adapter, at --lr: a step as large as SFT's undoes part of the SFT):
     --dpo-steps of --batch-size pairs; reward accuracy, margin and the policy's own preference on the
     held-out test pairs before and after, and the exact match of the DPO adapter (eval.py)
  3. the cost of a step, each kind in a process of its own (this script with --time KIND): an SFT step on
     2 × --batch-size conversations (as many rows as a batch of pairs), a DPO step with the reference pass
     (adapter off) and one with the reference log-probabilities precomputed; the median CPU seconds (all
     threads: what the step costs whatever else the machine runs) and wall seconds of --cost-steps steps
     after a warm-up, the process's peak RSS, and what precomputing every training pair took
"""
import argparse
import datetime
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minipeft.formats import preference  # noqa: E402

CPU_SECONDS = {}  # what each run took of the CPU (all its threads), by its output folder


def write_data(out: Path, n_train: int, n_validation: int, n_test: int, seed: int = 0) -> tuple[Path, Path]:
    """<out>/pairs (preference rows) and <out>/sft (prompt/completion rows) from the same draw of pairs."""
    rng = np.random.default_rng(seed)
    pairs = preference.rotten_tomatoes_pairs(seed)
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    for split, n in sizes.items():
        drawn = [pairs[split][i] for i in sorted(rng.permutation(len(pairs[split]))[:n])]
        rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": answers["chosen"]}],
                 "rejected": [{"role": "assistant", "content": answers["rejected"]}]} for _, prompt, answers in drawn]
        sft = [{"prompt": prompt[0]["content"], "completion": answers["chosen"]} for _, prompt, answers in drawn]
        for folder, lines in (("pairs", rows), ("sft", sft)):
            (out / folder).mkdir(parents=True, exist_ok=True)
            (out / folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return out / "pairs", out / "sft"


def run(script: str, *args, out: Path | None = None, label: str | None = None, keep_finished: bool = False) -> str:
    """Run a script of the repository (into a fresh `out` folder, unless keep_finished and it holds a finished
    run); its stdout (stops the benchmark with its stderr if it fails). Its CPU seconds go to
    CPU_SECONDS[label or the out folder's name]."""
    if out is not None:
        if keep_finished and finished(out):
            print(f"  {out} holds a finished run: kept (--reuse-runs)", flush=True)
            return ""
        shutil.rmtree(out, ignore_errors=True)
        args = (*args, "--out", out)
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    print("$", " ".join(command[1:]), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{script} failed:\n{done.stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"  {cpu:.0f} CPU seconds", flush=True)
    CPU_SECONDS[label or Path(out or script).name] = cpu
    return done.stdout


def finished(out: Path) -> bool:
    """Whether `out` holds a run that ended: its metrics.jsonl ends with the summary row."""
    log = out / "metrics.jsonl"
    return log.is_file() and json.loads(log.read_text().splitlines()[-1])["event"] == "summary"


def summary(out: Path) -> dict:
    """A run's summary row, with its validation rows under "validation"."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {**rows[-1], "validation": [r for r in rows if r["event"] == "validation"]}


def exact_match(printed: str) -> float:
    return float(re.search(r"exact match (\d\.\d+)", printed).group(1))


def time_steps(kind: str, args) -> dict:
    """--time KIND, in a process of its own: the median CPU and wall seconds of --cost-steps training steps
    of one kind after a warm-up step (batches wrap round a short split), the peak RSS, and (dpo-precomputed)
    the CPU seconds of precomputing the reference of every training pair."""
    import torch

    import minipeft as mp
    from minipeft.core import loop
    from minipeft.extras import dpo
    from minipeft.formats import tasks
    if args.mmap_threshold:
        mp.memory.mmap_large_tensors(args.mmap_threshold)
    model, tokenizer = mp.from_pretrained(args.model)
    mp.apply(model, "lora", targets=["all"])
    folder = ROOT / args.out / "data"
    if kind == "sft":
        split, rows = tasks.load_task(folder / "sft", tokenizer, max_len=256).splits["train"], 2 * args.batch_size
    else:
        split = preference.load_preferences(folder / "pairs", tokenizer, max_len=256).splits["train"]
        rows = args.batch_size
    cpu, wall, precompute = [], [], None
    if kind == "dpo-precomputed":  # every training pair, as train.py --precompute-reference does
        start = time.process_time()
        split = dpo.precompute_reference(model, split)
        precompute = {"pairs": len(split), "cpu_seconds": time.process_time() - start}
    optimizer = loop.make_optimizer(model, 2e-4, 0.0)
    scheduler = loop.make_scheduler(optimizer, 0.0, args.cost_steps + 1)
    model.train()
    for step in range(args.cost_steps + 1):
        batch = split.collate([(step * rows + i) % len(split) for i in range(rows)])
        started, started_cpu = time.perf_counter(), time.process_time()
        loop.train_step(model, optimizer, scheduler, iter([batch]), "sft" if kind == "sft" else "dpo",
                        objective=None if kind == "sft" else dpo.DPOLoss())
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return {"kind": kind, "rows": 2 * args.batch_size, "cpu": statistics.median(cpu[1:]),
            "wall": statistics.median(wall[1:]), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "precompute": precompute, "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="checkpoints/bench-dpo", help="where the data and the runs go")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per DPO step, conversations per SFT step")
    p.add_argument("--train-pairs", type=int, default=1600, help="training pairs drawn (SFT: their prompts)")
    p.add_argument("--dpo-steps", type=int, default=200)
    p.add_argument("--sft-steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=2e-4, help="DPO's peak learning rate from the SFT adapter")
    p.add_argument("--base-lr", type=float, default=5e-4, help="DPO's peak learning rate from the base model")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--validation", type=int, default=128, help="held-out pairs scored during training")
    p.add_argument("--test", type=int, default=512, help="held-out pairs scored before and after")
    p.add_argument("--cost-steps", type=int, default=4, help="steps timed per kind (after one warm-up)")
    p.add_argument("--costs-only", action="store_true", help="only the cost of a step (the data must be there)")
    p.add_argument("--quality-only", action="store_true", help="only the quality table (no cost of a step)")
    p.add_argument("--reuse-runs", action="store_true",
                   help="keep the training runs already finished in --out (to finish a benchmark that was stopped; "
                        "they must have been run with the same settings)")
    p.add_argument("--mmap-threshold", type=int, default=0, metavar="BYTES",
                   help="cost of a step: allocations this large or larger are returned to the system when freed "
                        "(mp.memory.mmap_large_tensors; 131072: the peak RSS follows the live tensors, steps slow "
                        "down); 0: glibc's default")
    p.add_argument("--time", choices=("sft", "dpo", "dpo-precomputed"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.time:
        return print(json.dumps(time_steps(args.time, args)))
    if args.costs_only:
        return report_costs(measure_costs())
    out = ROOT / args.out
    pairs, sft_rows = write_data(out / "data", args.train_pairs, args.validation, args.test)
    common = ["--model", args.model, "--targets", "all", "--max-len", "256", "--save-every", "0"]
    run("train.py", *common, "--task", sft_rows, "--steps", args.sft_steps, "--batch-size", args.batch_size,
        "--eval-generate", "0", out=out / "runs/sft", keep_finished=args.reuse_runs)
    results = {}
    for start, extra in (("base model", ["--lr", args.base_lr]),
                         ("SFT adapter", ["--lr", args.lr, "--init-adapter", out / "runs/sft/adapter"])):
        folder = out / "runs" / f"dpo-{start.split()[0].lower()}"
        run("train.py", *common, "--task", pairs, "--steps", args.dpo_steps, "--batch-size", args.batch_size,
            "--beta", args.beta, "--precompute-reference", "--eval-every", max(1, args.dpo_steps // 4), *extra,
            out=folder, keep_finished=args.reuse_runs)
        em = exact_match(run("eval.py", "--model", args.model, "--task", sft_rows, "--adapter", folder / "adapter",
                             "--max-len", "256", label=f"eval.py {folder.name}"))
        results[start] = (summary(folder), em)
    report(args, summary(out / "runs/sft"), results)
    if not args.quality_only:
        report_costs(measure_costs())


def measure_costs() -> list[dict]:
    """Each kind of step timed in a process of its own (this script with --time KIND)."""
    return [json.loads(run("bench/dpo.py", *sys.argv[1:], "--time", kind, label=f"--time {kind}").splitlines()[-1])
            for kind in ("sft", "dpo", "dpo-precomputed")]


def three(x: float) -> str:
    return f"{x:.3f}"


def report(args, sft: dict, results: dict):
    """The quality table of docs/dpo.md, in markdown."""
    print(f"\n{datetime.date.today()}, torch {sft['versions']['torch']}; python bench/dpo.py "
          f"{' '.join(sys.argv[1:])}\n")
    print("| start | steps × pairs | reward accuracy | reward margin | policy prefers chosen | exact match |")
    print("|---|---:|---|---|---|---|")
    em_before = {"base model": sft["test_before"]["exact_match"], "SFT adapter": sft["test_after"]["exact_match"]}
    for start, (run_summary, em) in results.items():
        b, a = run_summary["test_before"], run_summary["test_after"]
        print(f"| {start} | {run_summary['steps']} × {args.batch_size} | {three(b['reward_accuracy'])} → "
              f"{three(a['reward_accuracy'])} | {b['reward_margin']:.3f} → {a['reward_margin']:.3f} | "
              f"{three(b['policy_accuracy'])} → {three(a['policy_accuracy'])} | {three(em_before[start])} → "
              f"{three(em)} |")
    print(f"\nbefore → after, on {args.test} held-out pairs; DPO at β {args.beta:g}, lr {args.base_lr:g} from the "
          f"base model and {args.lr:g} from the SFT adapter, {args.train_pairs} training pairs. The SFT "
          f"adapter: {sft['steps']} steps × {args.batch_size} conversations (the chosen answers), exact match "
          f"{three(em_before['base model'])} → {three(em_before['SFT adapter'])}.")
    print(f"\nreward accuracy on the {args.validation} validation pairs during training:")
    for start, (run_summary, _) in results.items():
        print(f"- from the {start}: " + ", ".join(f"step {v['step']}: {v['reward_accuracy']:.3f}"
                                                   for v in run_summary["validation"]))


def report_costs(costs: list[dict]):
    """The cost table of docs/dpo.md, in markdown."""
    print(f"\n{datetime.date.today()}; python bench/dpo.py {' '.join(sys.argv[1:])}\n")
    print("| step | rows | CPU s/step | wall s/step | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    names = {"sft": "SFT", "dpo": "DPO, reference pass (adapter off) every step",
             "dpo-precomputed": "DPO, reference precomputed"}
    for c in costs:
        print(f"| {names[c['kind']]} | {c['rows']} | {c['cpu']:.2f} | {c['wall']:.2f} | {c['peak_rss'] / 2**20:,.0f} |")
    pre = costs[-1]["precompute"]
    print(f"\nprecomputing the reference of {pre['pairs']} pairs: {pre['cpu_seconds']:.1f} CPU s "
          f"({pre['cpu_seconds'] / pre['pairs']:.2f} per pair); {costs[0]['threads']} threads. CPU seconds of "
          "each run: " + ", ".join(f"{k} {v:,.0f}" for k, v in CPU_SECONDS.items()))


if __name__ == "__main__":
    main()

"""DPO on real data: SmolLM2-135M-Instruct learns to prefer the right Rotten Tomatoes label to the wrong one.

    python bench/dpo.py                         # the tables of docs/dpo.md (about 30 CPU minutes)
    python bench/dpo.py --model tiny-llama --dpo-steps 4 --sft-steps 4 --test 16

The pairs are rotten_tomatoes_preference's (preference.py): each review sentence asked as
rotten_tomatoes_instruct asks it ("Is this movie review positive or negative? Answer with one word."),
the right label chosen and the wrong one rejected, split by movie. They are written to
<out>/pairs/{train,validation,test}.jsonl: a random draw of --dpo-steps × --batch-size training pairs
(one epoch), --validation and --test pairs of the held-out movies. <out>/sft/ holds the same prompts with the
chosen answers as prompt/completion rows, the instruction task the exact match is scored on.

Every number comes from a train.py or eval.py run (subprocesses; their metrics.jsonl and printed
summaries are read back):

  1. SFT: LoRA on every linear layer trained on <out>/sft (--sft-steps), exact match before and after
  2. DPO from the base model and from the SFT adapter (--init-adapter): --dpo-steps of --batch-size pairs;
     reward accuracy, margin and the policy's own preference on the held-out test pairs before and after
  3. the exact match of each DPO adapter (eval.py on <out>/sft's test split)
  4. the cost, from the same runs: seconds per step and peak RSS of the SFT run and of the two DPO runs,
     the one from the base model with --precompute-reference (and the precomputation's time), the one from
     the SFT adapter with the reference pass (adapter off) at every step
"""
import argparse
import datetime
import json
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minipeft import preference  # noqa: E402

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


def run(script: str, *args, out: Path | None = None) -> str:
    """Run a script of the repository (into a fresh `out` folder); its stdout (stops the benchmark with its
    stderr if it fails)."""
    if out is not None:
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
    CPU_SECONDS[str(out or script)] = cpu
    return done.stdout


def summary(out: Path) -> dict:
    """A run's summary row, with its validation rows under "validation"."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {**rows[-1], "validation": [r for r in rows if r["event"] == "validation"]}


def exact_match(printed: str) -> float:
    return float(re.search(r"exact match (\d\.\d+)", printed).group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="checkpoints/bench-dpo", help="where the data and the runs go")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per DPO step")
    p.add_argument("--dpo-steps", type=int, default=20)
    p.add_argument("--sft-steps", type=int, default=20)
    p.add_argument("--validation", type=int, default=8, help="held-out pairs scored during training")
    p.add_argument("--test", type=int, default=64, help="held-out pairs scored before and after")
    p.add_argument("--beta", type=float, default=0.1)
    args = p.parse_args()
    out = ROOT / args.out
    pairs, sft_rows = write_data(out / "data", args.dpo_steps * args.batch_size, args.validation, args.test)
    common = ["--model", args.model, "--targets", "all", "--max-len", "256", "--save-every", "0"]

    run("train.py", *common, "--task", sft_rows, "--steps", args.sft_steps, "--batch-size", args.batch_size,
        "--eval-generate", "0", out=out / "runs/sft")
    sft = summary(out / "runs/sft")
    dpo = {}
    # from the base model with the reference precomputed, from the SFT adapter with the reference pass at every
    # step: the two ways' costs come from the same kind of step
    for start, extra in (("base model", ["--precompute-reference"]),
                         ("SFT adapter", ["--init-adapter", out / "runs/sft/adapter"])):
        folder = out / "runs" / f"dpo-{start.split()[0].lower()}"
        printed = run("train.py", *common, "--task", pairs, "--steps", args.dpo_steps, "--batch-size", args.batch_size,
                      "--beta", args.beta, "--eval-every", max(1, args.dpo_steps // 2), *extra, out=folder)
        em = exact_match(run("eval.py", "--model", args.model, "--task", sft_rows, "--adapter", folder / "adapter",
                             "--max-len", "256"))
        dpo[start] = (summary(folder), em, printed)

    report(args, sft, dpo)


def three(x: float) -> str:
    return f"{x:.3f}"


def report(args, sft: dict, dpo: dict):
    """The tables of docs/dpo.md, in markdown."""
    print(f"\n{datetime.date.today()}, torch {sft['versions']['torch']}, minipeft {sft['versions']['minipeft']}; "
          f"python bench/dpo.py {' '.join(sys.argv[1:])}\n")
    print("| start | steps × pairs | reward accuracy | reward margin | policy prefers chosen | exact match |")
    print("|---|---:|---|---|---|---|")
    em_before = {"base model": sft["test_before"]["exact_match"], "SFT adapter": sft["test_after"]["exact_match"]}
    for start, (run_summary, em, _) in dpo.items():
        b, a = run_summary["test_before"], run_summary["test_after"]
        print(f"| {start} | {run_summary['steps']} × {args.batch_size} | {three(b['reward_accuracy'])} → "
              f"{three(a['reward_accuracy'])} | {b['reward_margin']:.3f} → {a['reward_margin']:.3f} | "
              f"{three(b['policy_accuracy'])} → {three(a['policy_accuracy'])} | {three(em_before[start])} → "
              f"{three(em)} |")
    print(f"\nbefore → after training, on {args.test} held-out pairs (exact match: of the greedy answers to their "
          f"prompts). The SFT adapter: {sft['steps']} steps × {args.batch_size} conversations (the chosen answers), "
          f"exact match {three(em_before['base model'])} → {three(em_before['SFT adapter'])}.")
    print(f"\nreward accuracy on the {args.validation} validation pairs during training:")
    for start, (run_summary, _, _) in dpo.items():
        print(f"- from the {start}: " + ", ".join(f"step {v['step']}: {v['reward_accuracy']:.3f}"
                                                   for v in run_summary["validation"]))
    print("\n| run | rows per step | s/step | peak RSS MiB | CPU s (whole run) | reference log-probabilities |")
    print("|---|---:|---:|---:|---:|---|")
    runs = [("SFT", sft, args.batch_size, "—", "runs/sft")]
    for start, (run_summary, _, printed) in dpo.items():
        found = re.search(r"of ([\d,]+) pairs precomputed in ([\d.]+) s", printed)
        how = f"precomputed once before training: {found.group(1)} pairs in {found.group(2)} s" if found else \
            f"a forward pass of {2 * args.batch_size} rows with the adapter off, every step"
        runs.append((f"DPO from the {start}", run_summary, 2 * args.batch_size, how,
                     f"runs/dpo-{start.split()[0].lower()}"))
    for name, run_summary, rows, how, folder in runs:
        cpu = next(v for k, v in CPU_SECONDS.items() if k.endswith(folder))
        print(f"| {name} | {rows} | {run_summary['seconds_per_step']:.2f} | "
              f"{run_summary['peak_memory_bytes'] / 2**20:,.0f} | {cpu:,.0f} | {how} |")


if __name__ == "__main__":
    main()

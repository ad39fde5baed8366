"""Did a change slow the runs down? The same train.py runs in this checkout and in an earlier commit
(a temporary `git worktree`), interleaved, each timed by its own run summary (loading, evaluation and
saving excluded), best of the rounds: the median step after the first where both commits' summaries have
it (the first step builds kernels: in a 4-step run it moves the mean by more than a 5 % change would),
else the mean s/step of all steps.

    python bench/versions.py --against e483baa                 # the three runs below, 2 rounds
    python bench/versions.py --against HEAD~5 --runs headline --rounds 3

The runs (the README's, cut short): headline, MiniLM LoRA on Rotten Tomatoes; sft, SmolLM2-135M-Instruct
LoRA on every linear layer of rotten_tomatoes_instruct; qlora, the same with QLoRA and activation
checkpointing. Both checkouts read the same asset cache (MINIPEFT_CACHE, or each checkout's own).
The CPU flags that matter and the load average are printed above the table: on a shared machine the
rounds disagree, and only the best of them is a figure.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_description, load_average
from runs import train_summary

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--save-every", "0", "--skip-test-before", "--eval-every", "0"]
RUNS = {
    "headline": ["--method", "lora", "--rank", "8", "--steps", "40"],
    "sft": ["--model", "smollm2", "--task", "rotten_tomatoes_instruct", "--method", "lora", "--targets", "all",
            "--steps", "4", "--batch-size", "8"],
    "qlora": ["--model", "smollm2", "--task", "rotten_tomatoes_instruct", "--method", "qlora", "--targets", "all",
              "--grad-checkpoint", "--steps", "4", "--batch-size", "8"],
}


def seconds_per_step(checkout: Path, run: str, out: Path) -> dict:
    """One run of train.py in `checkout`: {"mean": its summary's s/step, "median": the median step after the
    first, or None from a commit whose summary does not have it}."""
    summary = train_summary(checkout, [*RUNS[run], *COMMON, "--overwrite"], out)
    return {"mean": summary["seconds_per_step"], "median": summary.get("median_step_seconds")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of them is shown")
    args = parser.parse_args()
    runs = args.runs.split(",")
    if unknown := [r for r in runs if r not in RUNS]:
        parser.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        earlier = Path(tmp) / "earlier"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(earlier), args.against], cwd=ROOT, check=True)
        try:
            times = {(run, side): [] for run in runs for side in ("earlier", "now")}
            for round_ in range(args.rounds):
                for run in runs:
                    for side, checkout in (("earlier", earlier), ("now", ROOT)):
                        times[run, side].append(seconds_per_step(checkout, run, Path(tmp) / f"{side}-{run}"))
                        print(f"round {round_ + 1} {run:8s} {side:7s} {times[run, side][-1]}", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(earlier)], cwd=ROOT, check=False)
    print(f"{cpu_description()}; {load_average()}")
    print(f"\n| run | s/step | {args.against} | {head} | ratio |\n|---|---|---:|---:|---:|")
    for run in runs:
        both = times[run, "earlier"] + times[run, "now"]
        kind = "median" if all(t["median"] is not None for t in both) else "mean"
        before, now = (min(t[kind] for t in times[run, side]) for side in ("earlier", "now"))
        label = "median after the first step" if kind == "median" else "mean of all steps"
        print(f"| {run} | {label} | {before:.3f} | {now:.3f} | {now / before:.2f} |")


if __name__ == "__main__":
    main()

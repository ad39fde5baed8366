"""Running train.py from a bench: one run in a checkout, its run summary back (the last row of the
metrics.jsonl it writes)."""
import json
import subprocess
import sys
from pathlib import Path


def train_summary(checkout: Path, flags: list[str], out: Path) -> dict:
    """`python train.py *flags --out out` in `checkout`; the run's summary row. A failed run stops the bench
    with the end of its stderr."""
    cmd = [sys.executable, "train.py", *flags, "--out", str(out)]
    done = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[1:])} failed in {checkout}:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(row for row in rows if row["event"] == "summary")

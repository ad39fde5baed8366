"""How much of a short run is training: a smoke test's wall time against the training steps' time in its
run summary (the rest is starting Python, loading the model and the data, and saving).

    python bench/smoke.py                      # SmolLM2 SFT, 10 steps, --eval-every 0 (no evaluation)
    python bench/smoke.py -- --method lora --rank 8 --steps 10 --eval-every 0      # any train.py flags

Prints the CPU and the load above the table: on a shared machine the wall time holds whatever else runs.
"""
import argparse
import tempfile
import time
from pathlib import Path

from machine import cpu_description, load_average
from runs import train_summary

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--model", "smollm2", "--task", "rotten_tomatoes_instruct", "--steps", "10", "--eval-every", "0"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("flags", nargs="*", help="train.py's flags (after --); default: " + " ".join(SMOKE))
    flags = parser.parse_args().flags or SMOKE
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        training = train_summary(ROOT, flags, out)["train_seconds"]
        wall = time.perf_counter() - start
    print(f"{cpu_description()}; {load_average()}\n")
    print("| run | wall s | training s | training / wall |\n|---|---:|---:|---:|")
    print(f"| `python train.py {' '.join(flags)}` | {wall:.1f} | {training:.1f} | {training / wall:.0%} |")


if __name__ == "__main__":
    main()

"""The memory loading takes: peak resident size of `mp.from_pretrained(name)` above the interpreter's own
(Python + torch + minipeft imported), against the bytes of the model it returns, for every named model,
each in a fresh process. The target (issue 18): at most 1.25× — the model plus what it takes to build it,
not a second whole copy.

    python bench/load_memory.py                       # minilm, smollm2, gemma3-270m
    python bench/load_memory.py --models smollm2 --dtype bf16-mixed
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, resource, sys
import minipeft as mp
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
baseline = rss()
with open("/proc/self/clear_refs", "w") as f:  # the peak mark back to the current size
    f.write("5")
model, _ = mp.from_pretrained(sys.argv[1], dtype=sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
print(json.dumps({"baseline": baseline, "peak": peak, "model": sum(t.numel() * t.element_size() for t in tensors)}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,smollm2,gemma3-270m", help="comma-separated named models")
    p.add_argument("--dtype", default="fp32", help="from_pretrained's dtype (a precision name)")
    args = p.parse_args()
    print(f"| model | dtype | model MiB | RSS after imports MiB | peak RSS MiB | (peak − imports) / model |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        done = subprocess.run([sys.executable, "-c", CHILD, name, args.dtype], cwd=ROOT, capture_output=True,
                              text=True)
        if done.returncode:
            print(f"| {name} | {args.dtype} | failed: {done.stderr.strip().splitlines()[-1]} | | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        mib = lambda n: f"{n / 2**20:,.0f}"
        print(f"| {name} | {args.dtype} | {mib(r['model'])} | {mib(r['baseline'])} | {mib(r['peak'])} | "
              f"{(r['peak'] - r['baseline']) / r['model']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

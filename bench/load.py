"""How long loading a GGUF model (and its tokenizer) takes: minipeft against transformers' GGUF path,
in the same run, each in a fresh process (alternating, the file already in the page cache).

    python bench/load.py                        # Gemma 3 270M (the gemma3-270m asset), 1 round
    python bench/load.py --model smollm2 --rounds 2

Prints a table: seconds for the tokenizer, the model and both, and the peak resident memory of each
process. The timings move with the machine and its load; the ratio is the figure to compare.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = {
    "minipeft": """
import time, resource, json, sys
start = time.perf_counter()
import minipeft as mp
imported = time.perf_counter()
model, tokenizer = mp.from_pretrained(sys.argv[1])
done = time.perf_counter()
print(json.dumps({"import": imported - start, "tokenizer": None, "model": None, "total": done - imported,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""",
    "transformers": """
import time, resource, json, sys, os
os.environ["HF_HUB_OFFLINE"] = "1"
from pathlib import Path
start = time.perf_counter()
import transformers
transformers.logging.set_verbosity_error()
imported = time.perf_counter()
path = Path(sys.argv[1])
tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
tokenized = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
done = time.perf_counter()
print(json.dumps({"import": imported - start, "tokenizer": tokenized - imported, "model": done - tokenized,
                  "total": done - imported, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""",
}


def run(library: str, argument: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "-c", CHILD[library], argument], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{library} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m", help="a named GGUF asset (gemma3-270m, smollm2) or a .gguf path")
    p.add_argument("--rounds", type=int, default=1, help="alternating minipeft / transformers loads per library")
    args = p.parse_args()
    from minipeft.formats.assets import asset_path
    path = asset_path(args.model) if not args.model.endswith(".gguf") else Path(args.model)
    path.read_bytes()  # into the page cache, for both
    results = {"minipeft": [], "transformers": []}
    for _ in range(args.rounds):
        for library in results:
            start = time.perf_counter()
            results[library].append(run(library, args.model if library == "minipeft" else str(path)))
            print(f"  {library}: {time.perf_counter() - start:.1f} s wall (process)", file=sys.stderr)
    print(f"{path.name} ({path.stat().st_size / 2**20:.0f} MiB), {os.cpu_count()} CPUs, rounds: {args.rounds}\n")
    print("| library | tokenizer s | model s | tokenizer + model s | import s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    best = {}
    for library, runs in results.items():
        r = min(runs, key=lambda x: x["total"])
        best[library] = r["total"]
        cell = (lambda v: "—" if v is None else f"{v:.1f}")
        print(f"| {library} | {cell(r['tokenizer'])} | {cell(r['model'])} | {r['total']:.1f} | {r['import']:.1f} | "
              f"{r['rss'] / 2**20:,.0f} |")
    print(f"\nminipeft loads in {best['minipeft'] / best['transformers']:.2f}× transformers' time "
          "(minipeft builds model and tokenizer in one call: its split is not measured)")


if __name__ == "__main__":
    main()

"""What a batch whose rows run different adapters costs (methods/multi.py), against one unmerged adapter.

    python bench/multi_adapter.py                          # minilm (real weights) and the GPT-2-small shape
    python bench/multi_adapter.py --models minilm --adapters 8 --repeats 10

Eight LoRA adapters (r=8 on q, v, each with its own random A and B) are saved and loaded side by side into
one base model. Each row of the batch runs adapter (row mod 8), via model(idx, adapter_names=[...]); the
reference is a model with one LoRA applied the usual way running the same batch unmerged, and the bare
base. A no-grad forward pass, the configurations interleaved, median of --repeats after one warm-up each.
Prints a Markdown table; the target is a mixed batch at most 1.5× one unmerged adapter.
"""
import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minipeft as mp  # noqa: E402

mp.fast.enable()  # minipeft as train.py runs it: the fast twins of the core (minipeft/fast/)

SHAPES = {  # name -> (how to build the base model, batch, tokens)
    "minilm": (lambda: mp.from_pretrained("minilm")[0], 16, 128),
    "gpt2": (lambda: mp.Transformer(mp.ModelConfig(flavor="gpt2", n_layer=12, n_head=12, d_model=768,
                                                   vocab_size=50257, max_seq_len=1024)), 8, 256),
}


def saved_loras(base, n: int, folder: Path, rank: int) -> list[Path]:
    """n LoRA adapters on `base` with random A and B, saved; their folders."""
    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        model = mp.apply(copy.deepcopy(base), "lora", rank=rank, targets="q,v")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(std=0.02)
        paths.append(mp.save_adapter(model, folder / f"adapter{i}"))
    return paths


def bench(name: str, n_adapters: int, repeats: int, rank: int) -> str:
    build, batch, tokens = SHAPES[name]
    torch.manual_seed(0)
    base = build().eval()
    idx = torch.randint(1, base.cfg.vocab_size, (batch, tokens))
    run = (lambda m, **kw: m.encode(idx, **kw)) if not base.cfg.causal else (lambda m, **kw: m(idx, **kw))
    with tempfile.TemporaryDirectory() as tmp:
        paths = saved_loras(base, n_adapters, Path(tmp), rank)
        one = mp.load_adapter(copy.deepcopy(base), paths[0]).eval()
        many = copy.deepcopy(base)
        for i, path in enumerate(paths):
            mp.load_adapter(many, path, name=f"a{i}")
    names = [f"a{row % n_adapters}" for row in range(batch)]
    configs = {"base": lambda: run(base), "one adapter, unmerged": lambda: run(one),
               "router, every row a0": lambda: run(many.eval()),
               f"{n_adapters} adapters, one per row": lambda: run(many.eval(), adapter_names=names)}
    times = {k: [] for k in configs}
    with torch.no_grad():
        for fn in configs.values():  # one warm-up each
            fn()
        for _ in range(repeats):  # interleaved, so drift in the machine's speed hits every configuration alike
            for k, fn in configs.items():
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
    median = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    reference = median["one adapter, unmerged"]
    return "\n".join(f"| {name} | {batch} × {tokens} | {k} | {ms:,.1f} | {ms / reference:.2f} |"
                     for k, ms in median.items())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,gpt2", help=f"comma-separated, of: {', '.join(SHAPES)}")
    p.add_argument("--adapters", type=int, default=8, help="adapters side by side in the mixed batch")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter")
    p.add_argument("--repeats", type=int, default=10, help="timed passes per configuration")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"no-grad forward, LoRA r={args.rank} on q, v, median of {args.repeats}, {args.threads} threads\n")
    print("| model | batch | configuration | ms / batch | × one adapter |\n|---|---|---|---:|---:|")
    for name in args.models.split(","):
        print(bench(name.strip(), args.adapters, args.repeats, args.rank), flush=True)


if __name__ == "__main__":
    main()

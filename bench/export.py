"""How long an export takes against loading the model, and what each format writes:

    python bench/export.py                       # SmolLM2-135M-Instruct + LoRA (rank 8, every target)
    python bench/export.py --model gemma3-270m --formats hf gguf-lora

For each format × dtype: seconds (written, read back and checked), the files' size, and the check's largest
logit difference from the model in memory. The LoRA's B is drawn at random (0.1·N(0, 1), seeded), an
update of several logits, as a trained adapter makes. Load time is from_pretrained's, in the same process.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import minipeft as mp  # noqa: E402
from minipeft.exporters import FORMATS  # noqa: E402
from minipeft.exporters.merged import requantization_report  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--formats", nargs="+", default=["hf", "gguf", "gguf-lora", "peft"], choices=tuple(FORMATS))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "q8_0"], help="each format runs those it takes")
    p.add_argument("--method", default="lora", choices=("lora", "qlora"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (on a machine shared with other jobs, "
                   "1 avoids the slowdown of threads waiting for busy cores)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = mp.from_pretrained(args.model)
    load = time.perf_counter() - start
    mp.apply(model, args.method, rank=8, alpha=16, targets=["all"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p_ in model.named_parameters():
            if name.endswith("lora_B"):
                p_.copy_(0.1 * torch.randn(p_.shape, generator=g))
    print(f"{args.model} + {args.method}: from_pretrained {load:.1f} s (torch threads: {torch.get_num_threads()})\n")
    print("| format | dtype | seconds | × load | size (MiB) | largest |Δ logit| | same argmax |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for fmt in args.formats:
            for dtype in [d for d in args.dtypes if d in FORMATS[fmt]] or ["fp32"]:
                report = mp.export(model.eval(), Path(folder) / f"{fmt}-{dtype}", format=fmt, dtype=dtype,
                                   tokenizer=tokenizer)
                size = sum(report.files.values()) / 2**20
                print(f"| {fmt} | {dtype} | {report.seconds:.1f} | {report.seconds / load:.2f} | {size:.1f} | "
                      f"{report.check.largest_difference:.2g} | {report.check.argmax_agreement:.0%} |", flush=True)
    rows = requantization_report(model)
    survival = sorted(r for _, r in rows)
    print(f"\nNF4 copy of the merged model, |Q(W + dW) - Q(W)| / |dW| over {len(rows)} layers: median "
          f"{survival[len(survival) // 2]:.3f}, lowest {survival[0]:.3f} ({min(rows, key=lambda r: r[1])[0]}), "
          f"highest {survival[-1]:.3f}")


if __name__ == "__main__":
    main()

"""A named model + LoRA exported for llama.cpp and run there (needs llama-cpp-python, built as .ci/run builds it):

    python bench/export_llama_cpp.py --model gemma3-270m

Prints, for the merged fp32 `gguf` export, llama.cpp's agreement with minipeft on 96 teacher-forced Hamlet
tokens and on 16 greedy ones; for the `gguf-lora` export on the unmodified base GGUF as it ships (SmolLM2:
Q4_1, Gemma 3 270M: Q4_K_M), how the adapter's effect in llama.cpp (logits with it − without) compares with
minipeft's. The LoRA (rank 8, every target) has B drawn at random, 0.1·N(0, 1), seeded.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import minipeft as mp  # noqa: E402
from minipeft.formats.assets import asset_path  # noqa: E402
from minipeft.exporters.check import plain_model  # noqa: E402
from minipeft.exporters.merged import base_weights  # noqa: E402
from test_export_llama_cpp import HAMLET, llama_greedy, llama_logits  # noqa: E402


def tuned(name):
    model, tokenizer = mp.from_pretrained(name)
    torch.manual_seed(0)
    mp.apply(model, "lora", rank=8, alpha=16, targets=["all"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith("lora_B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval(), tokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", choices=("smollm2", "gemma3-270m"))
    args = p.parse_args()
    model, tokenizer = tuned(args.model)
    ids = tokenizer.encode(HAMLET[30_000:30_600]).ids[:96]
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        lora = mp.export(model, Path(folder) / "lora", format="gguf-lora", tokenizer=tokenizer)
        base = asset_path(args.model)
        theirs = llama_logits(base, ids, lora.path / "adapter.gguf") - llama_logits(base, ids)
        ours = model(torch.tensor([ids]))[0] - plain_model(model.cfg, base_weights(model))(torch.tensor([ids]))[0]
        correlation = torch.corrcoef(torch.stack([theirs.flatten(), ours.flatten()]))[0, 1].item()
        print(f"{args.model} gguf-lora on {base.name}: the adapter's effect correlates {correlation:.3f} with "
              f"minipeft's, size ratio {(theirs.norm() / ours.norm()).item():.3f} (up to {ours.abs().max():.1f} logits)")
        merged = mp.export(model, Path(folder) / "gguf", format="gguf", tokenizer=tokenizer)
        path = merged.path / "model.gguf"
        theirs, ours = llama_logits(path, ids), model(torch.tensor([ids]))[0]
        greedy = model.generate(torch.tensor([ids[:32]]), 16)[0, 32:].tolist()
        same = sum(a == b for a, b in zip(greedy, llama_greedy(path, ids[:32], 16)))
        print(f"{args.model} gguf fp32 ({sum(merged.files.values()) / 2**20:.0f} MiB): argmax agrees at "
              f"{int((theirs.argmax(-1) == ours.argmax(-1)).sum())} of {len(ids)} positions, largest |logit "
              f"difference| {(theirs - ours).abs().max():.3g}, {same} of 16 greedy tokens the same")


if __name__ == "__main__":
    main()

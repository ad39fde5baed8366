"""Export a fine-tuned model for the programs that serve models; every export is read back and checked.

    python export.py --model smollm2 --adapter checkpoints/sft --out out/hf             # transformers
    python export.py --model smollm2 --adapter checkpoints/sft --out out/gguf --format gguf --dtype q8_0
    python export.py --model smollm2 --adapter checkpoints/sft --out out/lora --format gguf-lora
    python export.py --model smollm2 --adapter checkpoints/sft --out out/peft --format peft   # vLLM, peft
    python export.py --model path/to/hf-folder --out out/gguf --format gguf                  # a base model alone

--adapter takes an adapter folder (either format) or a training run's folder (its adapter/ inside).
"""
import argparse
import math
from pathlib import Path

import minipeft as mp
from minipeft.run import cli
from minipeft.exporters import FORMATS, check_request
from minipeft.exporters.merged import requantization_report

DTYPES = tuple(dict.fromkeys(d for dtypes in FORMATS.values() for d in dtypes))


def build_parser():
    p = argparse.ArgumentParser(description="Export a model (and its adapter) to transformers, llama.cpp or peft.",
                                formatter_class=cli.HelpWithDefaults)
    p.add_argument("--model", default=None, help="the base model: a named model, an HF folder or a .gguf file "
                   "(default: the base the adapter records)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="the adapter to export with the model: an adapter "
                   "folder (mp.save_adapter, either format, or peft's) or a train.py run folder (its adapter/)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to create (it must not exist)")
    p.add_argument("--format", default="hf", choices=tuple(FORMATS),
                   help="hf: the merged model as a transformers folder; gguf: the merged model as a llama.cpp "
                        "file; gguf-lora: the LoRA alone, for llama.cpp's --lora on the base GGUF; peft: peft's "
                        "adapter folder")
    p.add_argument("--dtype", default="fp32", choices=DTYPES,
                   help="the weights' type: " + "; ".join(f"{f}: {', '.join(d)}" for f, d in FORMATS.items()))
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a jinja2 chat template to ship instead of the model's own (the one it was tuned with)")
    p.add_argument("--nf4-report", action="store_true",
                   help="also print, per adapted layer, how much of the update a 4-bit (NF4) copy of the merged model "
                        "keeps: |Q(W + dW) - Q(W)| / |dW|")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="hf: the largest safetensors file, in GiB")
    cli.add_import_flag(p)
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def adapter_folder(path: str) -> Path:
    """The adapter folder itself, or a run folder's adapter/."""
    folder = Path(path)
    if not (folder / "adapter_config.json").exists() and (folder / "adapter" / "adapter_config.json").exists():
        return folder / "adapter"
    return folder


def load(args):
    """(model with its adapter, tokenizer), the base named by --model or recorded by the adapter."""
    config, adapter = None, None
    if args.adapter:
        adapter = adapter_folder(args.adapter)
        config = mp.read_adapter_config(adapter)
    model_name = args.model or (config or {}).get("base", {}).get("source")
    if model_name is None:
        raise ValueError("name the base model with --model (the adapter does not record one)")
    n_classes = config["base"]["config"].get("n_classes") if config else None
    model, tokenizer = mp.from_pretrained(model_name, n_classes=n_classes)
    if adapter is not None:
        mp.load_adapter(model, adapter, tokenizer=tokenizer)
    return model.eval(), tokenizer


def main(argv):
    cli.import_user_files(argv)  # a user's method must be registered before its adapter loads
    args = build_parser().parse_args(argv)
    if not 0 < args.max_shard_gb < math.inf:
        raise ValueError(f"--max-shard-gb must be a finite number > 0, got {args.max_shard_gb}")
    if args.chat_template and not Path(args.chat_template).is_file():
        raise FileNotFoundError(f"--chat-template {args.chat_template}: no such file")
    check_request(Path(args.out), args.format, args.dtype)  # before the model loads
    model, tokenizer = load(args)
    rows = requantization_report(model) if args.nf4_report else None  # before writing: it may refuse the model
    report = mp.export(model, args.out, format=args.format, dtype=args.dtype, tokenizer=tokenizer,
                       chat_template=args.chat_template, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(report)
    if rows is not None:
        print_requantization_report(rows)


def print_requantization_report(rows: list[tuple[str, float]]):
    survival = sorted(r for _, r in rows)
    print("how much of each layer's update a 4-bit NF4 copy keeps, |Q(W + dW) - Q(W)| / |dW| (1 = all of it):")
    for layer, ratio in rows:
        print(f"  {layer:<28} {ratio:.3f}")
    print(f"  {len(rows)} layers: median {survival[len(survival) // 2]:.3f}, lowest {survival[0]:.3f}, "
          f"highest {survival[-1]:.3f}")


if __name__ == "__main__":
    cli.run(main)

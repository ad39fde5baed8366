"""The LoRA alone as a llama.cpp adapter GGUF (format "gguf-lora"), for `llama-cli -m base.gguf --lora
adapter.gguf` (or llama_cpp.Llama(model_path=..., lora_path=...)) on the base model's GGUF file as it is,
quantized or not:

    general.architecture   the base's (llama, qwen2, qwen3, gemma3): llama.cpp refuses another
    general.type           "adapter"
    adapter.type           "lora"
    adapter.lora.alpha     α, where llama.cpp scales B·A by α / r (r: lora_a's row count)
    <base tensor>.lora_a   A (r, in)           e.g. blk.3.attn_q.weight.lora_a
    <base tensor>.lora_b   B (out, r)

llama.cpp computes W x + (α/r)·B (A x) for every tensor that has a pair. Our LoRA's scale s (α/r, or
α/√r with rsLoRA) is written as α = s·r, so llama.cpp's α/r is s whatever the variant. Llama's q and k
rows are reordered in the base file (gguf.py: permute_rope_rows); since (P B) A = P (B A), B's rows take
the same order and A stays. QLoRA adapters export the same way: their A and B were trained against the
4-bit base, and llama.cpp applies them to whichever quantization of the base the user runs.

Reading back (for the check): the pairs are mapped onto our layers again and applied as a LoRA of that
rank and α to the base the model was trained on.
"""
from pathlib import Path

import torch

from minipeft.formats.gguf_file import GGUFFile
from minipeft.core import targets as linear_targets
from minipeft.core.lora import RESIDUAL_INITS
from minipeft.core.registry import apply
from .gguf import architecture, gguf_names, to_gguf, write_tensors
from .merged import check_mergeable

LORA_METHODS = ("lora", "qlora")


def lora_layers(model) -> dict[str, torch.nn.Module]:
    """{our weight name: its LoRA layer}, refusing what llama.cpp's LoRA cannot apply."""
    config = model.peft_config
    method = config["method"] if config else None
    if method not in LORA_METHODS:
        check_mergeable(model, "gguf-lora")  # prefix, prompt, adapters: refused here, naming the formats that hold them
        raise ValueError(f"format 'gguf-lora' holds LoRA and QLoRA adapters (llama.cpp applies B·A), not "
                         f"{method or 'a model without a method'}; export the merged model with format 'gguf'")
    if config["options"].get("init") in RESIDUAL_INITS:
        raise ValueError(f"a {config['options']['init']} LoRA rewrote the base weights it sits on, so on the "
                         "unmodified base GGUF it computes another model; export the merged model with format 'gguf'")
    return {f"{prefix}.weight": module for prefix, module in model.named_modules() if hasattr(module, "lora_A")}


def lora_tensors(model) -> tuple[dict[str, torch.Tensor], float]:
    """llama.cpp's adapter tensors {"<base tensor>.lora_a" / ".lora_b": ...} and α."""
    cfg = model.cfg
    architecture(cfg, "gguf-lora")
    names = gguf_names(cfg)
    tensors, alphas = {}, set()
    for ours, layer in lora_layers(model).items():
        theirs, transform = names[ours]
        A, B = layer.lora_A.detach().float(), layer.lora_B.detach().float()  # (r, in), (out, r)
        tensors[f"{theirs}.lora_a"], tensors[f"{theirs}.lora_b"] = A, to_gguf(transform, B, cfg)
        alphas.add(layer.scale * layer.rank)
    (alpha,) = alphas  # one rank and scale for every layer (mp.apply's options)
    return tensors, alpha


def write_gguf_lora(model, path: Path, dtype: str) -> None:
    import gguf
    tensors, alpha = lora_tensors(model)
    writer = gguf.GGUFWriter(str(path), architecture(model.cfg, "gguf-lora"))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    write_tensors(writer, tensors, dtype)


def read_gguf_lora(model, path: Path) -> None:
    """Apply the LoRA in the adapter GGUF at `path` to the plain base `model` (for the check)."""
    file = GGUFFile(path)
    if file.metadata.get("general.type") != "adapter" or file.metadata.get("adapter.type") != "lora":
        raise ValueError(f"{path} is not a llama.cpp LoRA adapter")
    ours = {theirs: (name, transform) for name, (theirs, transform) in gguf_names(model.cfg).items()}
    tensors = file.dequantized()
    pairs = {}
    for key in tensors:
        base, _, part = key.rpartition(".lora_")
        name, transform = ours[base]
        value = tensors[key]
        pairs.setdefault(name, {})[part] = transform(value, model.cfg) if part == "b" and transform else value
    rank = next(iter(pairs.values()))["a"].shape[0]
    targets = [t for t, path_in_block in linear_targets.TARGETS.items()
               if any(name.endswith(f".{path_in_block}.weight") for name in pairs)]
    apply(model, "lora", rank=rank, alpha=file.metadata["adapter.lora.alpha"], targets=targets)
    layers = dict(model.named_modules())
    with torch.no_grad():
        for name, pair in pairs.items():
            layer = layers[name.removesuffix(".weight")]
            layer.lora_A.copy_(pair["a"])
            layer.lora_B.copy_(pair["b"])


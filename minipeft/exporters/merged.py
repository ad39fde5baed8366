"""A model with a PEFT method as the plain weights of its base architecture, the method folded in:

    weights = merged_weights(model)     # {our parameter name: fp32 tensor}, a plain Transformer's keys
    weights = base_weights(model)       # the same without the method (the base the adapter sits on)

What folds, and how (each method's own `merge`, run on a copy of one layer at a time, so the model in
memory is never touched and no second model is held):

    LoRA, DoRA, IA³, VeRA, LoHa, LoKr   the layer's merge(): W ← W + ΔW (DoRA: g·(W + ΔW); IA³: W·diag(l))
    QLoRA and 4-bit bases               W = dequantize(W_4bit) (+ ΔW): the merged weight is full precision
    full, head, last_k, bitfit          nothing to fold: the trained values are the base parameters
    prefix, prompt, adapter, llama_adapter
                                        add modules of their own that no weight of the base can hold: refused

Every tensor comes out fp32 (a bf16 base is widened before the merge, so ΔW is added unrounded).

What a 4-bit merge would lose. Serving the merged model in 4 bits again rounds W + ΔW to the 4-bit grid,
and a small update can fall inside one step of it. `requantization_report` measures, layer by layer,

    survival = ‖Q(W + ΔW) − Q(W)‖ / ‖ΔW‖          Q: quantize to NF4 (blocks of 64, double quantization)
                                                  and back (core/nf4.py, bitsandbytes' format)

1 means the 4-bit model moves by the whole update; near 0, the rounding swallowed it; above 1, rounding
noise of the size of the update came with it. W is the base as it was trained on: for QLoRA the
dequantized NF4 base, which Q maps onto itself, so only the update's own rounding shows.
"""
import copy

import torch
import torch.nn as nn

from minipeft.extras import multi
from minipeft.core.registry import get_method
from minipeft.core.model import Transformer
from minipeft.formats.weights import weights_to_come
from minipeft.core.nf4 import Linear4bit, dequantize_4bit, quantize_4bit
from minipeft import peft_format


def plain_names(model) -> set[str]:
    """The state-dict keys of a plain Transformer of the model's config (tied heads included)."""
    with weights_to_come():
        return set(Transformer(copy.deepcopy(model.cfg)).state_dict())


def _folded_layer(module, with_method: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) in fp32 of one of the method's layers, its update merged in (or not)."""
    if isinstance(module, Linear4bit):
        weight = module.dequantized_weight(torch.float32)
        if with_method and hasattr(module, "delta_weight"):  # QLoRA: LoRA's ΔW on the dequantized base
            weight = weight + module.delta_weight().float()
        return weight, None if module.bias is None else module.bias.float()
    if with_method == getattr(module, "merged", False):  # the weight is already what is asked for
        return module.weight.detach().float(), None if module.bias is None else module.bias.detach().float()
    layer = copy.copy(module)  # a shallow copy whose own fp32 weight and bias the merge may change
    layer._parameters = {name: None if p is None else nn.Parameter(
        p.detach().float().clone() if name in ("weight", "bias") else p.detach().float(), requires_grad=False)
        for name, p in module._parameters.items()}
    if with_method:
        layer.merge()
    else:
        layer.unmerge()
    return layer.weight.detach(), None if layer.bias is None else layer.bias.detach()


def _method_layers(model) -> dict[str, torch.nn.Module]:
    """{module name: module} of the layers a method wraps or stores in 4 bits."""
    spec = get_method(model.peft_config["method"]) if model.peft_config else None
    mergeable = spec is not None and spec.mergeable
    return {name: module for name, module in model.named_modules()
            if isinstance(module, Linear4bit) or (mergeable and module is not model and hasattr(module, "merge"))}


def _weights(model, with_method: bool, fmt: str) -> dict[str, torch.Tensor]:
    if model.adapters is not None:  # several adapters side by side: the active one, as if alone
        with multi.single_view(model, model.adapters.active):
            return _weights(model, with_method, fmt)
    if with_method:
        check_mergeable(model, fmt)
    names = plain_names(model)
    weights = {}
    for prefix, module in _method_layers(model).items():
        weight, bias = _folded_layer(module, with_method)
        weights[f"{prefix}.weight"] = weight
        if bias is not None:
            weights[f"{prefix}.bias"] = bias
    for name, tensor in model.state_dict().items():
        if name in names:
            weights.setdefault(name, tensor.detach().float())
    return weights


def check_mergeable(model, fmt: str):
    """ValueError for a method that adds modules of its own, which no base weight can hold (prefix, prompt,
    adapters): `fmt` names the format asked for, and the message the formats that carry the method."""
    if model.adapters is not None:  # several adapters side by side: the active one, as if alone
        with multi.single_view(model, model.adapters.active):
            return check_mergeable(model, fmt)
    names, folded = plain_names(model), tuple(f"{prefix}." for prefix in _method_layers(model))
    extra = [name for name in model.state_dict() if name not in names and not name.startswith(folded)]
    if extra:
        method = model.peft_config["method"]
        raise ValueError(f"{method} adds modules of its own ({extra[0]}, ...) that no weight of the base model "
                         f"can hold, so format {fmt!r} cannot carry it; {_formats_for(method)}")


def _formats_for(method: str) -> str:
    """Which export formats can carry a method that cannot be merged."""
    if method in peft_format.hooks():
        return "export it with format 'peft' (peft runs it), or keep minipeft's own adapter (mp.save_adapter)"
    return "keep it as minipeft's own adapter (mp.save_adapter); no other format has this method"


def merged_weights(model, fmt: str = "hf") -> dict[str, torch.Tensor]:
    """Our parameter name -> fp32 tensor of the model with its method folded into the base weights
    (ValueError for a method that adds modules of its own: `fmt` names the format asked for)."""
    return _weights(model, True, fmt)


def base_weights(model) -> dict[str, torch.Tensor] | None:
    """Our parameter name -> fp32 tensor of the base the model's method was applied to; None when the
    base is not kept: the model has no method, its method adds no parameters of its own (full, head,
    last_k, bitfit train the base's in place, trainable still or frozen since), or base parameters train
    next to the method's own. A fresh classifier head counts as the method's: the base model has none."""
    if not model.peft_config:
        return None
    names = plain_names(model)
    if all(name in names for name, _ in model.named_parameters()):
        return None
    fresh_head = ("head.",) if model.cfg.n_classes else ()
    if any(p.requires_grad and name in names and not name.startswith(fresh_head)
           for name, p in model.named_parameters()):
        return None
    return _weights(model, False, "")


def _requantized(w: torch.Tensor, quant_type: str) -> torch.Tensor:
    return dequantize_4bit(*quantize_4bit(w, quant_type, blocksize=64, double_quant=True))


@torch.no_grad()
def requantization_report(model, quant_type: str = "nf4") -> list[tuple[str, float]]:
    """[(layer, ‖Q(W + ΔW) − Q(W)‖ / ‖ΔW‖)] for every layer the model's method changes (module docstring)."""
    merged, base = merged_weights(model, "hf"), base_weights(model)
    if base is None:
        raise ValueError("the requantization report compares the merged weights with the base's, which this "
                         "model does not keep (no method, or one that trained the base in place)")
    report = []
    for name in sorted(merged, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")]):
        if name.startswith("blocks.") and name.endswith(".weight") and not torch.equal(merged[name], base[name]):
            delta = merged[name] - base[name]
            moved = _requantized(merged[name], quant_type) - _requantized(base[name], quant_type)
            report.append((name.removesuffix(".weight"), (moved.norm() / delta.norm()).item()))
    return report

"""HF folders saved in bitsandbytes 4-bit -> Linear4bit layers over the very codes and state of the file.

transformers' save_pretrained of a model loaded with BitsAndBytesConfig(load_in_4bit=True, ...) (unsloth
publishes its "-bnb-4bit" models so) writes a `quantization_config` into config.json and, for each 4-bit
linear layer M:

    M.weight                                  (ceil(n/2), 1) uint8  packed codes, high nibble first
    M.weight.absmax                           (n_blocks,) fp32      uint8 under double quantization: codes
    M.weight.quant_map                        (16,) fp32            the NF4 or FP4 code book
    M.weight.nested_absmax                    (n_groups,) fp32      double quantization: a scale per 256
    M.weight.nested_quant_map                 (256,) fp32           double quantization: the dynamic code map
    M.weight.quant_state.bitsandbytes__nf4    uint8                 JSON: quant_type, blocksize, shape, dtype,
                                                                    nested_blocksize, nested_offset (the mean)
    M.bias                                    full precision, loaded as any bias

nf4.py quantizes exactly as bitsandbytes does, so these are its QuantState field for field (absmax, or
absmax_codes, absmax_scales and absmax_offset): each M becomes a Linear4bit holding them unchanged, with
nothing dequantized or requantized. Embeddings, norms, the LM head and the layers of llm_int8_skip_modules
are saved in full precision and load as in any folder.

    check_quantization(config["quantization_config"], ...)   # what minipeft can hold exactly, else refused
    weights, layers = split_4bit(weights, ...)   # the packed weights -> shape-only stand-ins; (codes, state)
    load_weights(model, weights, ...)            # every key and shape checked as usual (weights.py)
    install_4bit(model, layers)                  # each stand-in's nn.Linear -> Linear4bit

Refused, with the reason: 8-bit folders, other quantization methods, packed storage other than uint8, code
books or blocksizes nf4.py does not have, families whose 4-bit layers would have to be cut or transposed
(GPT-2's Conv1D c_attn, Phi-3's qkv_proj and gate_up_proj) and 4-bit layers that minipeft keeps in full
precision (a quantized lm_head or score).
"""
import json
import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from minipeft.core.nf4 import CODES, DOUBLE_QUANT_BLOCKSIZE, DYNAMIC_CODE, Linear4bit, QuantState, check_format
from .weights import template_regex

STATE_KEY = ".weight.quant_state.bitsandbytes__"  # + quant_type
STATE_TENSORS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # M.weight.<name>
SPLIT_FAMILIES = ("gpt2", "phi3")  # layers cut from fused or transposed 4-bit weights


def check_quantization(quantization: dict, family: str, source: str) -> None:
    """ValueError unless config.json's quantization_config says bitsandbytes 4-bit weights minipeft can hold
    exactly."""
    method = quantization.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(f"{source}: weights quantized with {method!r} are not supported; minipeft reads "
                         "bitsandbytes 4-bit folders, or full-precision ones (quantize with quantize='nf4')")
    if quantization.get("load_in_8bit") or not quantization.get("load_in_4bit"):
        raise ValueError(f"{source}: bitsandbytes 8-bit (LLM.int8) weights are not supported; load the "
                         "full-precision model, or its bitsandbytes 4-bit version")
    storage = quantization.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise ValueError(f"{source}: 4-bit codes stored as {storage} are not supported; save the model with "
                         "bnb_4bit_quant_storage='uint8' (the default)")
    if family in SPLIT_FAMILIES:
        raise ValueError(f"{source}: 4-bit {family} weights are not supported: minipeft would have to cut or "
                         "transpose fused 4-bit layers; load the full-precision model with quantize='nf4'")


def split_4bit(weights: Mapping[str, torch.Tensor], module_names: dict[str, str], prefix: str, ignored: list[str],
               source: str) -> tuple[Mapping[str, torch.Tensor], dict[str, tuple[str, torch.Tensor, QuantState]]]:
    """(the weights with every 4-bit layer's packed weight replaced by a stand-in of its (out, in) shape on the
    meta device and its state tensors left out, {our module: (their module, packed codes, QuantState)}).

    module_names: our module -> theirs, as templates ("blocks.{i}.attn.q" -> "layers.{i}.self_attn.q_proj");
    prefix and ignored: the family's (pretrained.py); a layer that is ignored on purpose is dropped."""
    theirs_to_ours = [(template_regex(theirs), ours) for ours, theirs in module_names.items()]
    stand_ins, hidden, layers = {}, set(), {}
    for key in [k for k in weights if STATE_KEY in k]:
        module = key.split(STATE_KEY)[0]  # their name, with prefix
        short = module.removeprefix(prefix)
        hidden.update(k for k in _state_keys(module, key) if k in weights)
        if any(re.fullmatch(pattern, short + ".weight") for pattern in ignored):
            hidden.add(module + ".weight")
            continue
        ours = next((our.format(**m.groupdict()) for regex, our in theirs_to_ours if (m := regex.fullmatch(short))),
                    None)
        if ours is None or not ours.startswith("blocks."):
            raise ValueError(f"{source}: {module} is stored in 4 bits, but minipeft keeps it in full precision; "
                             f"quantize the model again with llm_int8_skip_modules naming {short!r}")
        codes, state = _read_layer(weights, module, key, source)
        stand_ins[module + ".weight"] = torch.empty(tuple(state.shape), device="meta")
        layers[ours] = module, codes, state
    return _Replaced(weights, stand_ins, hidden), layers


def install_4bit(model: nn.Module, layers: dict[str, tuple[str, torch.Tensor, QuantState]], source: str) -> None:
    """Replace each of our nn.Linear layers named in `layers` (its weight a stand-in, its bias loaded) by a
    Linear4bit over their module's codes and state."""
    for name, (module, codes, state) in layers.items():
        parent_name, child_name = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        bias = getattr(parent, child_name).bias
        try:
            layer = _linear4bit(codes, state, None if bias is None else bias.detach())
        except ValueError as error:
            raise ValueError(f"{source}: 4-bit layer {module}: {error}") from None
        setattr(parent, child_name, layer)


def _linear4bit(codes: torch.Tensor, state: QuantState, bias: torch.Tensor | None) -> Linear4bit:
    """A Linear4bit over the given packed codes and state of an (out, in) weight, taken as they are;
    ValueError if a tensor does not have its buffer's size."""
    out_features, in_features = state.shape
    module = Linear4bit(in_features, out_features, bias is not None, state.quant_type, state.blocksize,
                        state.double_quant)
    tensors = {"weight_codes": codes, **{"weight_" + name: t for name, t in state.to_dict().items()}}
    if bias is not None:
        tensors["bias"] = bias
    for name, tensor in tensors.items():
        buffer = getattr(module, name)
        if tensor.numel() != buffer.numel():
            raise ValueError(f"a 4-bit weight of shape {tuple(state.shape)} in blocks of {state.blocksize} "
                             f"needs {buffer.numel()} values of {name}, got {tensor.numel()}")
        with torch.no_grad():
            buffer.copy_(tensor.reshape(buffer.shape))
    return module


def _state_keys(module: str, state_key: str) -> list[str]:
    return [state_key, *(f"{module}.weight.{name}" for name in STATE_TENSORS)]


def _read_layer(weights: Mapping[str, torch.Tensor], module: str, state_key: str,
                source: str) -> tuple[torch.Tensor, QuantState]:
    """The packed codes and QuantState of 4-bit layer `module`; ValueError naming what does not fit."""
    def fail(why: str):
        return ValueError(f"{source}: 4-bit layer {module}: {why}")
    try:
        info = json.loads(weights[state_key].numpy().tobytes())
        quant_type, blocksize, shape, nested = info["quant_type"], info["blocksize"], info["shape"], \
            "nested_offset" in info
        codes, absmax, code_map = (weights[f"{module}.weight{name}"] for name in ("", ".absmax", ".quant_map"))
        if nested:
            scales, nested_map = (weights[f"{module}.weight.{name}"] for name in ("nested_absmax", "nested_quant_map"))
            offset = torch.tensor(float(info["nested_offset"]))  # fp32, as bitsandbytes reads it
    except (KeyError, ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise fail(f"its quantization state is incomplete or unreadable ({error})") from None
    try:
        check_format(quant_type, blocksize)
    except ValueError as error:
        raise fail(f"{error}, which minipeft's Linear4bit does not take") from None
    if codes.dtype != torch.uint8 or absmax.dtype != (torch.uint8 if nested else torch.float32):
        raise fail(f"packed codes {codes.dtype} and absmax {absmax.dtype} are not what bitsandbytes saves")
    if not (isinstance(shape, list) and len(shape) == 2):
        raise fail(f"shape {shape} is not that of a linear layer's weight (out, in)")
    if not torch.equal(code_map.float(), CODES[quant_type]):
        raise fail(f"its code book is not bitsandbytes' {quant_type}")
    if nested and (info.get("nested_blocksize") != DOUBLE_QUANT_BLOCKSIZE or
                   not torch.equal(nested_map.float(), DYNAMIC_CODE)):
        raise fail(f"double quantization other than bitsandbytes' (dynamic code map, blocks of "
                   f"{DOUBLE_QUANT_BLOCKSIZE}) is not supported")
    tensors = dict(absmax_codes=absmax, absmax_scales=scales.float(), absmax_offset=offset) if nested else \
        dict(absmax=absmax)
    return codes, QuantState.from_dict(tensors, shape, torch.float32, quant_type, blocksize)


class _Replaced(Mapping):
    """A mapping of tensors with some keys replaced (`stand_ins`) and some left out (`hidden`); the other
    tensors are read from the original one only when asked for, as SafetensorsFile reads them."""

    def __init__(self, weights: Mapping[str, torch.Tensor], stand_ins: dict[str, torch.Tensor], hidden: set[str]):
        self.weights, self.stand_ins, self.hidden = weights, stand_ins, hidden

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.hidden:
            raise KeyError(key)
        return self.stand_ins[key] if key in self.stand_ins else self.weights[key]

    def __contains__(self, key) -> bool:
        return key not in self.hidden and key in self.weights

    def __iter__(self):
        return (key for key in self.weights if key not in self.hidden)

    def __len__(self) -> int:
        return sum(1 for _ in self)

"""PEFT methods: the registry (registry.py) and one file per method, each of which registers itself
exactly as a user's own method would (`register(Method(...))`, see registry.py and the README).

    selective.py       full, head, last_k, bitfit: train a subset of the pretrained parameters
    wrap.py            what the methods wrapping linear layers share (FrozenLinear, wrap, merging, peft tensors)
    lora.py            LoRA: low-rank updates on the targeted linear layers (targets.py names them); rsLoRA,
                       PiSSA / OLoRA / gaussian init, LoRA+
    qlora.py           QLoRA: LoRA on a 4-bit base (quant.py)
    dora.py            DoRA: a learned magnitude per row, the direction updated by LoRA
    adapter.py         bottleneck adapters (Houlsby, Pfeiffer)
    prefix.py          prefix tuning: trainable keys/values in every layer
    prompt.py          prompt tuning: soft tokens prepended to the input
    llama_adapter.py   LLaMA-Adapter: gated adaption prompts in the top layers
    ia3.py             (IA)³: learned rescaling of keys, values and the FFN's inner activation
    vera.py            VeRA: frozen shared random low-rank matrices, trained scaling vectors
    loha.py, lokr.py   LyCORIS' LoHa (Hadamard product) and LoKr (Kronecker product) updates
    multi.py           several adapters side by side on one base: set_adapter, one adapter per row
    disable.py         adapters_disabled: the base model's outputs under any method (DPO's reference)
    combine.py         combine_adapters: new LoRA adapters from loaded ones (peft's add_weighted_adapter)
"""
# importing a method's file registers it; METHODS keeps this order (train.py --list-methods)
from . import selective  # noqa: F401, I001
from . import lora, qlora, dora  # noqa: F401
from . import adapter, prefix, prompt, llama_adapter  # noqa: F401
from . import ia3, vera, loha, lokr  # noqa: F401
from .combine import combine_adapters
from .disable import adapters_disabled
from .multi import set_adapter
from .registry import (METHODS, Method, Option, apply, expected_trainable_parameters, get_method, lr_factors,
                       merge, register, task_defaults, trainable_state_dict, unmerge)

__all__ = ["METHODS", "Method", "Option", "adapters_disabled", "apply", "combine_adapters",
           "expected_trainable_parameters", "get_method", "lr_factors", "merge", "register", "set_adapter",
           "task_defaults", "trainable_state_dict", "unmerge"]

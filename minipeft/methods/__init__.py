"""PEFT methods: the registry (registry.py) and one file per method, each of which registers itself
exactly as a user's own method would (`register(Method(...))`, see registry.py and the README).

    selective.py       full, head, last_k, bitfit: train a subset of the pretrained parameters
    lora.py            LoRA: low-rank updates on the targeted linear layers (targets.py names them)
    qlora.py           QLoRA: LoRA on a 4-bit base (quant.py)
    adapter.py         bottleneck adapters (Houlsby, Pfeiffer)
    prefix.py          prefix tuning: trainable keys/values in every layer
    prompt.py          prompt tuning: soft tokens prepended to the input
    llama_adapter.py   LLaMA-Adapter: gated adaption prompts in the top layers
"""
# importing a method's file registers it; METHODS keeps this order (train.py --list-methods)
from . import selective  # noqa: F401, I001
from . import lora, qlora  # noqa: F401
from . import adapter, prefix, prompt, llama_adapter  # noqa: F401
from .registry import (METHODS, Method, Option, apply, expected_trainable_parameters, get_method, merge,
                       register, trainable_state_dict, unmerge)

__all__ = ["METHODS", "Method", "Option", "apply", "expected_trainable_parameters", "get_method", "merge",
           "register", "trainable_state_dict", "unmerge"]

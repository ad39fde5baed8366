"""minipeft: parameter-efficient fine-tuning written out by hand, in plain PyTorch."""
from . import memory, quant
from .memory import format_report, memory_report
from .model import KVCache, ModelConfig, Transformer
from .peft import (METHODS, Method, apply, load_adapter, merge, register, save_adapter,
                   trainable_state_dict, unmerge)
from .pretrained import from_pretrained

__all__ = ["memory", "memory_report", "format_report", "quant", "KVCache", "ModelConfig", "Transformer",
           "METHODS", "Method", "apply", "load_adapter", "merge", "register", "save_adapter",
           "trainable_state_dict", "unmerge", "from_pretrained"]

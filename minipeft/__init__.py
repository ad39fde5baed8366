"""minipeft: parameter-efficient fine-tuning written out by hand, in plain PyTorch."""
from . import quant
from .model import KVCache, ModelConfig, Transformer
from .peft import (METHODS, Method, apply, load_adapter, merge, register, save_adapter,
                   trainable_state_dict, unmerge)
from .pretrained import from_pretrained

__all__ = ["quant", "KVCache", "ModelConfig", "Transformer", "METHODS", "Method", "apply", "load_adapter",
           "merge", "register", "save_adapter", "trainable_state_dict", "unmerge", "from_pretrained"]

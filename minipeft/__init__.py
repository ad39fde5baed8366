"""minipeft: parameter-efficient fine-tuning written out by hand, in plain PyTorch."""
from . import memory, precision, quant
from .adapter_io import load_adapter, read_adapter_config, save_adapter
from .chat import apply_chat_template
from .memory import format_report, memory_report
from .methods import (METHODS, Method, Option, adapters_disabled, apply, combine_adapters, get_method, merge,
                      register, set_adapter, task_defaults, trainable_state_dict, unmerge)
from .model import KVCache, ModelConfig, Transformer
from .precision import PRECISIONS, resolve_device, set_precision
from .pretrained import from_pretrained
from .export import export  # the function; its modules stay importable as minipeft.export.hf, ...

__all__ = ["memory", "memory_report", "format_report", "quant", "KVCache", "ModelConfig", "Transformer",
           "METHODS", "Method", "Option", "apply", "get_method", "load_adapter", "read_adapter_config", "merge",
           "register", "save_adapter", "task_defaults", "trainable_state_dict", "unmerge", "from_pretrained",
           "set_adapter", "adapters_disabled", "combine_adapters", "apply_chat_template", "precision", "PRECISIONS",
           "resolve_device", "set_precision", "export"]

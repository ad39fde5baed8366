"""minipeft: parameter-efficient fine-tuning written out by hand, in plain PyTorch.

The lesson is minipeft/core/ (the model, the methods, the quantizer, the loop); the folders around it
read files (formats/), write peft's format (peft_format/), run at scale (scale/), go fast (fast/),
export (exporters/), add extras (extras/) and drive runs from the command line (run/). `import minipeft`
loads none of them: each name below is imported the first time it is used.
"""
import importlib

_WHERE = {  # public name -> module that defines it
    **dict.fromkeys(("Transformer", "ModelConfig", "KVCache"), "core.model"),
    **dict.fromkeys(("Method", "Option", "apply", "get_method", "register"), "core.registry"),
    **dict.fromkeys(("merge", "task_defaults", "trainable_state_dict", "unmerge"), "core.adapted"),
    "adapters_disabled": "extras.disable",
    "from_pretrained": "formats.pretrained",
    **dict.fromkeys(("load_adapter", "read_adapter_config", "save_adapter"), "formats.adapter_io"),
    "apply_chat_template": "formats.chat",
    **dict.fromkeys(("PRECISIONS", "resolve_device", "set_precision"), "scale.precision"),
    **dict.fromkeys(("memory_report", "format_report"), "extras.memory"),
    "set_adapter": "extras.multi",
    "combine_adapters": "extras.combine",
    "export": "exporters",
}
_MODULES = {"quant": "core.nf4", "memory": "extras.memory", "precision": "scale.precision",  # public module names
            "fast": "fast"}


def __getattr__(name: str):
    if name == "METHODS":
        return importlib.import_module(".core.registry", __name__).methods()
    if name in _MODULES:
        value = importlib.import_module(f".{_MODULES[name]}", __name__)
    elif name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'minipeft' has no attribute {name!r}")
    globals()[name] = value  # found once
    return value


__all__ = sorted([*_WHERE, *_MODULES, "METHODS"])

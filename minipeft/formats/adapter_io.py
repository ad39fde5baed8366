"""Adapters on disk: save the trainable parameters of a model with a PEFT method, load them into a
fresh base model.

An adapter is a folder with two files, both written atomically (atomic.py: temp file, then rename):
    adapter.safetensors   exactly the trainable parameters (trainable_state_dict), saved in fp32
    adapter_config.json   {"method", "options", "base": {fingerprint, source, revision, config}, "format_version"}
                          (source: the base model's name, or its absolute path: eval.py loads it from there)

Loading applies the saved method (with the saved options) to the fresh base model, checks the base
fingerprint (fingerprint.py), so an adapter trained on one base model is never silently applied to
another, then copies the tensors in, checking every name and shape. `save_adapter(..., format="peft")`
writes peft's layout instead, and `load_adapter` reads either (peft_format/ says how the two map).
Nothing is pickled.
"""
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minipeft.core.adapted import trainable_state_dict
from minipeft.core.registry import apply

from .atomic import atomic_write
from .pretrained import NAMED_MODELS

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1
FORMATS = ("minipeft", "peft")


def save_adapter(model, path, format: str = "minipeft", name: str | None = None):
    """Write the trainable parameters and the method's config to the folder `path`: format "minipeft"
    (above) or "peft" (peft's adapter_config.json + adapter_model.safetensors, see peft_format/).
    `name`: which of several adapters side by side (extras/multi.py; default: the active one), written
    as if it were the model's only adapter."""
    if format not in FORMATS:
        raise ValueError(f"unknown adapter format {format!r}; valid formats are: {', '.join(FORMATS)}")
    if model.adapters is not None or name is not None:  # several side by side: one, as if it were the only one
        from minipeft.extras import multi
        if model.adapters is not None:
            with multi.single_view(model, name or model.adapters.active):
                return save_adapter(model, path, format)
        if name not in multi.adapter_names(model):
            raise ValueError(f"this model has no adapter named {name!r}; it has {multi.adapter_names(model) or 'none'}")
    if not model.peft_config:
        raise ValueError("this model has no PEFT method; call mp.apply(model, method, ...) first")
    path = Path(path)
    if format == "peft":
        from minipeft import peft_format
        return peft_format.save(model, path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    config = {
        "format_version": FORMAT_VERSION,
        "method": model.peft_config["method"],
        "options": model.peft_config["options"],
        "base": {"fingerprint": model.peft_config["base_fingerprint"],
                 "source": recorded_source(cfg.extra.get("source")),
                 "revision": cfg.extra.get("revision"),  # a hub id's commit (hub.py), else None
                 "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}},
    }
    tensors = {k: v.float().contiguous() for k, v in trainable_state_dict(model).items()}
    atomic_write(path / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(path / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return path


def recorded_source(source: str | None) -> str | None:
    """The base model's source as an adapter records it, for eval.py to load without --model: a named
    model by its name, a folder or file by its absolute path."""
    if source is None or source in NAMED_MODELS or not Path(source).exists():
        return source
    return str(Path(source).resolve())


def read_adapter_config(path) -> dict:
    """The config of an adapter folder of either format. Both have "method" and "base": {"source",
    "config": {"n_classes", ...}}; a peft folder's also has "format": "peft" and peft's own config."""
    path = Path(path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.exists():
        raise FileNotFoundError(f"{path} is not an adapter folder: {ADAPTER_CONFIG} is missing")
    try:
        config = json.loads(config_file.read_text())
        if "peft_type" in config:  # peft's own adapter_config.json
            from minipeft import peft_format
            return peft_format.read_config(path)
        config["method"], config["options"], config["base"]["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_file} is corrupt ({e}); save the adapter again") from None
    return config


def load_adapter(model, path, tokenizer=None, name: str | None = None):
    """Load an adapter folder into `model`: applies the saved method first if the model has none,
    checks that it was trained on this base model, then copies the weights in. A peft folder (found by
    its config) goes to peft_format.load, which maps peft's names and layouts onto ours. `tokenizer`:
    for methods that read text when applied (prompt tuning with init="text"). `name`: load it beside
    the adapters the model has (extras/multi.py: set_adapter, adapter_names=[...] per row); without
    it, into the model's adapter (the active one, with several)."""
    path = Path(path)
    config = read_adapter_config(path)
    if name is not None or model.adapters is not None:
        from minipeft.extras import multi
        if name is not None:
            options = config.get("options") or {}
            return multi.add_adapter(model, name, config["method"], options,
                                     lambda base: load_adapter(base, path, tokenizer))
        with multi.single_view(model, model.adapters.active):
            return load_adapter(model, path, tokenizer)
    if config.get("format") == "peft":
        from minipeft import peft_format
        return peft_format.load(model, path)
    if not model.peft_config:
        apply(model, config["method"], tokenizer=tokenizer, **config["options"])
    mine = model.peft_config
    if mine["method"] != config["method"] or mine["options"] != config["options"]:
        raise ValueError(f"adapter {path} is {config['method']} {config['options']}, but the model has "
                         f"{mine['method']} {mine['options']}; load it into a fresh base model")
    if mine["base_fingerprint"] != config["base"]["fingerprint"]:
        raise ValueError(f"adapter {path} was trained on another base model "
                         f"({config['base'].get('source') or 'unknown source'}, fingerprint "
                         f"{config['base']['fingerprint']}); this model's fingerprint is "
                         f"{mine['base_fingerprint']}. Load the base model it was trained on.")
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path / ADAPTER_WEIGHTS} is corrupt or truncated ({e}); save it again") from None
    copy_parameters(model, tensors, f"adapter {path}")
    return model


def copy_parameters(model, tensors: dict[str, torch.Tensor], source: str):
    """Copy `tensors` into the model's trainable parameters: exactly the same names and shapes, or a
    ValueError naming what differs (nothing is copied then). Each tensor is cast to its parameter's
    dtype and device."""
    params = dict(trainable_state_dict(model))
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    wrong = [f"{name} {tuple(tensors[name].shape)} (model: {tuple(p.shape)})" for name, p in params.items()
             if name in tensors and tensors[name].shape != p.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not fit this model: missing {missing}, unexpected {unexpected}, "
                         f"wrong shapes {wrong}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])

"""The method registry: one `apply(model, name, **options)` for every PEFT method, and the operations
that work the same for all of them (which parameters train, save/load an adapter, merge).

    apply(model, "lora", rank=8)
      1. freeze every base parameter
      2. the method wraps layers / fills slots / unfreezes its selection
      3. a fresh classifier head (cfg.n_classes) is made trainable whatever the method
      4. model.peft_config records the method, its options and a fingerprint of the base weights

An adapter on disk is a folder with two files, both written atomically (temp file, then rename):
    adapter.safetensors   exactly the trainable parameters (trainable_state_dict)
    adapter_config.json   {"method", "options", "base": {fingerprint, config}, "format_version"}

Loading checks the fingerprint, so an adapter trained on one base model is never silently applied to
another. `save_adapter(..., format="peft")` writes peft's layout instead, and `load_adapter` reads
either (peft_format.py says how the two map). A new method is one `register(Method(...))` away, and the conformance tests
(tests/test_methods.py) then check it against what it declares.
"""
import hashlib
import inspect
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import adapter, llama_adapter, lora, peft_format, prefix, prompt, selective

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


@dataclass
class Method:
    name: str
    apply: Callable  # apply(model, **options): wraps/unfreezes; the base is already frozen
    parameter_count: Callable  # parameter_count(cfg, **options): what the method trains (no classifier)
    description: str
    lr: float = 1e-3  # a default peak learning rate that works for this method on the built-in tasks
    flavors: tuple = ("gpt2", "bert", "llama")
    exact_at_init: bool = True  # output equals the base model's right after apply
    mergeable: bool = False  # mp.merge folds it into the base weights
    options: dict = field(default_factory=dict)  # name -> default, read from apply's signature

    def __post_init__(self):
        params = list(inspect.signature(self.apply).parameters.values())[1:]  # skip `model`
        self.options = {p.name: p.default for p in params}


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


register(Method("full", selective.apply_full, selective.full_parameter_count,
                "every parameter (the baseline)", lr=5e-5))
register(Method("head", selective.apply_head, selective.head_parameter_count,
                "the output head only: the encoder is a frozen feature extractor"))
register(Method("last_k", selective.apply_last_k, selective.last_k_parameter_count,
                "the top `layers` blocks, the final norm and the head", lr=1e-4))
register(Method("bitfit", selective.apply_bitfit, selective.bitfit_parameter_count,
                "every bias term (Ben Zaken et al. 2021)", flavors=("gpt2", "bert")))
register(Method("lora", lora.apply_lora, lora.lora_parameter_count,
                "low-rank updates BA on the targeted linear layers (Hu et al. 2021)", mergeable=True))
register(Method("qlora", lora.apply_qlora, lora.lora_parameter_count,
                "LoRA on a frozen base stored in 4 bits, NF4 or FP4 (Dettmers et al. 2023)",
                exact_at_init=False))
register(Method("adapter", adapter.apply_adapter, adapter.adapter_parameter_count,
                "bottleneck MLPs after attention and FFN outputs (Houlsby 2019 / Pfeiffer 2020)"))
register(Method("prefix", prefix.apply_prefix, prefix.prefix_parameter_count,
                "trainable key/value prefixes in every layer (Li & Liang 2021)", lr=1e-2,
                exact_at_init=False))
register(Method("prompt", prompt.apply_prompt, prompt.prompt_parameter_count,
                "soft prompt embeddings prepended to the input (Lester et al. 2021)", lr=3e-2,
                exact_at_init=False))
register(Method("llama_adapter", llama_adapter.apply_llama_adapter,
                llama_adapter.llama_adapter_parameter_count,
                "gated adaption prompts in the top layers (Zhang et al. 2023)", lr=1e-2))


def _check_options(method: Method, options: dict) -> dict:
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        valid = ", ".join(method.options) or "none"
        raise ValueError(f"unknown option(s) {unknown} for method {method.name!r}; its options are: {valid}")
    resolved = {**method.options, **options}
    if isinstance(resolved.get("targets"), str):
        resolved["targets"] = tuple(t.strip() for t in resolved["targets"].split(",") if t.strip())
    if "targets" in resolved:
        resolved["targets"] = list(resolved["targets"])  # JSON-friendly
    return resolved


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods are: {', '.join(METHODS)}")
    return METHODS[name]


def base_fingerprint(model) -> str:
    """A short hash of the base model's shape and of a strided sample of its token embedding, which no
    PEFT method changes before apply() records it."""
    cfg = model.cfg
    digest = hashlib.sha256()
    shape = (cfg.flavor, cfg.vocab_size, cfg.d_model, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_ff)
    digest.update(repr(shape).encode())
    sample = model.tok_emb.weight.detach()[:: max(1, cfg.vocab_size // 256)]
    if not sample.is_meta:  # a model built on the meta device (for counting) has no values yet
        digest.update(sample.float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def apply(model, method: str, **options):
    """Freeze the base model and add `method` to it in place; returns the model."""
    spec = get_method(method)
    if getattr(model, "peft_config", None):
        raise ValueError(f"this model already has method {model.peft_config['method']!r}; "
                         "apply one method to a fresh base model")
    if model.cfg.flavor not in spec.flavors:
        raise ValueError(f"method {method!r} does not fit a {model.cfg.flavor} model "
                         f"(it supports {', '.join(spec.flavors)})")
    resolved = _check_options(spec, options)
    fingerprint = base_fingerprint(model)
    model.requires_grad_(False)
    spec.apply(model, **resolved)
    if model.cfg.n_classes:
        model.head.requires_grad_(True)
    model.peft_config = {"method": method, "options": resolved, "base_fingerprint": fingerprint}
    return model


def expected_trainable_parameters(model) -> int:
    """The method's formula (+ a fresh classifier head), for comparison with the real count."""
    spec = METHODS[model.peft_config["method"]]
    count = spec.parameter_count(model.cfg, **model.peft_config["options"])
    if model.cfg.n_classes:
        count += model.cfg.d_model * model.cfg.n_classes + model.cfg.n_classes  # weight + bias
    return count


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """Exactly the parameters with requires_grad, by their names in the model."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def atomic_write(path: Path, write: Callable[[str], None]):
    """`write(tmp)` writes the file under a temporary name; it is flushed to disk and renamed to `path`,
    so `path` is either the old file or the whole new one, never half of it (checkpoint.py uses it too)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_adapter(model, path, format: str = "minipeft"):
    """Write the trainable parameters and the method's config to the folder `path`: format "minipeft"
    (above) or "peft" (peft's adapter_config.json + adapter_model.safetensors, see peft_format.py)."""
    if format not in ("minipeft", "peft"):
        raise ValueError(f"unknown adapter format {format!r}; valid formats are: minipeft, peft")
    if not getattr(model, "peft_config", None):
        raise ValueError("this model has no PEFT method; call mp.apply(model, method, ...) first")
    path = Path(path)
    if format == "peft":
        return peft_format.save(model, path, atomic_write)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    config = {
        "format_version": FORMAT_VERSION,
        "method": model.peft_config["method"],
        "options": model.peft_config["options"],
        "base": {"fingerprint": model.peft_config["base_fingerprint"],
                 "source": cfg.extra.get("source"),
                 "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}},
    }
    tensors = {k: v.contiguous() for k, v in trainable_state_dict(model).items()}
    atomic_write(path / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(path / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return path


def read_adapter_config(path) -> dict:
    """The config of an adapter folder of either format. Both have "method" and "base": {"source",
    "config": {"n_classes", ...}}; a peft folder's also has "format": "peft" and peft's own config."""
    path = Path(path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.exists():
        raise FileNotFoundError(f"{path} is not an adapter folder: {ADAPTER_CONFIG} is missing")
    try:
        config = json.loads(config_file.read_text())
        if peft_format.is_peft_config(config):
            return peft_format.read_config(path)
        config["method"], config["options"], config["base"]["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_file} is corrupt ({e}); save the adapter again") from None
    return config


def load_adapter(model, path):
    """Load an adapter folder into `model`: applies the saved method first if the model has none,
    checks that it was trained on this base model, then copies the weights in. A peft folder (found by
    its config) goes to peft_format.load, which maps peft's names and layouts onto ours."""
    path = Path(path)
    config = read_adapter_config(path)
    if config.get("format") == "peft":
        return peft_format.load(model, path)
    if not getattr(model, "peft_config", None):
        apply(model, config["method"], **config["options"])
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
    params = dict(model.named_parameters())
    expected = set(trainable_state_dict(model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"adapter {path} does not match the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise ValueError(f"adapter tensor {name} has shape {tuple(value.shape)}, the model "
                                 f"expects {tuple(params[name].shape)}")
            params[name].copy_(value)
    return model


def _mergeable_layers(model):
    spec = METHODS[model.peft_config["method"]] if getattr(model, "peft_config", None) else None
    if spec is None or not spec.mergeable:
        name = spec.name if spec else "no method"
        raise ValueError(f"{name} cannot be merged into the base weights; "
                         f"mergeable methods are: {', '.join(m for m in METHODS if METHODS[m].mergeable)}")
    return [m for m in model.modules() if hasattr(m, "merge") and m is not model]


def merge(model):
    """Fold the method into the base weights (same outputs, no extra inference cost)."""
    for layer in _mergeable_layers(model):
        layer.merge()
    return model


def unmerge(model):
    """Undo merge(): the base weights come back (up to float rounding) and the method is live again."""
    for layer in _mergeable_layers(model):
        layer.unmerge()
    return model

"""What works the same on any model a method was applied to (registry.apply), whatever the method: its
trainable tensors, its learning-rate factors, the defaults that fit a kind of task, merge and unmerge."""
import torch

from .registry import get_method, methods

# What replaces a method's defaults (Method.lr and its options', chosen on MiniLM classification) on another kind
# of task, where it was measured. Instruction tuning ("sft"): every linear layer at 1e-3, the README's SFT run
# (SmolLM2-135M-Instruct, exact match 0.837 with LoRA, 0.845 with QLoRA). DPO ("dpo"): 5e-4, docs/dpo.md's best
# run (LoRA's own 2e-3 gave the lowest reward accuracy there).
TASK_DEFAULTS = {  # kind of task -> method -> {"lr": ..., option: value}
    "sft": {"lora": {"lr": 1e-3, "targets": ["all"]}, "qlora": {"lr": 1e-3, "targets": ["all"]}},
    "dpo": {"lora": {"lr": 5e-4, "targets": ["all"]}, "qlora": {"lr": 5e-4, "targets": ["all"]}},
}


def task_defaults(method: str, kind: str) -> tuple[float, dict]:
    """(peak learning rate, option defaults) of `method` on a task of `kind`: TASK_DEFAULTS's where it has them,
    else the method's own lr and no options. train.py uses them when --lr and the options are not given.

        lr, options = mp.task_defaults("lora", "sft")   # 1e-3, {"targets": ["all"]}
    """
    spec = get_method(method)
    row = dict(TASK_DEFAULTS.get(kind, {}).get(spec.name, {}))
    return row.pop("lr", spec.lr), row


def expected_trainable_parameters(model) -> int:
    """The method's formula (+ a fresh classifier head), for comparison with the real count."""
    spec = get_method(model.peft_config["method"])
    count = spec.parameter_count(model.cfg, **model.peft_config["options"])
    if model.cfg.n_classes:
        count += model.cfg.d_model * model.cfg.n_classes + model.cfg.n_classes  # weight + bias
    return count


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """Exactly the parameters with requires_grad, by their names in the model: what an adapter file holds."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def lr_factors(model) -> dict[str, float]:
    """{parameter name: learning-rate factor} for the parameters the model's method wants trained faster or
    slower than the rest (LoRA+'s B), for loop.make_optimizer; {} when all learn at one rate, or for a model
    that is not minipeft's."""
    config = getattr(model, "peft_config", None)
    spec = get_method(config["method"]) if isinstance(config, dict) else None
    if spec is None or spec.lr_factors is None:
        return {}
    return spec.lr_factors(model, **config["options"])


def _mergeable_layers(model):
    spec = get_method(model.peft_config["method"]) if model.peft_config else None
    adapters = model.adapters  # extras/multi.py
    if adapters is not None and len(adapters.configs) > 1:
        names = ", ".join(adapters.configs)
        raise ValueError(f"this model has {len(adapters.configs)} adapters side by side ({names}), which share its "
                         "base weights; merge one adapter into a model of its own")
    if spec is None or not spec.mergeable:
        mergeable = ", ".join(name for name, method in methods().items() if method.mergeable)
        raise ValueError(f"{spec.name if spec else 'no method'} cannot be merged into the base weights; "
                         f"mergeable methods are: {mergeable}")
    return [m for m in model.modules() if hasattr(m, "merge") and m is not model]


def merge(model):
    """Fold the method into the base weights (same outputs, no extra inference cost); merging twice adds it once."""
    for layer in _mergeable_layers(model):
        layer.merge()
    return model


def unmerge(model):
    """Undo merge(): the base weights come back (up to float rounding) and the method is live again."""
    for layer in _mergeable_layers(model):
        layer.unmerge()
    return model

"""The base model under any method: `adapters_disabled` (what DPO's reference model is) and `base_view`.

    with mp.adapters_disabled(model):
        reference_logits = model(idx)        # the base model's, as before mp.apply
    logits = model(idx)                      # the adapter is back (also after an exception inside)

A method adds its own parameters in one of two kinds of place (model.py), and both can be emptied for a
while without touching a single weight:

    layers   a linear layer wrapped by a method (LoRA, QLoRA, DoRA, VeRA, LoHa, LoKr, IA³, bottleneck
             adapters, the routers of adapters side by side). Each declares `base_layer()`: a plain layer
             over the same frozen tensors (not copies), which stands in for it
    slots    Transformer.prompt (prompt tuning), Attention.prefix (prefix tuning), Attention.adaption
             (LLaMA-Adapter): set to None, so the model computes as if they were never filled; positions
             lose the virtual tokens too

        x ─► [LoRALinear: x Wᵀ + b + s·x AᵀBᵀ]    inside becomes    x ─► [FrozenLinear: x Wᵀ + b]

So the reference model of preference tuning costs no second copy of the weights: the same tensors run
once with the adapter and once without. What it cannot give back is a base that is not there any more:
a method that trains base weights itself (full, head, last_k, bitfit, the layer norms of Houlsby
adapters, a classifier head) or rewrote them when it was applied (LoRA's PiSSA and OLoRA inits),
and an adapter merged into the weights (mp.unmerge first). Those stop with a ValueError saying why (a
trained base weight is told by its name: mp.apply records the base model's parameter names).
QLoRA's base is its 4-bit one, the weights it actually runs on. A model sharded with FSDP holds its
weights as shards that only its own layers gather, so a stand-in could not read them: compute what
needs the base before sharding (train.py's --precompute-reference does).

`base_view(model)` is the same swap without the checks (model.peft_config and model.adapters None inside):
multi.py applies or loads a new adapter into it, to sit beside the ones the model has.
"""
from contextlib import contextmanager

import torch

from minipeft.core import targets as linear_targets
from minipeft.core.registry import get_method


def method_layers(model, skip=frozenset()) -> dict[tuple, torch.nn.Module]:
    """{(parent, attribute): layer} of every linear position holding a layer that declares base_layer()
    (a method's, a router, or a stand-in), leaving out the modules whose id is in `skip`."""
    found = {}
    for parent, attr in linear_targets.find(model, ["all"]):
        layer = getattr(parent, attr)
        if hasattr(layer, "base_layer") and id(layer) not in skip:
            found[(parent, attr)] = layer
    return found


def _slots(model) -> list[tuple[object, str]]:
    """(owner, attribute) of every method slot of the model: its prompt, each layer's prefix and adaption."""
    return [(model, "prompt")] + [(block.attn, slot) for block in model.blocks for slot in ("prefix", "adaption")]


@contextmanager
def base_view(model):
    """The bare base model: every method's layer replaced by its base_layer(), every slot emptied,
    model.peft_config and model.adapters None; all back as they were on exit (requires_grad too). Yields
    the ids of the plain stand-ins, so what a method puts in their place can be told apart."""
    saved_layers = method_layers(model)
    saved_slots = {(owner, slot): getattr(owner, slot) for owner, slot in _slots(model)}
    config, adapters = model.peft_config, model.adapters
    flags = [(p, p.requires_grad) for p in model.parameters()]
    stand_ins = {position: layer.base_layer() for position, layer in saved_layers.items()}
    for (parent, attr), plain in stand_ins.items():
        setattr(parent, attr, plain)
    for owner, slot in saved_slots:
        setattr(owner, slot, None)
    model.peft_config, model.adapters = None, None
    try:
        yield {id(plain) for plain in stand_ins.values()}
    finally:
        for (owner, attr), held in {**saved_layers, **saved_slots}.items():
            setattr(owner, attr, held)
        model.peft_config, model.adapters = config, adapters
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def adapters_disabled(model):
    """Inside, `model` computes the base model's outputs (every method's layers and slots switched off);
    on leaving, also by an exception, the method is back. ValueError when the base cannot be recovered
    (check_can_disable)."""
    check_can_disable(model)
    with base_view(model):
        yield model


def check_can_disable(model):
    """ValueError naming why switching the method off would not give the base model's outputs."""
    if any(getattr(module, "merged", False) for module in model.modules()):
        raise ValueError("this model has an adapter merged into its base weights, so its base model is not "
                         "there to switch back to; mp.unmerge(model) first")
    configs = model.adapters.configs.values() if model.adapters is not None else \
        [model.peft_config] if model.peft_config else []
    if not configs:  # no method: the model is its own base
        return
    for config in configs:
        spec = get_method(config["method"])
        if spec.changes_base(**config["options"]):
            raise ValueError(f"{spec.name} {config['options']} rewrote the base weights when it was applied, so "
                             "switching it off does not give the base model back; use an init that leaves them "
                             "alone (e.g. lora's kaiming)")
    base_names = model.base_parameter_names  # recorded by mp.apply
    trained = [name for name, p in model.named_parameters() if p.requires_grad and name in base_names]
    if trained:
        method = model.peft_config["method"] if model.peft_config else "this model's method"
        what = "the classifier head, whose values before training are not kept" if model.cfg.n_classes and \
            all(name.startswith("head.") for name in trained) else "weights of the base model itself"
        raise ValueError(f"{method} trains {what} ({', '.join(trained[:3])}{', ...' if len(trained) > 3 else ''}), "
                         "so switching it off cannot give the base model's outputs; use a method (and options) "
                         "that adds parameters of its own and leaves every base weight frozen, on an LM head")

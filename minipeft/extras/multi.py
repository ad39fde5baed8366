"""Several adapters on one base model, side by side (what peft calls adapter names):

    mp.load_adapter(model, "folder-a", name="a")      # either format; the base is shared, not copied
    mp.load_adapter(model, "folder-b", name="b")
    mp.set_adapter(model, "b")                        # what model(idx) runs, trains and saves
    model(idx, adapter_names=["a", "base", "b"])      # one adapter per row ("base": none)
    mp.save_adapter(model, path, name="a")            # any one of them, as if it were alone

How. Every linear layer some adapter wraps becomes an AdapterRouter: the frozen base layer (its weight
and bias under their own keys) and, in `layers`, that layer as each adapter wraps it (a LoRALinear, an
IA3Linear, ... over the same base weight). Without adapter_names a router runs the active adapter's layer
(the bare base where that adapter does not reach). With them, Transformer.encode hands the names to
`model.adapters.route`, and each router runs every adapter's layer on that adapter's rows only and puts
the outputs back in row order:

        x (B, …, in) ─┬─ rows of "a"    ─► layers["a"] ─┐
                      ├─ rows of "b"    ─► layers["b"] ─┼─► y (B, …, out)
                      └─ rows of "base" ─► x Wᵀ + b    ─┘

Each linear layer (and everything else in the model) computes a row from that row alone, so every row
equals running its adapter alone; the base matmul is shared out over the rows, so a mixed batch costs
about what one adapter costs on it (bench/multi_adapter.py measures it). The routing stays in place until
the next forward pass, so activation checkpointing recomputes a block with the same rows.

Only the active adapter trains (requires_grad) and `model.peft_config` is its config, so everything
written for one adapter (training, the memory ledger, merging, peft's format) sees the model as if the
active adapter were its only one. `single_view(model, name)` does the same for any adapter (save_adapter
uses it); `base_view(model)` (disable.py) shows the bare base, into which `add_adapter` applies or loads a
new adapter before moving its layers into the routers. Only methods that wrap linear layers can share a base
(`Method.side_by_side`); not an adapter that rewrote the base weights (PiSSA, OLoRA init), nor a model with
a classifier head (each adapter would need its own).
"""
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from minipeft.core import targets as linear_targets
from minipeft.extras.disable import base_view
from minipeft.core.registry import methods, get_method
from minipeft.core.lora import FrozenLinear

BASE = "base"  # the name of no adapter, in adapter_names
DEFAULT = "default"  # the name an adapter applied the usual way (mp.apply, load_adapter without name) gets


class AdapterSet:
    """model.adapters: the adapters side by side, the active one, and which rows run which adapter."""

    def __init__(self):
        self.configs: dict[str, dict] = {}  # name -> its peft_config {"method", "options", "base_fingerprint"}
        self.trainable: dict[str, list[nn.Parameter]] = {}  # name -> the parameters it trains
        self.active: str | None = None
        self.rows: dict[str, torch.Tensor] | None = None  # name -> row indices; None: all rows run `active`

    def route(self, adapter_names, idx: torch.Tensor):
        """Which adapter each row of the batch idx (B, T) runs: adapter_names (B names, "base" for none), or
        None for the active adapter on every row. Called by Transformer.encode before the blocks run."""
        self.rows = None
        if adapter_names is None:
            return
        if not isinstance(adapter_names, (list, tuple)):
            raise ValueError(f"adapter_names is a list of adapter names, one per row ('{BASE}' for none), "
                             f"not a value of type {type(adapter_names).__name__}")
        not_names = [n for n in adapter_names if not isinstance(n, str)]
        if not_names:
            raise ValueError(f"adapter_names holds one adapter name (a string) per row ('{BASE}' for none); "
                             f"{not_names[0]!r} is not a name")
        names = list(adapter_names)
        if len(names) != idx.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} names for a batch of {idx.shape[0]} rows; "
                             "give one per row")
        unknown = sorted(set(names) - set(self.configs) - {BASE})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; loaded: "
                             f"{', '.join(self.configs)} (and '{BASE}' for none)")
        rows = {}
        for i, name in enumerate(names):
            rows.setdefault(name, []).append(i)
        self.rows = {name: torch.tensor(r, device=idx.device) for name, r in rows.items()}


class AdapterRouter(FrozenLinear):
    """A base linear layer and the versions of it that several adapters wrap (`layers`, by name)."""

    def __init__(self, base: nn.Linear, adapters: AdapterSet):
        super().__init__(base)
        self.layers = nn.ModuleDict()
        self.adapter_set = adapters  # shared by every router of the model (not a module)

    def run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name in self.layers:
            return self.layers[name](x)
        return F.linear(x, self.weight, self.bias)  # the bare base: "base", or an adapter that skips this layer

    def forward(self, x):  # (B, …, in) -> (B, …, out)
        rows = self.adapter_set.rows
        if rows is None or len(rows) == 1:
            return self.run(self.adapter_set.active if rows is None else next(iter(rows)), x)
        outputs = [(index, self.run(name, x[index])) for name, index in rows.items()]
        y = outputs[0][1].new_empty(x.shape[:-1] + (self.out_features,))
        for index, out in outputs:
            y[index] = out
        return y

    def extra_repr(self):
        return f"{super().extra_repr()}, adapters={list(self.layers)}"


def _wrapped(model, skip=frozenset()) -> dict[tuple, nn.Module]:
    """{(parent, attribute): layer} of every linear position holding a method's layer or a router (a
    FrozenLinear), leaving out the modules whose id is in `skip`."""
    found = {}
    for parent, attr in linear_targets.find(model, ["all"]):
        layer = getattr(parent, attr)
        if isinstance(layer, FrozenLinear) and id(layer) not in skip:
            found[(parent, attr)] = layer
    return found


@contextmanager
def single_view(model, name: str):
    """The model as if adapter `name` were its only one, applied the usual way (its layers in place of the
    routers, its peft_config, its parameters trainable); all back on exit."""
    adapters = _adapters(model)
    _check_known(adapters, name)
    routers = [(parent, attr, layer) for (parent, attr), layer in _wrapped(model).items()
               if isinstance(layer, AdapterRouter)]
    for parent, attr, router in routers:
        setattr(parent, attr, router.layers[name] if name in router.layers else FrozenLinear(router))
    model.adapters, model.peft_config = None, adapters.configs[name]
    for p in adapters.trainable[name]:
        p.requires_grad_(True)
    try:
        yield model
    finally:
        for parent, attr, router in routers:
            setattr(parent, attr, router)
        model.adapters = adapters
        set_adapter(model, adapters.active)


def _adapters(model) -> AdapterSet:
    if model.adapters is None:
        raise ValueError("this model has no adapters loaded by name; load them with "
                         "mp.load_adapter(model, path, name=...)")
    return model.adapters


def _check_known(adapters: AdapterSet, name: str):
    if name not in adapters.configs:
        raise ValueError(f"unknown adapter {name!r}; loaded: {', '.join(adapters.configs)}")


def set_adapter(model, name: str):
    """Make adapter `name` the one model(idx) runs without adapter_names, trains (only its parameters have
    requires_grad) and saves by default."""
    adapters = _adapters(model)
    _check_known(adapters, name)
    adapters.active = name
    model.peft_config = adapters.configs[name]
    model.requires_grad_(False)  # the shared base and every other adapter
    for p in adapters.trainable[name]:
        p.requires_grad_(True)
    return model


def _configs(model) -> dict[str, dict]:
    """name -> peft_config of every adapter the model holds ("default" for one applied the usual way)."""
    if model.adapters is not None:
        return dict(model.adapters.configs)
    return {DEFAULT: model.peft_config} if model.peft_config else {}


def adapter_names(model) -> list[str]:
    """The adapters a model holds: by name side by side, ["default"] for one applied the usual way."""
    return list(_configs(model))


def check_can_add(model, name, method: str, options: dict):
    """add_adapter's checks, before anything changes (ValueError naming what differs)."""
    if not isinstance(name, str) or not name or name == BASE:
        raise ValueError(f"an adapter name must be a non-empty string other than '{BASE}', not {name!r}")
    configs = _configs(model)
    if name in configs:
        raise ValueError(f"this model has an adapter named {name!r} already; pick another name")
    for who, config in {**configs, name: {"method": method, "options": options}}.items():
        spec = get_method(config["method"])
        if not spec.side_by_side:
            raise ValueError(f"adapter {who!r} is {spec.name}, which cannot share a base model with other adapters; "
                             f"the methods that can: {', '.join(m for m in methods() if methods()[m].side_by_side)}")
        if spec.changes_base(**config["options"]):
            raise ValueError(f"adapter {who!r} ({spec.name} {config['options']}) rewrote the base weights it was "
                             "applied to, so it cannot share them with other adapters")
    if model.cfg.n_classes:
        raise ValueError("adapters side by side share one model, and a classifier head is each adapter's own; "
                         "load classifier adapters into models of their own")
    if any(getattr(m, "merged", False) for m in model.modules()):
        raise ValueError("this model has an adapter merged into its base weights; mp.unmerge(model) first")


def add_adapter(model, name: str, method: str, options: dict, build):
    """Add adapter `name` (method, options: for the checks) beside the model's others: `build(model)`
    applies or loads it into the bare base (base_view), and its layers then join the routers. The first
    adapter added becomes the active one."""
    check_can_add(model, name, method, options)
    with base_view(model) as stand_ins:
        build(model)
        config = model.peft_config
        trainable = [p for p in model.parameters() if p.requires_grad]
        new = _wrapped(model, stand_ins)
    adapters = model.adapters or _adopt(model)
    for (parent, attr), layer in new.items():
        _router_at(parent, attr, adapters).layers[name] = layer
    adapters.configs[name], adapters.trainable[name] = config, trainable
    return set_adapter(model, adapters.active or name)


def _adopt(model) -> AdapterSet:
    """Give the model its AdapterSet; an adapter applied the usual way joins it as "default"."""
    adapters = model.adapters = AdapterSet()
    if model.peft_config:
        for (parent, attr), layer in _wrapped(model).items():
            _router_at(parent, attr, adapters).layers[DEFAULT] = layer
        adapters.configs[DEFAULT] = model.peft_config
        adapters.trainable[DEFAULT] = [p for p in model.parameters() if p.requires_grad]
        adapters.active = DEFAULT
    return adapters


def _router_at(parent, attr: str, adapters: AdapterSet) -> AdapterRouter:
    layer = getattr(parent, attr)
    if not isinstance(layer, AdapterRouter):
        layer = AdapterRouter(layer, adapters)
        setattr(parent, attr, layer)
    return layer

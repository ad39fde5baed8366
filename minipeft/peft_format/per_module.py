"""What the peft halves of the methods with per-module tensors share (IA³, VeRA, LoHa, LoKr; DoRA's
magnitude too): their tensors sit on each adapted transformers module, `base_model.model.<module>.<name>`.

    PerModuleInPeft   export / gather those tensors, fused modules refused unless a method maps them
    fitted            checks what a hook read against the shapes the method gives, fills left-out layers
    LycorisInPeft     the whole hook of LoHa and LoKr (peft's LyCORIS tuners)
"""
import copy

import torch

from minipeft.core import targets as linear_targets
from minipeft.core.model import Transformer
from minipeft.formats.weights import weights_to_come
from minipeft.core.registry import apply


class PerModuleInPeft:
    """The part of a peft hook that methods with per-module tensors share. A subclass names its tensors
    (`names`, peft's suffixes) and says what one of our layers holds under them (`layer_tensors`, default:
    the attributes of those names). A fused transformers module (GPT-2's c_attn holds q, k and v) is
    refused unless the subclass maps it (`fuse` for export, `split` for import)."""

    peft_type = ""
    names: tuple = ()
    on_gpt2 = True  # peft can adapt GPT-2's Conv1D layers with it (not LyCORIS' LoHa, LoKr)

    def layer_tensors(self, layer) -> dict:
        """{peft name: tensor} of one of our adapted layers."""
        return {name: getattr(layer, name) for name in self.names if getattr(layer, name, None) is not None}

    def fuse(self, layers: dict, held: tuple, layout) -> dict:
        """{peft name: tensor} of a fused module from our adapted layers in it, {target: layer}."""
        self.refuse_fused(held, layout)

    def split(self, theirs: dict, held: tuple, layout) -> dict:
        """{target: {peft name: tensor}} from a fused module's tensors."""
        self.refuse_fused(held, layout)

    def refuse_fused(self, held: tuple, layout):
        others = ", ".join(t for t in linear_targets.TARGETS if t not in held and t in layout.modules)
        raise ValueError(f"peft's {self.peft_type} on {layout.modules[held[0]][0]} adapts {', '.join(held)} as one "
                         f"module, which minipeft's per-layer {self.peft_type} cannot match exactly; adapt "
                         f"{others} only")

    def export(self, model, layout, targets) -> tuple[dict, list]:
        """Our adapted layers -> (tensors by peft's keys, peft's target_modules)."""
        if model.cfg.flavor == "gpt2" and not self.on_gpt2:
            raise ValueError(f"peft's {self.peft_type} adapts nn.Linear and convolution layers, not GPT-2's "
                             "Conv1D, so a gpt2 adapter has no peft counterpart; save it in minipeft's format")
        tensors, modules = {}, {}
        for i, block in enumerate(model.blocks):
            for target in dict.fromkeys(layout.fused(t)[0] for t in targets):  # each module once
                held = layout.fused(target)
                layers = {t: block.get_submodule(linear_targets.TARGETS[t]) for t in held if t in targets}
                theirs = self.fuse(layers, held, layout) if len(held) > 1 else self.layer_tensors(layers[target])
                for name, tensor in theirs.items():
                    tensors[layout.key(target, i, name)] = tensor
                modules[layout.peft_name(target, i)] = True
        return tensors, list(modules)

    def gather(self, tensors: dict, layout) -> dict[tuple[int, str], dict]:
        """peft's tensors -> {(layer, target): {peft name: tensor as fp32}}, fused modules split."""
        by_module = {}
        for key, value in tensors.items():
            module, _, name = key.removeprefix(layout.root).rpartition(".")
            if not key.startswith(layout.root) or name not in self.names:
                raise ValueError(f"adapter {layout.path} holds {key}, which is not a {self.peft_type} tensor of a "
                                 "linear layer nor a classifier; minipeft cannot load it")
            by_module.setdefault(module, {})[name] = value.float()
        if not by_module:
            raise ValueError(f"adapter {layout.path} holds no {self.peft_type} tensors")
        found = {}
        for module, theirs in by_module.items():
            layer, held = layout.locate(module)
            for target, values in (self.split(theirs, held, layout) if len(held) > 1 else {held[0]: theirs}).items():
                found[(layer, target)] = values
        return found

    @staticmethod
    def refuse_features(config: dict, path, lacking: dict, method: str) -> None:
        """ValueError naming the config fields (lacking: field -> what it is) set to something we lack."""
        used = [what for field, what in lacking.items() if config.get(field) not in (None, False, 0, 0.0, "none", [], {})]
        if used:
            raise ValueError(f"adapter {path} uses {', '.join(used)}, which minipeft's {method} does not have; "
                             "load it with peft, or train it without")


def present_targets(found: dict) -> list[str]:
    """The targets, in targets.py's order, that any layer of `found` {(layer, target): ...} adapts."""
    return [t for t in linear_targets.TARGETS if any(t == key[1] for key in found)]


def fitted(model, method: str, options: dict, values: dict, path, fill: float = 0.0) -> dict:
    """Before the model changes: the values {our parameter name: tensor} a peft hook read, checked to have
    the shapes of the parameters they will be copied into, and completed with `fill` for the method's
    parameters peft had none for (layers it left out). The shapes come from applying `method` to a copy
    of the model's architecture on the meta device (no memory, no arithmetic)."""
    with weights_to_come():
        probe = apply(Transformer(copy.deepcopy(model.cfg)), method, **options)
    params = {n: p for n, p in probe.named_parameters() if p.requires_grad and not n.startswith("head.")}
    wrong = [f"{name} {tuple(v.shape)} (this model: {tuple(params[name].shape) if name in params else 'none'})"
             for name, v in values.items() if name not in params or params[name].shape != v.shape]
    if wrong:
        raise ValueError(f"adapter {path} does not fit this model: {'; '.join(wrong)}; "
                         "load the base model it was trained on")
    return {**{n: torch.full(p.shape, fill) for n, p in params.items()}, **values}


class LycorisInPeft(PerModuleInPeft):
    """LoHa and LoKr in peft's files (its LyCORIS tuners): the tensors of each adapted module under their
    own names (`names`, the same as ours), `r` and `alpha` in the config, and `fields`, config fields that
    are options of ours under the same name. peft's LyCORIS layers adapt nn.Linear, not GPT-2's Conv1D."""

    on_gpt2 = False
    method = ""  # our method's name
    fields: dict = {}  # config field -> its default in peft
    lacking = {"rank_dropout": "rank dropout", "module_dropout": "module dropout", "rank_pattern": "per-module ranks",
               "alpha_pattern": "per-module alphas", "exclude_modules": "excluded modules"}

    def to_peft(self, model, layout) -> tuple[dict, dict]:
        options = model.peft_config["options"]
        tensors, modules = self.export(model, layout, linear_targets.validate(model.cfg, options["targets"]))
        return tensors, {"r": options["rank"], "alpha": options["alpha"], "target_modules": modules,
                         **{field: options[field] for field in self.fields},
                         "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True}

    def check_config(self, config: dict, path) -> None:
        self.refuse_features(config, path, self.lacking, self.peft_type)

    def from_peft(self, model, config: dict, tensors: dict, layout) -> tuple[dict, dict]:
        found = self.gather(tensors, layout)
        options = {"rank": config.get("r", 8), "alpha": float(config.get("alpha", 8)),  # peft's defaults
                   "targets": present_targets(found),
                   **{field: config.get(field, default) for field, default in self.fields.items()}}
        values = {f"blocks.{i}.{linear_targets.TARGETS[t]}.{name}": value
                  for (i, t), theirs in found.items() for name, value in theirs.items()}
        return options, fitted(model, self.method, options, values, layout.path)  # left-out layers: 0, no update

"""(IA)³ in peft's files (peft_type IA3): each module has `ia3_l`, (out, 1) or, for its `feedforward_modules`,
(1, in). GPT-2's fused c_attn scales its output rows [q | k | v]: ours are written stacked (ones for a
target that is not adapted) and split back; scaling c_attn's input (one vector for q, k and v together)
has no per-layer equivalent and is refused both ways."""
import torch

from minipeft.core import targets as linear_targets

from .per_module import PerModuleInPeft, fitted, present_targets


class IA3InPeft(PerModuleInPeft):
    """(IA)³ in peft's files (peft_type IA3), per adapted module:

        base_model.model.<module>.ia3_l  (out, 1), or (1, in) if a feedforward module  <->  blocks.i.<target>.ia3_l

    and in the config `target_modules` and `feedforward_modules` (fan_in_fan_out for GPT-2's Conv1D)."""

    peft_type = "IA3"
    names = ("ia3_l",)

    def layer_tensors(self, layer) -> dict:
        return {"ia3_l": layer.ia3_l[None] if layer.scale_input else layer.ia3_l[:, None]}

    def fuse(self, layers: dict, held: tuple, layout) -> dict:
        if any(layer.scale_input for layer in layers.values()):
            self.refuse_fused(held, layout)  # one input scale for q, k and v together
        cfg = layout.cfg
        rows = [layers[t].ia3_l if t in layers else torch.ones(linear_targets.shape(cfg, t)[1],
                                                                device=next(iter(layers.values())).ia3_l.device)
                for t in held]
        return {"ia3_l": torch.cat(rows)[:, None]}  # (Σ out, 1)

    def split(self, theirs: dict, held: tuple, layout) -> dict:
        scale = theirs["ia3_l"]
        if scale.shape[0] == 1:  # scales the fused module's input
            self.refuse_fused(held, layout)
        sizes = [linear_targets.shape(layout.cfg, t)[1] for t in held]
        return {t: {"ia3_l": part} for t, part in zip(held, scale.split(sizes))}

    def to_peft(self, model, layout) -> tuple[dict, dict]:
        options = model.peft_config["options"]
        targets = linear_targets.validate(model.cfg, options["targets"])
        tensors, modules = self.export(model, layout, targets)
        feedforward = list(dict.fromkeys(layout.peft_name(t, i) for i in range(model.cfg.n_layer)
                                         for t in options["feedforward"]))
        return tensors, {"target_modules": modules, "feedforward_modules": feedforward,
                         "fan_in_fan_out": model.cfg.flavor == "gpt2", "init_ia3_weights": True}

    def check_config(self, config: dict, path) -> None:
        self.refuse_features(config, path, {"exclude_modules": "excluded modules"}, "IA3")

    def from_peft(self, model, config: dict, tensors: dict, layout) -> tuple[dict, dict]:
        found = self.gather(tensors, layout)
        modes = {}  # target -> scales its input?
        for (layer, t), theirs in found.items():
            scale_input = theirs["ia3_l"].shape[0] == 1
            if modes.setdefault(t, scale_input) != scale_input:
                raise ValueError(f"adapter {layout.path} scales the input of {t} in some layers and its output in "
                                 "others, which minipeft's IA3 (one choice per target) cannot hold")
        # a target that is exactly 1 everywhere (what a fused module holds for a target we did not adapt) is left out
        kept = [t for t in present_targets(found)
                if any(not torch.all(v["ia3_l"] == 1) for (_, u), v in found.items() if u == t)]
        targets = kept or present_targets(found)
        options = {"targets": targets, "feedforward": [t for t in targets if modes[t]]}
        values = {f"blocks.{i}.{linear_targets.TARGETS[t]}.ia3_l": theirs["ia3_l"].flatten()
                  for (i, t), theirs in found.items() if t in targets}
        return options, fitted(model, "ia3", options, values, layout.path, fill=1.0)  # left-out layers: l = 1


HOOK = IA3InPeft()  # hooks() registers it for the method "ia3"

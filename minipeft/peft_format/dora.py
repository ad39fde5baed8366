"""DoRA in peft's files: LoRA's (lora.py) with `use_dora` and a `lora_magnitude_vector` (out,) per module.
GPT-2's fused c_attn is written as LoRA writes it (a block-structured LoRA of rank n·r), with the magnitude
of a target that is not adapted set to its rows' norms ‖W‖ (so g = 1 there), and split back on loading.
"""
import torch

from minipeft.core import targets as linear_targets

from .lora import LoRAInPeft, base_4bit_format


class DoRAInPeft(LoRAInPeft):
    """DoRA in peft's files: LoRA's (lora.py, LoRAInPeft) with use_dora and, per module,

        base_model.model.<module>.lora_magnitude_vector  (out,)  <->  blocks.i.<target>.magnitude

    A fused module's magnitude is its targets' magnitudes stacked in row order (‖W‖ for a target that is
    not adapted: g = 1 there); loading splits it the same way and gives a target peft left out ‖W‖."""

    MAGNITUDE = "lora_magnitude_vector"

    def accepts(self, config: dict) -> bool:
        return bool(config.get("use_dora"))

    def check_config(self, config: dict, path) -> None:
        super().check_config({**config, "use_dora": False}, path)

    def to_peft(self, model, layout) -> tuple[dict, dict]:
        tensors, config = super().to_peft(model, layout)
        targets = linear_targets.validate(model.cfg, model.peft_config["options"]["targets"])
        for i, block in enumerate(model.blocks):
            for target in dict.fromkeys(layout.fused(t)[0] for t in targets):
                layers = [block.get_submodule(linear_targets.TARGETS[t]) for t in layout.fused(target)]
                magnitude = [layer.magnitude if t in targets else layer.weight.norm(dim=1)
                             for t, layer in zip(layout.fused(target), layers)]
                tensors[layout.key(target, i, self.MAGNITUDE)] = torch.cat(magnitude)
        config.update(use_dora=True)
        return tensors, config

    def from_peft(self, model, config: dict, tensors: dict, layout) -> tuple[dict, dict]:
        if base_4bit_format(model):
            raise ValueError(f"adapter {layout.path} is DoRA, which minipeft's 4-bit layers do not take (they take "
                             "LoRA only, as qlora); load it into the full-precision model")
        magnitudes = {key: tensors.pop(key) for key in list(tensors) if key.endswith("." + self.MAGNITUDE)}
        options, weights = super().from_peft(model, config, tensors, layout)
        cfg = model.cfg

        def norm(layer, t):  # ‖W‖ per row: the magnitude that leaves a row as it is
            return model.blocks[layer].get_submodule(linear_targets.TARGETS[t]).weight.detach().norm(dim=1)
        for key, value in magnitudes.items():
            layer, held = layout.locate(key.removeprefix(layout.root).rpartition(".")[0])
            for t, part in zip(held, value.float().split([linear_targets.shape(cfg, t)[1] for t in held])):
                if t in options["targets"]:
                    weights[f"blocks.{layer}.{linear_targets.TARGETS[t]}.magnitude"] = part
                elif not torch.allclose(part, norm(layer, t), rtol=1e-6, atol=0):
                    raise ValueError(f"adapter {layout.path} rescales the rows of {t} in layer {layer} (its DoRA "
                                     "magnitude) without a LoRA update there, which minipeft's DoRA cannot hold")
        for i in range(cfg.n_layer):  # where peft had no magnitude: ‖W‖, so g = 1
            for t in options["targets"]:
                weights.setdefault(f"blocks.{i}.{linear_targets.TARGETS[t]}.magnitude", norm(i, t))
        return options, weights


HOOK = DoRAInPeft()  # hooks() registers it for the method "dora"

"""VeRA in peft's files (peft_type VERA), both ways."""
import torch

from minipeft.core import targets as linear_targets
from minipeft.core.vera import SharedProjections

from .per_module import PerModuleInPeft, fitted, present_targets


class VeRAInPeft(PerModuleInPeft):
    """VeRA in peft's files (peft_type VERA), per adapted module

        base_model.model.<module>.vera_lambda_b  (out,)   <->  blocks.i.<target>.vera_lambda_b
        base_model.model.<module>.vera_lambda_d  (r,)     <->  blocks.i.<target>.vera_lambda_d

    and, with save_projection, the shared matrices as base_model.vera_A / vera_B: we write ours and, loading,
    check theirs equal the ones our seed draws (config: r, projection_prng_key, d_initial, vera_dropout).
    GPT-2's fused c_attn has one λ_d for q, k and v together, which has no per-layer equivalent: refused."""

    peft_type = "VERA"
    names = ("vera_lambda_b", "vera_lambda_d")
    SHARED = {"A": "base_model.vera_A", "B": "base_model.vera_B"}

    def to_peft(self, model, layout) -> tuple[dict, dict]:
        options = model.peft_config["options"]
        targets = linear_targets.validate(model.cfg, options["targets"])
        tensors, modules = self.export(model, layout, targets)
        shared = next(m for m in model.modules() if isinstance(m, SharedProjections))
        tensors.update({key: getattr(shared, name) for name, key in self.SHARED.items()})
        return tensors, {"r": options["rank"], "target_modules": modules, "projection_prng_key": options["projection_seed"],
                         "save_projection": True, "vera_dropout": options["dropout"], "d_initial": options["d_initial"],
                         "fan_in_fan_out": model.cfg.flavor == "gpt2", "bias": "none", "init_weights": True}

    def check_config(self, config: dict, path) -> None:
        self.refuse_features(config, path, {"bias": "trained base biases", "exclude_modules": "excluded modules"},
                             "VeRA")

    def from_peft(self, model, config: dict, tensors: dict, layout) -> tuple[dict, dict]:
        shared = {name: tensors.pop(key).float() for name, key in self.SHARED.items() if key in tensors}
        found = self.gather(tensors, layout)
        options = {"rank": config.get("r", 256), "targets": present_targets(found),  # peft's defaults, as below
                   "dropout": config.get("vera_dropout", 0.0), "d_initial": config.get("d_initial", 0.1),
                   "projection_seed": config.get("projection_prng_key", 0)}
        values = {f"blocks.{i}.{linear_targets.TARGETS[t]}.{name}": value
                  for (i, t), theirs in found.items() for name, value in theirs.items()}
        values = fitted(model, "vera", options, values, layout.path)  # left-out layers: λ_b = 0, no update
        self._check_projections(model, options, shared, layout.path)
        return options, values

    @staticmethod
    def _check_projections(model, options, shared: dict, path):
        shapes = [linear_targets.shape(model.cfg, t) for t in options["targets"]]
        ours = SharedProjections(options["rank"], max(i for i, _ in shapes), max(o for _, o in shapes),
                                 options["projection_seed"])
        for name, theirs in shared.items():
            if not torch.equal(theirs, getattr(ours, name)):
                raise ValueError(f"adapter {path}: its saved VeRA matrix {name} {tuple(theirs.shape)} is not the one "
                                 f"projection_prng_key={options['projection_seed']} draws here; minipeft draws them "
                                 "from the seed, so it cannot use these")


HOOK = VeRAInPeft()  # hooks() registers it for the method "vera"

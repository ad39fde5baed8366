"""Prefix tuning in peft's files (peft_type PREFIX_TUNING), both ways."""
import torch

from . import PROMPT_ROOT, TRANSFORMERS_MODELS


class PrefixTuningInPeft:
    """Prefix tuning in peft's files (peft_type PREFIX_TUNING): one table

        prompt_embeddings  (P, L·2·d_kv)    <->  prefix_tuning.prefix

    Each row is one virtual token, ordered (layer, key/value, head, head_dim): the same order as our
    `prefix` table, so it copies as it is. peft stores the prefixes only, never its reparameterization
    MLP (prefix_projection): we export folded prefixes (as `fold` computes them) with prefix_projection
    false, and load any prefixes as mlp_hidden=0. Not on distilbert, either way: peft hands the prefixes to
    the transformers model as past key values, which DistilBertModel does not take."""

    peft_type = "PREFIX_TUNING"
    root = PROMPT_ROOT  # its classifier's key: base_model.score.weight
    without_past = ("distilbert",)  # families whose transformers model takes no past key values

    def to_peft(self, model, layout) -> tuple[dict, dict]:
        cfg, tuning = model.cfg, model.prefix_tuning
        self._refuse_family(cfg)
        table = torch.cat([tuning.layer_table(i) for i in range(cfg.n_layer)], dim=1)  # (P, L·2·d_kv)
        d_kv = cfg.n_kv_head * cfg.head_dim
        config = {"num_virtual_tokens": tuning.length, **layout.prompt_fields(d_kv, cfg.n_kv_head),
                  "encoder_hidden_size": d_kv, "prefix_projection": False}
        return {"prompt_embeddings": table}, config

    def from_peft(self, model, config: dict, tensors: dict, layout) -> tuple[dict, dict]:
        cfg = model.cfg
        self._refuse_family(cfg)
        table = layout.prompt_table(tensors)
        length, d_kv = config["num_virtual_tokens"], cfg.n_kv_head * cfg.head_dim
        layout.check_prompt_table(config, table, (length, cfg.n_layer * 2 * d_kv),
                                  layout.prompt_fields(d_kv, cfg.n_kv_head))
        return {"length": length, "mlp_hidden": 0}, {"prefix_tuning.prefix": table}

    def _refuse_family(self, cfg) -> None:
        """peft runs prefixes only through a transformers model that takes past key values."""
        if cfg.flavor in self.without_past:
            name = TRANSFORMERS_MODELS[(cfg.flavor, False)][0]
            raise ValueError(f"prefix tuning on {cfg.flavor} is not exchangeable with peft: peft hands the prefixes to "
                             f"{name} as past key values, which it does not take; use LoRA on {cfg.flavor}")


HOOK = PrefixTuningInPeft()  # hooks() registers it for the method "prefix"

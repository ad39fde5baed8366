"""Prefix tuning in peft's files (peft_type PREFIX_TUNING), both ways."""
import torch

from . import PROMPT_ROOT


class PrefixTuningInPeft:
    """Prefix tuning in peft's files (peft_type PREFIX_TUNING): one table

        prompt_embeddings  (P, L·2·d_kv)    <->  prefix_tuning.prefix

    Each row is one virtual token, ordered (layer, key/value, head, head_dim): the same order as our
    `prefix` table, so it copies as it is. peft stores the prefixes only, never its reparameterization
    MLP (prefix_projection): we export folded prefixes (as `fold` computes them) with prefix_projection
    false, and load any prefixes as mlp_hidden=0."""

    peft_type = "PREFIX_TUNING"
    root = PROMPT_ROOT  # its classifier's key: base_model.score.weight

    def to_peft(self, model, layout) -> tuple[dict, dict]:
        cfg, tuning = model.cfg, model.prefix_tuning
        table = torch.cat([tuning.layer_table(i) for i in range(cfg.n_layer)], dim=1)  # (P, L·2·d_kv)
        d_kv = cfg.n_kv_head * cfg.head_dim
        config = {"num_virtual_tokens": tuning.length, **layout.prompt_fields(d_kv, cfg.n_kv_head),
                  "encoder_hidden_size": d_kv, "prefix_projection": False}
        return {"prompt_embeddings": table}, config

    def from_peft(self, model, config: dict, tensors: dict, layout) -> tuple[dict, dict]:
        cfg = model.cfg
        table = layout.prompt_table(tensors)
        length, d_kv = config["num_virtual_tokens"], cfg.n_kv_head * cfg.head_dim
        layout.check_prompt_table(config, table, (length, cfg.n_layer * 2 * d_kv),
                                  layout.prompt_fields(d_kv, cfg.n_kv_head))
        return {"length": length, "mlp_hidden": 0}, {"prefix_tuning.prefix": table}


HOOK = PrefixTuningInPeft()  # hooks() registers it for the method "prefix"

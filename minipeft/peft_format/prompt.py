"""Prompt tuning in peft's files (peft_type PROMPT_TUNING), both ways."""
from . import PROMPT_ROOT


class PromptTuningInPeft:
    """Prompt tuning in peft's files (peft_type PROMPT_TUNING): one table, our soft prompt as it is,

        prompt_embeddings  (P, d)    <->  prompt.embedding

    and the config's num_virtual_tokens = P. Not on bert, either way: we insert the soft prompt after
    [CLS], peft before it, so [CLS] gets position P instead of 0; no choice of prompt vectors changes
    that, and it changes every output. Not with a classifier either: peft hands *ForSequenceClassification
    embeddings, in which transformers cannot see padding, so it classifies the last position, padding or
    not, where we classify the last real token."""

    peft_type = "PROMPT_TUNING"
    root = PROMPT_ROOT  # its classifier's key: base_model.score.weight

    def to_peft(self, model, layout) -> tuple[dict, dict]:
        cfg = model.cfg
        if not cfg.causal:
            raise ValueError(f"prompt tuning on {cfg.flavor} cannot be exported to peft exactly: we insert the soft "
                             "prompt after [CLS], peft before it, which moves [CLS] from position 0 to "
                             f"{model.prompt.length} and changes every output; use prefix tuning or LoRA on bert")
        self._refuse_classifier(cfg)
        config = {"num_virtual_tokens": model.prompt.length, **layout.prompt_fields(cfg.d_model, cfg.n_head),
                  "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,  # trained: init is moot
                  "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
        return {"prompt_embeddings": model.prompt.embedding}, config

    def from_peft(self, model, config: dict, tensors: dict, layout) -> tuple[dict, dict]:
        cfg = model.cfg
        table = layout.prompt_table(tensors)
        if not cfg.causal:
            raise ValueError(f"adapter {layout.path} is peft prompt tuning on {cfg.flavor}, which puts the soft prompt "
                             "before [CLS]; minipeft puts it after [CLS], so it cannot be loaded exactly")
        self._refuse_classifier(cfg)
        length = config["num_virtual_tokens"]
        layout.check_prompt_table(config, table, (length, cfg.d_model), layout.prompt_fields(cfg.d_model, cfg.n_head))
        return {"length": length}, {"prompt.embedding": table}

    @staticmethod
    def _refuse_classifier(cfg) -> None:
        """A classifier under peft's prompt tuning reads the last position of right-padded rows (a pad)."""
        if cfg.n_classes:
            raise ValueError("prompt tuning with a classifier is not exchangeable with peft: peft hands the "
                             "classifier embeddings, in which transformers cannot see padding, so it classifies "
                             "the last position, padding or not, where minipeft classifies the last real token; "
                             "use prefix tuning or LoRA for a classifier")


HOOK = PromptTuningInPeft()  # hooks() registers it for the method "prompt"

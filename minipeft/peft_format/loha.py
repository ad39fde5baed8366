"""LoHa in peft's files (peft_type LOHA): a module holds hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, the same
matrices as ours; its rank_dropout and module_dropout (training-time dropouts we do not have) and per-module
ranks are refused. peft's LoHa cannot adapt GPT-2 (its Conv1D layers), so gpt2 adapters stay in our format.
"""
from .per_module import LycorisInPeft


class LoHaInPeft(LycorisInPeft):
    """LoHa in peft's files (peft_type LOHA): per adapted module

        base_model.model.<module>.hada_w1_a (out, r), hada_w1_b (r, in), hada_w2_a, hada_w2_b
            <->  blocks.i.<target>.hada_w1_a, ... (the same)

    and `r`, `alpha` in the config (scale alpha / r); per_module.LycorisInPeft does the rest."""

    peft_type, method = "LOHA", "loha"
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


HOOK = LoHaInPeft()  # hooks() registers it for the method "loha"

"""LoKr in peft's files (peft_type LOKR): a module holds lokr_w1 or lokr_w1_a/lokr_w1_b, and lokr_w2 or
lokr_w2_a/lokr_w2_b, the same matrices as ours. Its rank_dropout, module_dropout and per-module ranks are
refused. peft's LoKr cannot adapt GPT-2 (its Conv1D layers), so gpt2 adapters stay in our format.
"""
from .per_module import LycorisInPeft


class LoKrInPeft(LycorisInPeft):
    """LoKr in peft's files (peft_type LOKR): per adapted module

        base_model.model.<module>.lokr_w1 (a, c) | lokr_w1_a, lokr_w1_b;  lokr_w2 (b, d) | lokr_w2_a, lokr_w2_b
            <->  blocks.i.<target>.lokr_w1, ... (the same)

    and `r`, `alpha`, `decompose_both`, `decompose_factor` in the config (which decide the shapes);
    per_module.LycorisInPeft does the rest."""

    peft_type, method = "LOKR", "lokr"
    names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    fields = {"decompose_both": False, "decompose_factor": -1}


HOOK = LoKrInPeft()  # hooks() registers it for the method "lokr"

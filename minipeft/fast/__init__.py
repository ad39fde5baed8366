"""Fast twins: for some functions of minipeft/core/, a version written for speed and memory instead of for
reading, with the same results (bit for bit where its module says so; tests check each against its core
version). The core looks each of these names up at call time (`model.lm_loss(...)`, not a reference taken
at import), so `enable()` swaps every twin in by assigning it there, and `disable()` puts the core versions
back. train.py enables them; the Python API runs the readable core unless you call `minipeft.fast.enable()`.

    import minipeft.fast
    minipeft.fast.enable()            # every core function below is now its twin
    minipeft.fast.enable(nf4=False)   # all but NF4's: a model without 4-bit layers never loads the quantizer
    minipeft.fast.disable()           # the readable core versions again
"""
from minipeft.core import model as core_model
from minipeft.fast import dropout as fast_dropout
from minipeft.fast import losses as fast_losses

CORE = {}  # (owner, name) -> the core version, kept when its twin first comes in, to restore


def twins(nf4: bool = True) -> list[tuple]:
    """(where the core looks the name up, the name, the fast twin): one line per twin. NF4's only with
    nf4: importing them imports core/nf4.py, the quantizer they replace."""
    found = [(core_model, "lm_loss", fast_losses.lm_loss),  # tiled: the logits never exist whole
             (core_model, "dropout", fast_dropout.dropout)]  # 4 elements per random number
    if nf4:
        from minipeft.core import nf4 as core_nf4
        from minipeft.fast import nf4 as fast_nf4
        found += [(core_nf4, "quantize_4bit", fast_nf4.quantize_4bit),
                  (core_nf4, "dequantize_4bit", fast_nf4.dequantize_4bit),
                  (core_nf4.Linear4bit, "forward", fast_nf4.linear4bit_forward)]  # W_hat not kept for backward
    return found


def enable(nf4: bool = True):
    """Swap the fast twins in for their core versions (nf4=False: all but NF4's)."""
    for owner, name, fast in twins(nf4):
        CORE.setdefault((owner, name), getattr(owner, name))
        setattr(owner, name, fast)


def disable():
    """Put every core version back."""
    for (owner, name), core in CORE.items():
        setattr(owner, name, core)


def enabled(nf4: bool = True) -> bool:
    """Whether the fast twins are in (nf4=False: all but NF4's)."""
    return all(getattr(owner, name) is fast for owner, name, fast in twins(nf4))

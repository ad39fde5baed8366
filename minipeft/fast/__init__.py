"""Fast twins: for some functions of minipeft/core/, a version written for speed and memory instead of for
reading, with the same results (bit for bit where its module says so; tests check each against its core
version). The core looks each of these names up at call time (`model.lm_loss(...)`, not a reference taken
at import), so `enable()` swaps every twin in by assigning it there, and `disable()` puts the core versions
back. train.py enables them; the Python API runs the readable core unless you call `minipeft.fast.enable()`.

    import minipeft.fast
    minipeft.fast.enable()    # every core function below is now its twin
    minipeft.fast.disable()   # the readable core versions again
"""
from minipeft.core import model as core_model
from minipeft.core import nf4 as core_nf4
from minipeft.fast import dropout as fast_dropout
from minipeft.fast import losses as fast_losses
from minipeft.fast import nf4 as fast_nf4

TWINS = (  # (where the core looks the name up, the name, the fast twin): one line per twin
    (core_nf4, "quantize_4bit", fast_nf4.quantize_4bit),
    (core_nf4, "dequantize_4bit", fast_nf4.dequantize_4bit),
    (core_nf4.Linear4bit, "forward", fast_nf4.linear4bit_forward),
    (core_model, "lm_loss", fast_losses.lm_loss),  # tiled: the logits never exist whole
    (core_model, "dropout", fast_dropout.dropout),  # 4 elements per random number
)
CORE = {(owner, name): getattr(owner, name) for owner, name, _ in TWINS}  # the core versions, to restore


def enable():
    """Swap every fast twin in for its core version."""
    for owner, name, fast in TWINS:
        setattr(owner, name, fast)


def disable():
    """Put every core version back."""
    for owner, name, _ in TWINS:
        setattr(owner, name, CORE[owner, name])


def enabled() -> bool:
    """Whether the fast twins are in."""
    return all(getattr(owner, name) is fast for owner, name, fast in TWINS)

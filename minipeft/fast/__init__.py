"""The fast twins: faster versions of functions of the core, each tested equal to the one it replaces.

    import minipeft.fast
    minipeft.fast.enable()    # every core function below is now its twin (train.py does this)
    minipeft.fast.disable()   # the readable core versions again

The core calls each of these functions through its module's global at run time (`model.lm_loss(...)`,
not a reference taken at import), so swapping the module attribute swaps every caller at once. The
Python API runs the readable core until enable() is called.
"""
import importlib

# core function -> its fast twin, one line per twin
TWINS = {
    "minipeft.core.model.lm_loss": "minipeft.fast.losses.lm_loss",  # tiled: the logits never exist whole
    "minipeft.core.model.dropout": "minipeft.fast.dropout.dropout",  # 4 elements per random number
}
_originals = {}  # core function name -> the core function, while its twin is in


def _split(dotted: str):
    module, name = dotted.rsplit(".", 1)
    return importlib.import_module(module), name


def enable():
    """Swap every fast twin in for its core function."""
    for core, fast in TWINS.items():
        module, name = _split(core)
        _originals.setdefault(core, getattr(module, name))
        fast_module, fast_name = _split(fast)
        setattr(module, name, getattr(fast_module, fast_name))


def disable():
    """Put the core functions back."""
    for core, original in _originals.items():
        module, name = _split(core)
        setattr(module, name, original)
    _originals.clear()


def enabled() -> bool:
    """Whether the fast twins are in."""
    return bool(_originals)

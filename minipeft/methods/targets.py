"""Which linear layers a method adapts: short target names, the same in every flavour.

    q k v o     blocks[i].attn.{q,k,v,o}        the attention projections
    up down     blocks[i].mlp.{up,down}          the feed-forward layers
    gate        blocks[i].mlp.gate               the gate of a gated MLP (SwiGLU, GeGLU: cfg.gated)

`targets` is a list of these names, or ["all"] for every one the model has. LoRA and QLoRA (and any
method that wraps linear layers by name) find their layers here.
"""
TARGETS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o",
           "up": "mlp.up", "gate": "mlp.gate", "down": "mlp.down"}


def present(cfg) -> tuple[str, ...]:
    """The targets a model of this config has."""
    return tuple(t for t in TARGETS if t != "gate" or cfg.gated)


def validate(cfg, targets) -> tuple[str, ...]:
    """["q", "v"] or ["all"] -> the validated short names (ValueError naming the valid ones)."""
    if list(targets) == ["all"]:
        return present(cfg)
    wrong = [t for t in targets if t not in present(cfg)]
    if wrong or not targets:
        raise ValueError(f"unknown target(s) {wrong or '(none given)'} for a {cfg.flavor} model; "
                         f"valid targets are: {', '.join(present(cfg))} (or 'all')")
    return tuple(targets)


def shape(cfg, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a target in a model of this config."""
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    return {"q": (d, cfg.n_head * hd), "k": (d, cfg.n_kv_head * hd), "v": (d, cfg.n_kv_head * hd),
            "o": (cfg.n_head * hd, d), "up": (d, f), "gate": (d, f), "down": (f, d)}[target]


def find(model, targets) -> list[tuple[object, str]]:
    """[(parent module, attribute name)] of every targeted linear layer in every block."""
    found = []
    for block in model.blocks:
        for t in validate(model.cfg, targets):
            parent_name, attr = TARGETS[t].split(".")
            found.append((getattr(block, parent_name), attr))
    return found

"""Which linear layers a method adapts: short target names, the same in every flavour.

    q k v o     blocks[i].attn.{q,k,v,o}        the attention projections
    up down     blocks[i].mlp.{up,down}          the feed-forward layers
    gate        blocks[i].mlp.gate               the gate of a gated MLP (SwiGLU, GeGLU: cfg.gated)

`targets` is a list of these names, or ["all"] for every one the model has. peft's names work too: a layer's
transformers module name (HF_MODULES), or any dotted end of it, stands for every target whose module ends with
it, as peft matches `target_modules`: GPT-2's "c_attn" is q, k and v, its "c_proj" o and down, "attn.c_proj"
only o.
"""
import difflib
from functools import cache

TARGETS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o",
           "up": "mlp.up", "gate": "mlp.gate", "down": "mlp.down"}

_LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_BERT = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
         "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"}
HF_MODULES = {  # family -> target -> the transformers module holding it, inside one layer (fused ones repeat)
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"), _LLAMA),
    "phi3": {**_LLAMA, "q": "self_attn.qkv_proj", "k": "self_attn.qkv_proj", "v": "self_attn.qkv_proj",
             "gate": "mlp.gate_up_proj", "up": "mlp.gate_up_proj"},
    "gpt2": {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj",
             "up": "mlp.c_fc", "down": "mlp.c_proj"},
    "bert": _BERT, "roberta": _BERT,
    "distilbert": {"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin",
                   "o": "attention.out_lin", "up": "ffn.lin1", "down": "ffn.lin2"},
}


def present(cfg) -> tuple[str, ...]:
    """The targets a model of this config has."""
    return tuple(t for t in TARGETS if t != "gate" or cfg.gated)


def validate(cfg, targets) -> tuple[str, ...]:
    """["q", "v"], peft's ["q_proj", "v_proj"] or ["all"] -> the short names (ValueError naming the valid ones)."""
    if list(targets) == ["all"]:
        return present(cfg)
    aliases = peft_names(cfg.flavor)
    found, wrong = [], []
    for target in targets:
        if target in present(cfg):
            found.append(target)
        elif target in aliases:
            found += [t for t in aliases[target] if t in present(cfg)]
        else:
            wrong.append(target)
    if wrong or not targets:
        close = difflib.get_close_matches(wrong[0], [*present(cfg), *aliases], n=1) if wrong else []
        peft = ", ".join(name for name in aliases if "." not in name)
        raise ValueError(f"unknown target(s) {wrong or '(none given)'} for a {cfg.flavor} model"
                         f"{f' (did you mean {close[0]!r}?)' if close else ''}; valid targets are: "
                         f"{', '.join(present(cfg))} (or 'all', or peft's names: {peft})")
    return tuple(dict.fromkeys(found))  # once each, in the order given


@cache
def peft_names(flavor: str) -> dict[str, tuple[str, ...]]:
    """peft's names for a family's layers (every dotted end of each target's module name) -> our targets."""
    names = {}
    for target, module in HF_MODULES[flavor].items():
        parts = module.split(".")  # "self_attn.q_proj" -> ["self_attn", "q_proj"]
        for start in range(len(parts)):
            names.setdefault(".".join(parts[start:]), []).append(target)
    return {name: tuple(dict.fromkeys(found)) for name, found in names.items()}


def shape(cfg, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a target in a model of this config."""
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    return {"q": (d, cfg.n_head * hd), "k": (d, cfg.n_kv_head * hd), "v": (d, cfg.n_kv_head * hd),
            "o": (cfg.n_head * hd, d), "up": (d, f), "gate": (d, f), "down": (f, d)}[target]


def find(model, targets) -> list[tuple[object, str]]:
    """[(parent module, attribute name)] of every targeted linear layer in every block."""
    names = [TARGETS[t].split(".") for t in validate(model.cfg, targets)]  # [("attn", "q"), ...]
    return [(getattr(block, parent), attr) for block in model.blocks for parent, attr in names]


def wrap(model, targets, make) -> None:
    """setattr(parent, name, make(layer)) for every targeted linear layer of every block."""
    for parent, attr in find(model, targets):
        setattr(parent, attr, make(getattr(parent, attr)))

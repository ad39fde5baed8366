"""Putting a checkpoint's tensors into a Transformer, for HF folders (pretrained.py) and GGUF files
(gguf_model.py) alike: the model is built as shapes only (`build_model`, inside `weights_to_come`), their
names become ours by rules, every key and shape is checked, and the tensors become the parameters
(`load_weights`).

A rule is (their name, our name or names, transform). Names are templates: {i} is a layer number and {p}
is "weight" or "bias". A transform gets (tensor, cfg) and returns one tensor per our name.
"""
import contextlib
import re
from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn as nn

from minipeft.core.model import ModelConfig, Transformer

Transform = Callable[[torch.Tensor, ModelConfig], torch.Tensor | tuple[torch.Tensor, ...]]
Rule = tuple[str, str | tuple[str, ...], Transform | None]


def template_regex(template: str) -> re.Pattern:
    """"h.{i}.ln_1.{p}" -> a regex matching "h.3.ln_1.weight" with groups i="3", p="weight"."""
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern)


def our_names(template: str | tuple[str, ...]) -> tuple[str, ...]:
    return (template,) if isinstance(template, str) else template


def _rename(theirs: Mapping[str, torch.Tensor], rules: list[Rule], ignored: list[str], prefix: str,
            cfg: ModelConfig):
    """Their state dict -> (ours: our name -> fp32 tensor, origin: our name -> their key, unknown:
    their keys that no rule claims). Rules and `ignored` match keys with `prefix` removed; a key a rule claims
    is read even if `ignored` matches it (BERT's pooler, ignored unless a classifier's rules read it)."""
    compiled = [(template_regex(their), our_names(ours), transform) for their, ours, transform in rules]
    ours, origin, unknown = {}, {}, []
    for key, tensor in theirs.items():
        short_key = key.removeprefix(prefix)
        for regex, our_templates, transform in compiled:
            if match := regex.fullmatch(short_key):
                values = transform(tensor, cfg) if transform else tensor
                values = values if isinstance(values, tuple) else (values,)
                for template, value in zip(our_templates, values):
                    name = template.format(**match.groupdict())
                    ours[name], origin[name] = value.float(), key
                break
        else:
            if not any(re.fullmatch(pattern, short_key) for pattern in ignored):
                unknown.append(key)
    return ours, origin, unknown


def their_name(our_name: str, rules: list[Rule]) -> str:
    """The checkpoint key a rule would have turned into `our_name` (for messages about missing keys)."""
    for their, ours, _ in rules:
        for template in our_names(ours):
            if match := template_regex(template).fullmatch(our_name):
                return their.format(**match.groupdict())
    return our_name


def load_weights(model: Transformer, theirs: dict[str, torch.Tensor], rules: list[Rule],
                  ignored: list[str], source: str, prefix: str = "") -> None:
    """Rename `theirs` into our names, check every key and shape, and copy the tensors into `model`.
    Messages name keys as the checkpoint spells them; a missing key without `prefix`."""
    cfg = model.cfg
    ours, origin, unknown = _rename(theirs, rules, ignored, prefix, cfg)
    score = {p: ours.pop(f"score.{p}") for p in ("weight", "bias") if f"score.{p}" in ours}  # a classifier's head
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.n_classes or cfg.tie_embeddings:  # a classifier, or tok_emb itself: no LM head to load
        for name in ("head.weight", "head.bias"):
            expected.pop(name, None)
            if ours.pop(name, None) is not None:
                origin.pop(name)
    unknown += sorted({origin[name] for name in ours.keys() - expected.keys()})  # e.g. a layer too many
    if unknown:
        raise ValueError(f"{source}: unknown key(s) in the checkpoint: {', '.join(unknown)}")
    missing = sorted({their_name(name, rules) for name in expected.keys() - ours.keys()})
    if missing:
        raise ValueError(f"{source}: key(s) missing from the checkpoint: {', '.join(missing)}")
    head_shapes = {"weight": (cfg.n_classes, cfg.d_model), "bias": (cfg.n_classes,)}
    wrong = [f"{origin[name]} gives {tuple(ours[name].shape)} for {name}, which needs {shape}"
             for name, shape in expected.items() if tuple(ours[name].shape) != shape]
    wrong += [f"{origin['score.' + p]} gives {tuple(t.shape)} for head.{p}, which needs {head_shapes[p]}"
              for p, t in score.items() if tuple(t.shape) != head_shapes[p]]
    if wrong:
        raise ValueError(f"{source}: shape mismatch (does config.json describe these weights?): "
                         + "; ".join(wrong))
    model.load_state_dict(ours, strict=False, assign=True)  # the loaded tensors become the parameters
    _finish(model, score)


def _finish(model: Transformer, score: dict[str, torch.Tensor]) -> None:
    """What a model built as shapes only still needs once its weights are in: its RoPE tables, the
    tie of a tied head, and a classifier head (the checkpoint's, `score`, if it has one, else a fresh one)."""
    cfg = model.cfg
    model.reset_buffers()
    if cfg.n_classes:
        model.add_classifier(cfg.n_classes)
        if score:  # a …ForSequenceClassification's classifier (pretrained.py checked its rows are n_classes)
            with torch.no_grad():
                model.head.weight.copy_(score["weight"])
                model.head.bias.copy_(score.get("bias", torch.zeros(cfg.n_classes)))  # a decoder's has no bias
    elif cfg.tie_embeddings:
        model.head.weight = model.tok_emb.weight


def build_model(checkpoint_config: dict, overrides: dict, source: str) -> Transformer:
    """The model as shapes only (weights_to_come): load_weights puts the loaded tensors in, _finish the rest."""
    cfg = ModelConfig(**{**checkpoint_config, **overrides, "extra": {"source": source}})
    with weights_to_come():
        return Transformer(cfg)


@contextlib.contextmanager
def weights_to_come():
    """Inside, a Transformer is built as shapes only, for weights that come next: on the meta device (no
    memory), with nothing computed for it: the random init (nn.init.normal_) and the RoPE tables
    (Transformer.reset_buffers) are skipped, since a meta tensor holds no values and arithmetic on one
    imports about 75 MiB of torch's compiler stack (torch._dynamo, sympy). reset_buffers() makes the tables
    once weights are in."""
    with torch.device("meta"), _replaced(nn.init, "normal_", lambda tensor, *args, **kwargs: tensor), \
            _replaced(Transformer, "reset_buffers", lambda self: None):
        yield


@contextlib.contextmanager
def _replaced(owner, name: str, stand_in):
    """owner.name is stand_in inside the `with`, and its own value again after it, also after an exception."""
    original = getattr(owner, name)
    setattr(owner, name, stand_in)
    try:
        yield
    finally:
        setattr(owner, name, original)

"""Adapters in peft's own format (https://github.com/huggingface/peft), both ways: an adapter trained
here runs under transformers + peft, and one trained there loads here.

    mp.save_adapter(model, path, format="peft")   # -> adapter_config.json + adapter_model.safetensors
    mp.load_adapter(model, path)                  # recognizes the folder by "peft_type" in its config

The layout. A peft adapter is a folder with two files: `adapter_config.json` (the method's config:
`peft_type`, `task_type`, `base_model_name_or_path`, and the method's own fields) and
`adapter_model.safetensors` (the trained tensors). This file does what every method shares: the two
files, which of our methods a `peft_type` is, the checks against the base model, the classifier, and
the names of the transformers modules. What a method's own tensors and fields mean is said in this
folder's file of the method's name: lora.py (LORA), dora.py (LORA with use_dora), ia3.py (IA3),
vera.py (VERA), loha.py (LOHA), lokr.py (LOKR), prompt.py (PROMPT_TUNING), prefix.py (PREFIX_TUNING),
each ending with its HOOK; per_module.py holds what the methods with tensors on each module share.

A method's peft hook. A method that peft has too registers a hook for it here, by the method's name
(the method itself, in minipeft/core/ or a user's file, knows nothing of peft):

    peft_format.register("my_method", MyMethodInPeft())

and the hook has

    hook.peft_type                                  peft's name for the method, e.g. "LORA"
    hook.to_peft(model, layout)                     -> (tensors by peft's keys, the method's config fields)
    hook.from_peft(model, config, tensors, layout)  -> (options for mp.apply, values by our parameter
                                                       names); `tensors` holds no classifier any more
    hook.check_config(config, path)                 optional: refuse a config (ValueError) before its
                                                       tensors are read
    hook.accepts(config)                            optional: whether this hook takes a config of its
                                                       peft_type (lora and dora share LORA)
    hook.root                                       optional: peft's prefix of the classifier's key, ROOT
                                                       unless the method is prompt learning (PROMPT_ROOT)
    hook.method_for(model, method, options)         optional: (the method to apply, its options) when the
                                                       base decides it (a LoRA on a 4-bit base is qlora)

Both directions raise ValueError, naming what differs, for what they cannot map exactly. `layout` is a
PeftLayout: the adapter's folder (for messages) and how transformers and peft name this model's layers.

Module names. The tensors of a layer are keyed

    base_model.model.<body><module>.<the method's own name, e.g. lora_A.weight>

<body> is the body prefix of the transformers class we match (`transformer.`, `model.`, or none for the
bare encoders BertModel, RobertaModel, DistilBertModel; loading accepts it with or without), and <module>
the transformers module that holds our layer, read from pretrained.py's rename rules
(pretrained.hf_module_names), so a model family writes its names once. peft's `target_modules` lists a
module by its shortest dotted suffix within the layer that no other module ends with (peft matches a
name or a ".name" suffix), or by its full path when none is unique. That gives:

    gpt2   GPT2LMHeadModel / GPT2ForSequenceClassification    transformer.h.i.
             attn.c_attn (q, k, v fused): c_attn   attn.c_proj (o): attn.c_proj
             mlp.c_fc (up): c_fc   mlp.c_proj (down): mlp.c_proj
    bert   BertModel (hidden states)                          encoder.layer.i.
    roberta  RobertaModel: the same names
             attention.self.{query,key,value}: query, key, value
             attention.output.dense (o): attention.output.dense   intermediate.dense (up): intermediate.dense
             output.dense (down): encoder.layer.i.output.dense, since "attention.output.dense" ends
             "output.dense" too
    distilbert  DistilBertModel                               transformer.layer.i.
             attention.{q,k,v,out}_lin: {q,k,v,out}_lin   ffn.lin1 (up), ffn.lin2 (down): lin1, lin2
    llama  LlamaForCausalLM / LlamaForSequenceClassification  model.layers.i.
    (mistral, qwen2, qwen3, gemma, gemma2, gemma3: <Family>ForCausalLM / ...ForSequenceClassification,
    Gemma3ForCausalLM / Gemma3TextForSequenceClassification: the same names)
             self_attn.{q,k,v,o}_proj: {q,k,v,o}_proj   mlp.{gate,up,down}_proj: {gate,up,down}_proj
    phi3   Phi3ForCausalLM / Phi3ForSequenceClassification    model.layers.i.
             self_attn.qkv_proj (q, k, v fused): qkv_proj   self_attn.o_proj: o_proj
             mlp.gate_up_proj (gate, up fused): gate_up_proj   mlp.down_proj: down_proj

When several of our layers live in one transformers module (GPT-2's c_attn and Phi-3's qkv_proj hold
q, k and v; Phi-3's gate_up_proj holds gate and up), it is a fused module: `layout.fused` names them in
row order, and a method's hook says how it writes them.

The classifier (peft's modules_to_save):

    base_model.model.score.weight  (n_classes, d)   -> head.weight, head.bias = 0
    base_model.score.weight        the same under prompt and prefix tuning, whose PeftModel holds the
                                   transformers model itself (not a tuner model wrapping it)

Decoder classifiers match (*ForSequenceClassification reads the last real token as we do), but their
`score` has no bias: ours exports only while its bias is zero (e.g. a head that came from peft). With
prompt tuning, peft hands the classifier embeddings, in which transformers cannot see padding, so it
reads the last position, padding or not: refused (prompt.py).

Exact, and tested against transformers + peft: LoRA on all three original families and on phi3 (fused),
qwen2, gemma3, roberta and distilbert, prefix tuning on gpt2, bert, llama and gemma3, prompt tuning on
gpt2, llama and gemma3; DoRA, IA³, VeRA, LoHa and LoKr on gpt2, bert and llama (tests/test_peft_methods.py).
Refused, with a ValueError saying why:
- an encoder classifier: BertForSequenceClassification reads [CLS] through the pretrained pooler
  (dense + tanh), RoBERTa's and DistilBERT's classifiers have two layers; ours is one.
- methods minipeft does not have (AdaLoRA, BOFT, ...) and methods without a peft hook.
- what a method's hook refuses (prompt tuning on the encoders or with a classifier, see prompt.py; prefix
  tuning on distilbert, prefix.py).
peft keeps no fingerprint of the base weights, so the base check is what the files allow: the
architecture (module names), every shape, the config's layer/head counts, and, when
`base_model_name_or_path` is a local folder, its config.json against this model.
"""
import importlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from minipeft.core import targets as linear_targets
from minipeft.core.registry import apply
from minipeft.formats import pretrained, weights
from minipeft.formats.assets import asset_path
from minipeft.formats.atomic import atomic_write

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"  # older peft default; a pickle, which we never read
ROOT = "base_model.model."  # peft's prefix of every layer's key and (but under prompt learning) modules_to_save's
PROMPT_ROOT = "base_model."  # the prefix of modules_to_save keys under prompt learning (hook.root)

# the transformers class an exported adapter is for: (family, has a classifier) -> (class, peft task_type).
# Our encoder LM head is the bare tied embedding, not BertForMaskedLM's, so an encoder adapter is for the
# bare body (BertModel, ...; its hidden states equal our encode()), whose modules have no prefix.
_DECODER_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi3",
                    "gemma": "Gemma", "gemma2": "Gemma2", "gemma3": "Gemma3"}
TRANSFORMERS_MODELS = {
    ("gpt2", False): ("GPT2LMHeadModel", "CAUSAL_LM"),
    ("gpt2", True): ("GPT2ForSequenceClassification", "SEQ_CLS"),
    ("bert", False): ("BertModel", "FEATURE_EXTRACTION"),
    ("roberta", False): ("RobertaModel", "FEATURE_EXTRACTION"),
    ("distilbert", False): ("DistilBertModel", "FEATURE_EXTRACTION"),
    **{(family, False): (f"{name}ForCausalLM", "CAUSAL_LM") for family, name in _DECODER_CLASSES.items()},
    **{(family, True): (f"{name}{'Text' if family == 'gemma3' else ''}ForSequenceClassification", "SEQ_CLS")
       for family, name in _DECODER_CLASSES.items()},
}
BARE_BODY_TASK = "FEATURE_EXTRACTION"  # peft's task type of an adapter for the bare body (no prefix)


HOOKS: dict[str, object] = {}  # our method's name -> its peft hook (hooks() puts the built-in ones first)
BUILT_IN = {"lora": "lora", "dora": "dora", "prefix": "prefix", "prompt": "prompt", "ia3": "ia3", "vera": "vera",
            "loha": "loha", "lokr": "lokr",
            "qlora": "lora"}  # method -> this folder's file holding its HOOK (a QLoRA adapter is peft's LoRA)


def hooks() -> dict[str, object]:
    """HOOKS, with the built-in hooks in it: on the first call, the HOOK of each built-in method's file."""
    if not all(name in HOOKS for name in BUILT_IN):
        for name, file in BUILT_IN.items():
            HOOKS.setdefault(name, importlib.import_module(f"{__name__}.{file}").HOOK)
    return HOOKS


def register(method: str, hook, replace: bool = False):
    """Make adapters of `method` (a registered method's name) exchangeable with peft through `hook` (see
    the module docstring for what it has). A name that has a hook already needs replace=True."""
    hooks()
    missing = [name for name in ("peft_type", "to_peft", "from_peft") if not hasattr(hook, name)]
    if missing:
        raise ValueError(f"the peft hook of {method!r} lacks {', '.join(missing)}; give it peft_type, "
                         "to_peft(model, layout) and from_peft(model, config, tensors, layout)")
    if method in HOOKS and not replace:
        raise ValueError(f"method {method!r} has a peft hook already; pass replace=True to swap it")
    HOOKS[method] = hook
    return hook


# ---------------------------------------------------------------------------------------------
# module names, from pretrained.py's rename rules


def peft_name(module: str, modules) -> str:
    """peft's target_modules name for the transformers `module` ("h.{i}.attn.c_proj" -> "attn.c_proj"):
    its shortest dotted suffix within the layer that none of the other `modules` ends with, else the
    whole path ("encoder.layer.{i}.output.dense", since "attention.output.dense" ends "output.dense")."""
    parts = module.split("{i}.", 1)[-1].split(".")
    others = [m for m in modules if m != module]
    for n in range(1, len(parts) + 1):
        suffix = ".".join(parts[-n:])
        if not any(m == suffix or m.endswith("." + suffix) for m in others):
            return suffix
    return module


def layer_modules(flavor: str) -> dict[str, tuple[str, str]]:
    """Our target -> (the transformers module holding it, under the body prefix; peft's name for that
    module), for every linear-layer target the flavour has, in the rename rules' order."""
    ours_to_theirs = pretrained.hf_module_names(flavor)
    targets = {f"blocks.{{i}}.{path}": t for t, path in linear_targets.TARGETS.items()}
    return {targets[ours]: (theirs, peft_name(theirs, set(ours_to_theirs.values())))
            for ours, theirs in ours_to_theirs.items() if ours in targets}


MODULES = {flavor: layer_modules(flavor) for flavor in pretrained.HF_RULES}


class PeftLayout:
    """What a method's peft hook is handed (see the module docstring): where the adapter is, for its
    messages, and how transformers and peft name this model's layers and describe its prompt tables."""

    root = ROOT

    def __init__(self, cfg, path: Path, body: str = ""):
        self.cfg, self.path, self.body = cfg, path, body
        self.modules = MODULES[cfg.flavor]  # our target -> (transformers module, peft's name for it)

    def key(self, target: str, layer: int, name: str) -> str:
        """The key of tensor `name` of the module holding `target`: base_model.model.<body><module>.<name>."""
        return f"{ROOT}{self.body}{self.modules[target][0].format(i=layer)}.{name}"

    def peft_name(self, target: str, layer: int) -> str:
        """peft's name (target_modules, rank_pattern, ...) of the module holding `target` in `layer`."""
        return self.modules[target][1].format(i=layer)

    def fused(self, target: str) -> tuple[str, ...]:
        """The targets in `target`'s transformers module, in row order: ("q", "k", "v") for gpt2's
        c_attn, ("o",) for a module of its own."""
        module = self.modules[target][0]
        return tuple(t for t, (theirs, _) in self.modules.items() if theirs == module)

    def locate(self, module: str) -> tuple[int, tuple[str, ...]]:
        """A module named in a peft file (ROOT stripped) -> (layer, the targets it holds, as `fused`)."""
        cfg, path = self.cfg, self.path
        others = []  # families whose modules are named so, when this one's are not
        for flavor in (cfg.flavor, *(f for f in MODULES if f != cfg.flavor)):
            body = re.escape(pretrained.HF_PREFIXES[flavor])
            for target, (template, _) in MODULES[flavor].items():
                module_pattern = weights.template_regex(template).pattern  # {i}: group "i"
                if match := re.fullmatch(f"(?:{body})?{module_pattern}", module):
                    if flavor != cfg.flavor:
                        others.append(flavor)
                        break
                    if int(match["i"]) >= cfg.n_layer:
                        raise ValueError(f"adapter {path} adapts {module}, but this model has {cfg.n_layer} "
                                         "layers; load the base model it was trained on")
                    return int(match["i"]), self.fused(target)
        if others:
            raise ValueError(f"adapter {path} is for a {' or '.join(others)} model (it adapts {module}), this "
                             f"model is a {cfg.flavor}; load the base model it was trained on")
        mapped = dict.fromkeys(theirs for theirs, _ in self.modules.values())
        raise ValueError(f"adapter {path} adapts {module}, which minipeft does not map (it maps the attention "
                         f"and MLP linear layers of every block: {', '.join(mapped)})")

    @staticmethod
    def pattern_value(patterns: dict, module: str, default):
        """peft's rank_pattern / alpha_pattern lookup: the value of the first key (a regex) that matches a
        dotted suffix of `module`, else `default`."""
        for key, value in patterns.items():
            if re.fullmatch(rf"(.*\.)?({key})", module):
                return value
        return default

    def prompt_fields(self, token_dim: int, n_heads: int) -> dict:
        """How the config of peft's prompt-learning methods (prompt, prefix tuning) describes the model."""
        return {"num_layers": self.cfg.n_layer, "num_transformer_submodules": 1,
                "token_dim": token_dim, "num_attention_heads": n_heads}

    def prompt_table(self, tensors: dict) -> torch.Tensor:
        """The one table peft's prompt-learning methods store, `prompt_embeddings`, as fp32."""
        table = tensors.pop("prompt_embeddings", None)
        if table is None or tensors:
            raise ValueError(f"adapter {self.path} should hold prompt_embeddings (and at most a classifier); "
                             f"it has {sorted(tensors) if table is not None else 'no prompt_embeddings'}")
        return table.float()

    def check_prompt_table(self, config: dict, table: torch.Tensor, shape: tuple, fields: dict) -> None:
        """The config's `fields` (prompt_fields) and the table's shape must be this model's."""
        differ = [f"{key} {config[key]} there, {value} here" for key, value in fields.items()
                  if config.get(key) is not None and config[key] != value]
        if differ or tuple(table.shape) != shape:
            differ.append(f"prompt_embeddings {tuple(table.shape)} there, {shape} here")
            raise ValueError(f"adapter {self.path} was trained on another base model: {'; '.join(differ)}; "
                             "load the base model it was trained on")


# ---------------------------------------------------------------------------------------------
# export


@torch.no_grad()
def save(model, path: Path) -> Path:
    """Write `model`'s adapter as peft lays it out for the matching transformers model (see the module
    docstring), each file atomically."""
    tensors, config = to_peft(model, path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
    atomic_write(path / PEFT_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(path / PEFT_CONFIG,
                 lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return path


def to_peft(model, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """What `save` writes: (the tensors by peft's keys, adapter_config.json's fields). The tensors are
    functions of the model's parameters, differentiable outside no_grad (the tests carry peft's gradients
    back through them, the chain rule checking ours); `path` only names the adapter in messages."""
    cfg, method = model.cfg, model.peft_config["method"]
    hook = hooks().get(method)
    if hook is None:
        raise ValueError(f"format='peft' writes {', '.join(HOOKS)} adapters, not {method!r}; "
                         "save this one with the default format='minipeft'")
    tensors, modules_to_save = _classifier_to_peft(model, getattr(hook, "root", ROOT))
    _, task_type = TRANSFORMERS_MODELS[(cfg.flavor, bool(cfg.n_classes))]
    body = "" if task_type == BARE_BODY_TASK else pretrained.HF_PREFIXES[cfg.flavor]
    config = {"peft_type": hook.peft_type, "task_type": task_type, "inference_mode": True,
              "base_model_name_or_path": _base_name(cfg), "revision": cfg.extra.get("revision"),  # a hub id's commit
              "modules_to_save": modules_to_save}
    method_tensors, method_config = hook.to_peft(model, PeftLayout(cfg, path, body))
    tensors.update(method_tensors)
    config.update(method_config)
    return tensors, config


def _base_name(cfg) -> str | None:
    """base_model_name_or_path: the HF folder the model came from (so transformers can load it),
    else its source as we named it (a hub id, tiny-gpt2, a .gguf path), else None."""
    source = cfg.extra.get("source")
    if source is None:
        return None
    local = asset_path(source) if source in pretrained.ASSET_MODELS else Path(source)
    return str(local.resolve()) if local.exists() else source


def _classifier_to_peft(model, root: str) -> tuple[dict, list | None]:
    cfg = model.cfg
    if not cfg.n_classes:
        return {}, None
    if not cfg.causal:
        raise ValueError(f"a {cfg.flavor} classifier cannot be exported to peft exactly: BertForSequenceClassification "
                         "reads [CLS] through the pretrained pooler (dense + tanh), RoBERTa's and DistilBERT's "
                         "classifiers have two layers, and minipeft's encoder head is one linear layer; export the "
                         "adapter of a model without n_classes instead")
    if model.head.bias is not None and model.head.bias.detach().abs().max() > 0:
        cls_name = TRANSFORMERS_MODELS[(cfg.flavor, True)][0]
        raise ValueError(f"{cls_name}'s score layer has no bias, but this classifier head's bias is "
                         "non-zero, so transformers would compute other logits; export the adapter of a "
                         "model without n_classes instead")
    return {root + "score.weight": model.head.weight}, ["score"]


# ---------------------------------------------------------------------------------------------
# import


def _peft_types() -> dict[str, list[str]]:
    """peft_type -> our methods with a hook for it (LORA: lora and dora, told apart by `hook.accepts`)."""
    types = {}
    for name, hook in hooks().items():
        types.setdefault(hook.peft_type, []).append(name)
    return types


def read_config(path) -> dict:
    """A peft adapter folder's config, checked to be one we load, summarized the way adapter_io.py's own
    configs are read: {"format": "peft", "method", "base": {"source", "config": {"n_classes"}}, "peft"}."""
    path = Path(path)
    try:
        raw = json.loads((path / PEFT_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / PEFT_CONFIG} is corrupt ({e}); save the adapter again") from None
    kind, ours = raw["peft_type"], _peft_types()
    if kind not in ours:
        raise ValueError(f"adapter {path} is a peft {kind} adapter, a method minipeft does not have; "
                         f"minipeft loads {', '.join(ours)}")
    method = next((m for m in ours[kind] if getattr(HOOKS[m], "accepts", lambda _: True)(raw)), ours[kind][0])
    hook = HOOKS[method]
    _check_field_types(raw, path)
    if hasattr(hook, "check_config"):
        hook.check_config(raw, path)
    if not (path / PEFT_WEIGHTS).exists():
        pickle_hint = f" ({PEFT_PICKLE} is a pickle, which minipeft never reads: re-save it with peft's " \
                      "save_pretrained(..., safe_serialization=True))" if (path / PEFT_PICKLE).exists() else ""
        raise FileNotFoundError(f"{path} has no {PEFT_WEIGHTS}{pickle_hint}")
    head = _tensor_shapes(path).get(getattr(hook, "root", ROOT) + "score.weight")
    return {"format": "peft", "method": method,
            "base": {"source": raw.get("base_model_name_or_path"),
                     "config": {"n_classes": head[0] if head else None}},
            "peft": raw}


# the config fields the hooks read as numbers, flags or tables, and the JSON types peft writes them as
FIELD_TYPES = {**dict.fromkeys(("r", "num_virtual_tokens", "projection_prng_key", "decompose_factor"), int),
               **dict.fromkeys(("lora_alpha", "alpha", "lora_dropout", "vera_dropout", "d_initial"), (int, float)),
               **dict.fromkeys(("use_rslora", "use_dora", "decompose_both"), bool),
               **dict.fromkeys(("rank_pattern", "alpha_pattern"), dict)}
JSON_NAMES = {int: "an integer", (int, float): "a number", bool: "true or false", dict: "an object of numbers"}


def _check_field_types(raw: dict, path: Path) -> None:
    """A field of FIELD_TYPES holding another JSON type (a string "8", a list of patterns) is refused here,
    not met later as a TypeError or as a truthy string; a pattern's values are numbers."""
    def fits(value, types) -> bool:  # JSON's true is no number, and 1 is no flag
        return isinstance(value, types) and isinstance(value, bool) == (types is bool)
    for field, types in FIELD_TYPES.items():
        value = raw.get(field)
        if value is not None and not (fits(value, types) and (types is not dict or all(
                fits(v, (int, float)) for v in value.values()))):
            raise ValueError(f"{path / PEFT_CONFIG} is corrupt: {field} is {value!r}, where peft writes "
                             f"{JSON_NAMES[types]}; save the adapter again")


def _tensor_shapes(path: Path) -> dict[str, tuple]:
    try:
        with safe_open(str(path / PEFT_WEIGHTS), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path / PEFT_WEIGHTS} is corrupt or truncated ({e}); save it again") from None


def load(model, path):
    """Apply the peft adapter in folder `path` to the fresh base `model`, mapping peft's names and
    layouts onto ours (see the module docstring). Everything is checked before the model changes."""
    path = Path(path)
    config = read_config(path)
    raw = config["peft"]
    if model.peft_config:
        raise ValueError(f"this model already has method {model.peft_config['method']!r}; "
                         "load a peft adapter into a fresh base model")
    _check_base(model, raw, path)
    tensors = load_file(str(path / PEFT_WEIGHTS))
    hook = hooks()[config["method"]]
    head = _classifier_from_peft(model, tensors, path, getattr(hook, "root", ROOT))
    options, weights = hook.from_peft(model, raw, tensors, PeftLayout(model.cfg, path))
    method = config["method"]
    if hasattr(hook, "method_for"):
        method, options = hook.method_for(model, method, options)
    apply(model, method, **options)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
        if head is not None:
            model.head.weight.copy_(head)
            model.head.bias.zero_()
    return model


def _check_base(model, raw: dict, path: Path):
    """When the adapter names a local HF folder as its base, compare its config.json with this model."""
    cfg, name = model.cfg, raw.get("base_model_name_or_path")
    folder = Path(name) if name else None
    if folder is None or not (folder / "config.json").is_file():
        return
    family, expected = pretrained.read_hf_config(folder)
    if family != cfg.flavor:
        raise ValueError(f"adapter {path} was trained on a {family} model ({folder}), this model is a "
                         f"{cfg.flavor}; load the base model it was trained on")
    differ = [f"{key} {expected[key]} there, {getattr(cfg, key)} here"
              for key in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff")
              if expected.get(key) is not None and expected[key] != getattr(cfg, key)]
    if differ:
        raise ValueError(f"adapter {path} was trained on another base model ({folder}): "
                         f"{'; '.join(differ)}; load the base model it was trained on")


def _classifier_from_peft(model, tensors: dict, path: Path, root: str) -> torch.Tensor | None:
    """Pop the modules_to_save classifier (keyed under `root`, the hook's) from `tensors` and check it fits
    the model's head."""
    n_classes = model.cfg.n_classes
    if any(k.startswith((root + "classifier.", root + "pre_classifier.")) for k in tensors):
        raise ValueError(f"adapter {path} carries an encoder's classifier (BertForSequenceClassification reads [CLS] "
                         "through the pretrained pooler, dense + tanh; RoBERTa's and DistilBERT's have two "
                         "layers), which minipeft's one-layer head is not; it cannot be loaded exactly")
    head = tensors.pop(root + "score.weight", None)
    if head is None and n_classes:
        raise ValueError(f"adapter {path} has no classifier head, but this model has one; "
                         "load the base model without n_classes")
    if head is not None and head.shape != (n_classes or 0, model.cfg.d_model):
        raise ValueError(f"adapter {path} has a classifier head (score) of shape {tuple(head.shape)}; load the "
                         f"base model with n_classes={head.shape[0]} (it has n_classes={n_classes}, "
                         f"d_model={model.cfg.d_model})")
    return head

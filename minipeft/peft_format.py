"""Adapters in peft's own format (https://github.com/huggingface/peft), both ways: an adapter trained
here runs under transformers + peft, and one trained there loads here.

    mp.save_adapter(model, path, format="peft")   # -> adapter_config.json + adapter_model.safetensors
    mp.load_adapter(model, path)                  # recognizes the folder by "peft_type" in its config

The layout. A peft adapter is a folder with two files: `adapter_config.json` (the method's config:
`peft_type`, `task_type`, `base_model_name_or_path`, and the method's own fields) and
`adapter_model.safetensors` (the trained tensors). Tensor keys, shapes, and what they mean here:

    LORA            base_model.model.<module>.lora_A.weight  (r, in)      -> blocks.i.<target>.lora_A
                    base_model.model.<module>.lora_B.weight  (out, r)     -> blocks.i.<target>.lora_B
                    update (lora_alpha / r) · B A, or lora_alpha / √r with use_rslora; per-module r and
                    alpha in rank_pattern / alpha_pattern (keys match a module name's dotted suffix)
    PROMPT_TUNING   prompt_embeddings  (P, d)                             -> prompt.embedding
    PREFIX_TUNING   prompt_embeddings  (P, L·2·d_kv)                      -> prefix_tuning.prefix
                    each row is one virtual token, ordered (layer, key/value, head, head_dim): the same
                    order as our `prefix` table, so it copies as it is. peft stores the prefixes only,
                    never its reparameterization MLP (prefix_projection): we export folded prefixes
                    (as prefix.fold computes them) with prefix_projection false.
    modules_to_save base_model.model.score.weight  (n_classes, d)         -> head.weight, head.bias = 0

<module> is the transformers module the update belongs to, under the body prefix of the model class
we match (`transformer.`, `model.`, or none for BertModel; loading accepts it with or without):

    gpt2   GPT2LMHeadModel / GPT2ForSequenceClassification    transformer.h.i.
             attn.c_attn (q, k, v fused)   attn.c_proj (o)   mlp.c_fc (up)   mlp.c_proj (down)
    bert   BertModel (hidden states)                          encoder.layer.i.
             attention.self.{query,key,value}   attention.output.dense (o)
             intermediate.dense (up)   output.dense (down)
    llama  LlamaForCausalLM / LlamaForSequenceClassification  model.layers.i.
             self_attn.{q,k,v,o}_proj   mlp.{gate,up,down}_proj

GPT-2's fused c_attn. minipeft can adapt q and v alone; peft can only adapt the whole c_attn, whose
output rows are [q | k | v] (d each). With n of the three adapted (rank r, scale α/r each), the update
of c_attn is written exactly as one LoRA of rank n·r:

    ΔW_c_attn = (α/r) [B_q A_q ; B_k A_k ; B_v A_v]  =  (α'/r') B' A'          (absent targets: 0)

        A' = [A_q ; A_v]            (2r × d)       stacked in q, k, v order (here n = 2: q and v)
        B' = [ B_q   0  ]           (3d × 2r)      block-structured: the rows of k are zero
             [  0    0  ]
             [  0   B_v ]
        r' = n·r,  α' = n·α,  so  α'/r' = α/r

We write r' and α' as `r` and `lora_alpha` when every exported module has that rank (only q/k/v
adapted), so any reader of the format gets the scale right; when other modules are adapted too, they
keep `r`, `lora_alpha` and c_attn gets `rank_pattern` / `alpha_pattern` {"c_attn": n·r} / {"c_attn": n·α}.

Loading a c_attn LoRA splits it back. With B' cut into its row blocks B'_q, B'_k, B'_v, each target
gets ΔW_t = (α'/r') B'_t A', which is exact in every case. If the columns that the non-zero blocks use
are disjoint (as in our own export), target t only needs its columns C_t: a rank-|C_t| LoRA
(A'[C_t], B'_t[:, C_t]) on t alone, and all-zero blocks are dropped. Otherwise (an adapter peft
trained on all of c_attn) q, k and v each get rank r' with a copy of the shared A'.

One LoRA rank and alpha serve every module here, so a loaded adapter takes the largest rank,
zero-pads smaller updates (zero rows of A, zero columns of B add nothing), and folds any other
module's scale into its B. Layers peft left out get B = 0.

Exact, and tested against transformers + peft: LoRA on all three, prefix tuning on all three, prompt
tuning on gpt2 and llama. Refused, with a ValueError saying why:
- prompt tuning on bert: we insert the soft prompt after [CLS], peft before it, so [CLS] gets position
  P instead of 0; no choice of prompt vectors changes that, and it changes every output.
- a bert classifier: BertForSequenceClassification reads [CLS] through the pretrained pooler
  (dense + tanh), which our BERT does not have. gpt2/llama classifiers match (*ForSequenceClassification
  reads the last real token as we do), but their `score` has no bias: ours exports only while its bias
  is zero (e.g. a head that came from peft). With prompt tuning, peft hands the classifier embeddings,
  in which transformers cannot see padding, so it reads the last position: equal on unpadded batches.
- methods minipeft does not have (IA3, AdaLoRA, DoRA, ...) and methods peft does not have.
peft keeps no fingerprint of the base weights, so the base check is what the files allow: the
architecture (module names), every shape, the config's layer/head counts, and, when
`base_model_name_or_path` is a local folder, its config.json against this model.
"""
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import pretrained
from .assets import asset_path
from .atomic import atomic_write
from .methods import targets as linear_targets
from .methods.registry import apply

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"  # older peft default; a pickle, which we never read
ROOT = "base_model.model."  # peft's prefix of every LoRA and modules_to_save key

OUR_METHODS = {"lora": "LORA", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}
PEFT_METHODS = {v: k for k, v in OUR_METHODS.items()}

# our target -> (transformers module under the body prefix, the name peft's target_modules lists for
# it: a dotted suffix that matches that module and no other; bert's FFN output needs its full path,
# since "output.dense" also ends "attention.output.dense")
MODULES = {
    "gpt2": {"q": ("h.{i}.attn.c_attn", "c_attn"), "k": ("h.{i}.attn.c_attn", "c_attn"),
             "v": ("h.{i}.attn.c_attn", "c_attn"), "o": ("h.{i}.attn.c_proj", "attn.c_proj"),
             "up": ("h.{i}.mlp.c_fc", "c_fc"), "down": ("h.{i}.mlp.c_proj", "mlp.c_proj")},
    "bert": {"q": ("encoder.layer.{i}.attention.self.query", "query"),
             "k": ("encoder.layer.{i}.attention.self.key", "key"),
             "v": ("encoder.layer.{i}.attention.self.value", "value"),
             "o": ("encoder.layer.{i}.attention.output.dense", "attention.output.dense"),
             "up": ("encoder.layer.{i}.intermediate.dense", "intermediate.dense"),
             "down": ("encoder.layer.{i}.output.dense", "encoder.layer.{i}.output.dense")},
    "llama": {**{t: (f"layers.{{i}}.self_attn.{t}_proj", f"{t}_proj") for t in ("q", "k", "v", "o")},
              **{t: (f"layers.{{i}}.mlp.{t}_proj", f"{t}_proj") for t in ("gate", "up", "down")}},
}
FUSED = ("q", "k", "v")  # gpt2's c_attn, in row order

# the transformers class an exported adapter is for: (flavour, has a classifier) -> (class, body
# prefix, peft task_type). Our bert LM head is the bare tied embedding, not BertForMaskedLM's, so a
# bert adapter is for BertModel (its hidden states equal our encode()).
TRANSFORMERS_MODELS = {
    ("gpt2", False): ("GPT2LMHeadModel", "transformer.", "CAUSAL_LM"),
    ("gpt2", True): ("GPT2ForSequenceClassification", "transformer.", "SEQ_CLS"),
    ("bert", False): ("BertModel", "", "FEATURE_EXTRACTION"),
    ("llama", False): ("LlamaForCausalLM", "model.", "CAUSAL_LM"),
    ("llama", True): ("LlamaForSequenceClassification", "model.", "SEQ_CLS"),
}

# LoRA config fields naming features minipeft's LoRA lacks: field -> what it is
LORA_FEATURES_WE_LACK = {"use_dora": "DoRA", "lora_bias": "a LoRA bias", "bias": "trained base biases",
                         "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication",
                         "target_parameters": "LoRA on nn.Parameters", "alora_invocation_tokens": "aLoRA"}


def is_peft_config(config: dict) -> bool:
    return "peft_type" in config


# ---------------------------------------------------------------------------------------------
# export


@torch.no_grad()
def save(model, path: Path) -> Path:
    """Write `model`'s adapter as peft lays it out for the matching transformers model (see the module
    docstring), each file atomically."""
    cfg, method = model.cfg, model.peft_config["method"]
    if method not in OUR_METHODS:
        raise ValueError(f"format='peft' writes {', '.join(OUR_METHODS)} adapters, not {method!r}; "
                         "save this one with the default format='minipeft'")
    tensors, modules_to_save = _classifier_to_peft(model)
    _, body, task_type = TRANSFORMERS_MODELS[(cfg.flavor, bool(cfg.n_classes))]
    config = {"peft_type": OUR_METHODS[method], "task_type": task_type, "inference_mode": True,
              "base_model_name_or_path": _base_name(cfg), "revision": None, "modules_to_save": modules_to_save}
    if method == "lora":
        lora_tensors, lora_config = _lora_to_peft(model, body)
        tensors.update(lora_tensors)
        config.update(lora_config)
    elif method == "prompt":
        if cfg.flavor == "bert":
            raise ValueError("prompt tuning on bert cannot be exported to peft exactly: we insert the soft "
                             "prompt after [CLS], peft before it, which moves [CLS] from position 0 to "
                             f"{model.prompt.length} and changes every output; use prefix tuning or LoRA on bert")
        tensors["prompt_embeddings"] = model.prompt.embedding  # (P, d)
        config.update(num_virtual_tokens=model.prompt.length, token_dim=cfg.d_model, num_layers=cfg.n_layer,
                      num_attention_heads=cfg.n_head, num_transformer_submodules=1,
                      prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,  # trained: init is moot
                      tokenizer_name_or_path=None, tokenizer_kwargs=None)
    else:  # prefix
        tuning = model.prefix_tuning  # with the MLP, its output: peft stores the prefixes only
        table = torch.cat([tuning.layer_table(i) for i in range(cfg.n_layer)], dim=1)  # (P, L·2·d_kv)
        d_kv = cfg.n_kv_head * cfg.head_dim
        tensors["prompt_embeddings"] = table
        config.update(num_virtual_tokens=tuning.length, token_dim=d_kv, num_layers=cfg.n_layer,
                      num_attention_heads=cfg.n_kv_head, num_transformer_submodules=1,
                      encoder_hidden_size=d_kv, prefix_projection=False)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
    atomic_write(path / PEFT_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(path / PEFT_CONFIG,
                 lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return path


def _base_name(cfg) -> str | None:
    """base_model_name_or_path: the HF folder the model came from (so transformers can load it),
    else its source as we named it (tiny-gpt2, a .gguf path), else None."""
    source = cfg.extra.get("source")
    if source is None:
        return None
    local = asset_path(source) if source in pretrained.ASSET_MODELS else Path(source)
    return str(local.resolve()) if local.exists() else source


def _classifier_to_peft(model) -> tuple[dict, list | None]:
    cfg = model.cfg
    if not cfg.n_classes:
        return {}, None
    if cfg.flavor == "bert":
        raise ValueError("a bert classifier cannot be exported to peft exactly: BertForSequenceClassification "
                         "reads [CLS] through the pretrained pooler (dense + tanh), which minipeft's BERT does "
                         "not have; export the adapter of a model without n_classes instead")
    if model.head.bias is not None and model.head.bias.detach().abs().max() > 0:
        cls_name = TRANSFORMERS_MODELS[(cfg.flavor, True)][0]
        raise ValueError(f"{cls_name}'s score layer has no bias, but this classifier head's bias is "
                         "non-zero, so transformers would compute other logits; export the adapter of a "
                         "model without n_classes instead")
    return {ROOT + "score.weight": model.head.weight}, ["score"]


def _lora_to_peft(model, body: str) -> tuple[dict, dict]:
    cfg = model.cfg
    options = model.peft_config["options"]
    rank, alpha = options["rank"], options["alpha"]
    targets = linear_targets.validate(cfg, options["targets"])
    modules = MODULES[cfg.flavor]
    fused = [t for t in FUSED if t in targets] if cfg.flavor == "gpt2" else []
    tensors, names = {}, []
    for i, block in enumerate(model.blocks):
        layers = {t: block.get_submodule(linear_targets.TARGETS[t]) for t in targets}  # LoRALinear each
        updates = {modules[t][0].format(i=i): (layer.lora_A, layer.lora_B)  # module -> A (r, in), B (out, r)
                   for t, layer in layers.items() if t not in fused}
        if fused:  # the module docstring's A', B'
            A = torch.cat([layers[t].lora_A for t in fused])  # (n·r, d)
            B = torch.zeros(3 * cfg.d_model, len(fused) * rank)  # (3d, n·r): zero where a target is absent
            for j, t in enumerate(fused):
                row = FUSED.index(t) * cfg.d_model
                B[row:row + cfg.d_model, j * rank:(j + 1) * rank] = layers[t].lora_B
            updates[modules["q"][0].format(i=i)] = (A, B)
        for module, (A, B) in updates.items():
            tensors[f"{ROOT}{body}{module}.lora_A.weight"] = A
            tensors[f"{ROOT}{body}{module}.lora_B.weight"] = B
        names += [modules[t][1].format(i=i) for t in targets]
    config = {"r": rank, "lora_alpha": alpha, "rank_pattern": {}, "alpha_pattern": {}}
    n = len(fused)
    if fused and n == len(targets):  # c_attn is the only module: its rank and alpha are global
        config.update(r=n * rank, lora_alpha=n * alpha)
    elif fused:
        config.update(rank_pattern={"c_attn": n * rank}, alpha_pattern={"c_attn": n * alpha})
    config.update(target_modules=list(dict.fromkeys(names)), lora_dropout=options["dropout"],
                  fan_in_fan_out=cfg.flavor == "gpt2", bias="none", use_rslora=False, use_dora=False,
                  init_lora_weights=True, layers_to_transform=None, layers_pattern=None)
    return tensors, config


# ---------------------------------------------------------------------------------------------
# import


def read_config(path) -> dict:
    """A peft adapter folder's config, checked to be one we load, summarized the way adapter_io.py's own
    configs are read: {"format": "peft", "method", "base": {"source", "config": {"n_classes"}}, "peft"}."""
    path = Path(path)
    try:
        raw = json.loads((path / PEFT_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / PEFT_CONFIG} is corrupt ({e}); save the adapter again") from None
    kind = raw["peft_type"]
    if kind not in PEFT_METHODS:
        raise ValueError(f"adapter {path} is a peft {kind} adapter, a method minipeft does not have; "
                         f"minipeft loads {', '.join(PEFT_METHODS)}")
    if kind == "LORA":
        lacking = [what for field, what in LORA_FEATURES_WE_LACK.items()
                   if raw.get(field) not in (None, False, "none", [], {})]
        if lacking:
            raise ValueError(f"adapter {path} uses {', '.join(lacking)}, which minipeft's LoRA does not "
                             "have; load it with peft, or train it without")
    if not (path / PEFT_WEIGHTS).exists():
        pickle_hint = f" ({PEFT_PICKLE} is a pickle, which minipeft never reads: re-save it with peft's " \
                      "save_pretrained(..., safe_serialization=True))" if (path / PEFT_PICKLE).exists() else ""
        raise FileNotFoundError(f"{path} has no {PEFT_WEIGHTS}{pickle_hint}")
    head = _tensor_shapes(path).get(ROOT + "score.weight")
    return {"format": "peft", "method": PEFT_METHODS[kind],
            "base": {"source": raw.get("base_model_name_or_path"),
                     "config": {"n_classes": head[0] if head else None}},
            "peft": raw}


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
    head = _classifier_from_peft(model, tensors, path)
    if config["method"] == "lora":
        options, weights = _lora_from_peft(model, raw, tensors, path)
    else:
        options, weights = _prompt_from_peft(model, raw, tensors, path)
    apply(model, config["method"], **options)
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
    theirs = json.loads((folder / "config.json").read_text())
    model_type = theirs.get("model_type")
    if model_type != cfg.flavor:
        raise ValueError(f"adapter {path} was trained on a {model_type} model ({folder}), this model is a "
                         f"{cfg.flavor}; load the base model it was trained on")
    expected = pretrained.HF_CONFIGS[model_type](theirs, folder, str(folder))
    differ = [f"{key} {expected[key]} there, {getattr(cfg, key)} here"
              for key in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff")
              if expected.get(key) is not None and expected[key] != getattr(cfg, key)]
    if differ:
        raise ValueError(f"adapter {path} was trained on another base model ({folder}): "
                         f"{'; '.join(differ)}; load the base model it was trained on")


def _classifier_from_peft(model, tensors: dict, path: Path) -> torch.Tensor | None:
    """Pop the modules_to_save classifier from `tensors` and check it fits the model's head."""
    n_classes = model.cfg.n_classes
    if any(k.startswith(ROOT + "classifier.") for k in tensors):
        raise ValueError(f"adapter {path} carries a BertForSequenceClassification classifier, which reads [CLS] "
                         "through the pretrained pooler (dense + tanh) that minipeft's BERT does not have; "
                         "it cannot be loaded exactly")
    head = tensors.pop(ROOT + "score.weight", None)
    if head is None and n_classes:
        raise ValueError(f"adapter {path} has no classifier head, but this model has one; "
                         "load the base model without n_classes")
    if head is not None and head.shape != (n_classes or 0, model.cfg.d_model):
        raise ValueError(f"adapter {path} has a classifier head (score) of shape {tuple(head.shape)}; load the "
                         f"base model with n_classes={head.shape[0]} (it has n_classes={n_classes}, "
                         f"d_model={model.cfg.d_model})")
    return head


def _prompt_from_peft(model, raw: dict, tensors: dict, path: Path) -> tuple[dict, dict]:
    """Prompt or prefix tuning: one table, prompt_embeddings, checked against this model's shapes."""
    cfg, kind = model.cfg, raw["peft_type"]
    table = tensors.pop("prompt_embeddings", None)
    if table is None or tensors:
        raise ValueError(f"adapter {path} should hold prompt_embeddings (and at most a classifier); "
                         f"it has {sorted(tensors) if table is not None else 'no prompt_embeddings'}")
    if kind == "PROMPT_TUNING" and cfg.flavor == "bert":
        raise ValueError(f"adapter {path} is peft prompt tuning on bert, which puts the soft prompt before "
                         "[CLS]; minipeft puts it after [CLS], so it cannot be loaded exactly")
    length = raw["num_virtual_tokens"]
    d_kv = cfg.n_kv_head * cfg.head_dim
    ours = {"num_layers": cfg.n_layer, "num_transformer_submodules": 1}
    if kind == "PROMPT_TUNING":
        ours.update(token_dim=cfg.d_model, num_attention_heads=cfg.n_head)
        shape, options, name = (length, cfg.d_model), {"length": length}, "prompt.embedding"
    else:
        ours.update(token_dim=d_kv, num_attention_heads=cfg.n_kv_head)
        shape = (length, cfg.n_layer * 2 * d_kv)
        options, name = {"length": length, "mlp_hidden": 0}, "prefix_tuning.prefix"
    differ = [f"{key} {raw[key]} there, {value} here" for key, value in ours.items()
              if raw.get(key) is not None and raw[key] != value]
    if differ or tuple(table.shape) != shape:
        differ.append(f"prompt_embeddings {tuple(table.shape)} there, {shape} here")
        raise ValueError(f"adapter {path} was trained on another base model: {'; '.join(differ)}; "
                         "load the base model it was trained on")
    return options, {name: table.float()}


def _template_regex(template: str) -> str:
    return re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")


def _locate(module: str, cfg, path: Path) -> tuple[int, str]:
    """A peft module name (ROOT stripped) -> (layer, our target; "c_attn" for gpt2's fused one)."""
    for flavor, modules in MODULES.items():
        body = re.escape(pretrained.HF_PREFIXES[flavor])
        for target, (template, _) in modules.items():
            if match := re.fullmatch(f"(?:{body})?{_template_regex(template)}", module):
                if flavor != cfg.flavor:
                    raise ValueError(f"adapter {path} is for a {flavor} model (it adapts {module}), this "
                                     f"model is a {cfg.flavor}; load the base model it was trained on")
                layer = int(match["i"])
                if layer >= cfg.n_layer:
                    raise ValueError(f"adapter {path} adapts {module}, but this model has {cfg.n_layer} "
                                     "layers; load the base model it was trained on")
                return layer, "c_attn" if flavor == "gpt2" and target in FUSED else target
    raise ValueError(f"adapter {path} adapts {module}, which minipeft does not map (it maps the attention "
                     f"and MLP linear layers of every block: {', '.join(m[0] for m in MODULES[cfg.flavor].values())})")


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that is a dotted suffix of `module`."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


def _split_c_attn(A, B, cfg) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The module docstring's c_attn split: B (3d, R) -> {target: (A_t, B_t)}."""
    d_kv = cfg.n_kv_head * cfg.head_dim
    blocks = dict(zip(FUSED, B.split([cfg.n_head * cfg.head_dim, d_kv, d_kv])))
    used = {t: (b != 0).any(dim=0) for t, b in blocks.items()}  # (R,) columns each block uses
    active = [t for t in FUSED if used[t].any()]
    users = sum(used[t].long() for t in FUSED)  # (R,) how many blocks use each column
    if active and users.max() <= 1:  # block-structured: each target keeps only its own columns
        return {t: (A[used[t]], blocks[t][:, used[t]]) for t in active}
    return {t: (A, blocks[t]) for t in FUSED}  # general: rank R on each of q, k, v, sharing A


def _lora_from_peft(model, raw: dict, tensors: dict, path: Path) -> tuple[dict, dict]:
    cfg = model.cfg
    pairs = {}  # their module -> {"A": (R, in), "B": (out, R)}
    for key, value in tensors.items():
        match = re.fullmatch(rf"{re.escape(ROOT)}(.+)\.lora_([AB])\.weight", key)
        if not match:
            raise ValueError(f"adapter {path} holds {key}, which is not a LoRA A/B matrix of a linear "
                             "layer nor a classifier; minipeft cannot load it")
        pairs.setdefault(match[1], {})[match[2]] = value.float()
    if not pairs:
        raise ValueError(f"adapter {path} holds no LoRA matrices")
    updates = {}  # (layer, target) -> (A, B, scale)
    for module, pair in pairs.items():
        layer, target = _locate(module, cfg, path)
        if set(pair) != {"A", "B"}:
            raise ValueError(f"adapter {path} has only lora_{''.join(pair)} of {module}; the file is incomplete")
        A, B = pair["A"], pair["B"]
        in_features, out_features = linear_targets.shape(cfg, "q" if target == "c_attn" else target)
        if target == "c_attn":
            out_features = cfg.n_head * cfg.head_dim + 2 * cfg.n_kv_head * cfg.head_dim
        if A.shape[1] != in_features or B.shape[0] != out_features or A.shape[0] != B.shape[1]:
            raise ValueError(f"adapter {path}: {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                             f"this model's layer is {out_features}×{in_features}; load the base model it "
                             "was trained on")
        rank = A.shape[0]
        alpha = _pattern_value(raw.get("alpha_pattern") or {}, module, raw["lora_alpha"])
        scale = alpha / rank ** 0.5 if raw.get("use_rslora") else alpha / rank
        split = _split_c_attn(A, B, cfg) if target == "c_attn" else {target: (A, B)}
        for t, (A_t, B_t) in split.items():
            updates[(layer, t)] = (A_t, B_t, scale)
    targets = [t for t in linear_targets.TARGETS if any(t == key[1] for key in updates)]
    rank = max(A.shape[0] for A, _, _ in updates.values())
    first_scale = next(iter(updates.values()))[2]
    alpha = first_scale * rank
    our_scale = alpha / rank  # what LoRALinear will use
    weights = {}
    for i in range(cfg.n_layer):
        for t in targets:
            in_features, out_features = linear_targets.shape(cfg, t)
            A_full, B_full = torch.zeros(rank, in_features), torch.zeros(out_features, rank)
            if (i, t) in updates:
                A, B, scale = updates[(i, t)]
                A_full[:A.shape[0]] = A
                B_full[:, :B.shape[1]] = B if scale == our_scale else B * (scale / our_scale)
            name = f"blocks.{i}.{linear_targets.TARGETS[t]}"
            weights[f"{name}.lora_A"], weights[f"{name}.lora_B"] = A_full, B_full
    options = {"rank": rank, "alpha": alpha, "dropout": raw.get("lora_dropout", 0.0), "targets": targets}
    return options, weights

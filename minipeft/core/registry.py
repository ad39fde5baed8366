"""The method registry: what a PEFT method declares (`Method`, `Option`), the registry itself
(`METHODS`, `register`), and `apply`, which adds a method to a model the same way for every method
(what works on the model after that, whatever its method — merging, its trainable tensors — is adapted.py).

    apply(model, "lora", rank=8)
      1. the options are checked against the method's declared Options and completed with their defaults
      2. the base model's fingerprint is recorded and every base parameter is frozen
      3. the method wraps layers / fills the model's slots / unfreezes its selection
      4. a fresh classifier head (cfg.n_classes) is made trainable whatever the method
      5. model.peft_config = {"method", "options", "base_fingerprint"}
      6. what the outer rings add (AFTER_APPLY: a model held in bf16 casts the new parameters)

`Method` is the one extension point: a method declares, once, everything the rest of minipeft needs
(each field is commented where it is declared below; `train.py --list-methods` prints name and description,
train.py builds its flags from the Options, the conformance suite tests/test_methods.py runs every example
through every promise).

What the modules a method inserts keep for backward, the memory ledger measures (extras/memory.py): a
method declares nothing about its activations. A user's method in a file of their own registers the
same way as the built-ins do (see the README, "Add your own method"), and `train.py --import FILE`
trains it.
"""
import difflib
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .fingerprint import base_fingerprint
from .model import FLAVORS

OPTION_TYPES = (int, float, str, bool, list)  # list: of strings, written "a,b,c" on the command line


@dataclass(frozen=True)
class Option:
    """One keyword option of a method: its type, default, help text and, if it has them, its choices."""
    name: str
    type: type  # one of OPTION_TYPES
    default: Any
    help: str
    choices: tuple = ()

    def __post_init__(self):
        if self.type not in OPTION_TYPES:
            raise ValueError(f"option {self.name!r}: type must be one of "
                             f"{', '.join(t.__name__ for t in OPTION_TYPES)}, not {self.type!r}")

    def convert(self, value):
        """A value of this option's type, from a Python value or from command-line text (raises
        ValueError naming the option when it is neither)."""
        if value is None and self.default is None:
            return None
        try:
            value = self._from_text(value) if isinstance(value, str) and self.type is not str else value
        except ValueError:
            raise ValueError(f"option {self.name!r} takes {self._kind()}, not {value!r}") from None
        if self.type is list and isinstance(value, tuple):
            value = list(value)
        ok = isinstance(value, self.type) and not (self.type is int and isinstance(value, bool))
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if self.type is list and ok:
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            raise ValueError(f"option {self.name!r} takes {self._kind()}, not {value!r}")
        if self.type is float and not math.isfinite(value):  # a scale or dropout of nan or inf trains nothing
            raise ValueError(f"option {self.name!r} takes a finite number, not {value}")
        if self.choices and value not in self.choices:
            raise ValueError(f"unknown {self.name} {value!r}; choose one of {', '.join(map(str, self.choices))}")
        return value

    def _from_text(self, text: str):
        if self.type is bool:
            words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
            if text.lower() not in words:
                raise ValueError(text)
            return words[text.lower()]
        if self.type is list:
            return [part.strip() for part in text.split(",") if part.strip()]
        return self.type(text)

    def _kind(self) -> str:
        return {bool: "true or false", list: "a comma-separated list", int: "an integer",
                float: "a number", str: "text"}[self.type]


@dataclass
class Method:
    name: str
    description: str
    apply: Callable  # apply(model, **options): wrap / fill slots / unfreeze; the base is frozen already
    parameter_count: Callable  # parameter_count(cfg, **options): what the method trains (no classifier)
    options: tuple[Option, ...] = ()  # its keyword options, each a flag of train.py
    examples: tuple[dict, ...] = ({},)  # option sets the conformance suite runs; {} = the defaults
    lr: float = 1e-3  # a default peak learning rate on the built-in tasks (adapted.TASK_DEFAULTS may replace it)
    flavors: tuple = FLAVORS  # the model flavors it fits
    exact_at_init: bool = True  # output equals the base model's right after apply
    mergeable: bool = False  # mp.merge folds it into the base weights
    uses_tokenizer: bool = False  # apply(model, tokenizer=..., **options): prompt tuning's init="text"
    lr_factors: Callable | None = None  # lr_factors(model, **options) -> {parameter name: factor of lr} (LoRA+'s B)
    side_by_side: bool = False  # several adapters of it can share a base model (extras/multi.py)
    changes_base: Callable = lambda **options: False  # apply rewrites the frozen base weights (PiSSA): not side by side
    defaults: dict = field(init=False, repr=False)

    def __post_init__(self):
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name!r} declares an option twice: {names}")
        self.defaults = {o.name: o.default for o in self.options}
        for example in self.examples:  # a typo in an example fails at registration, not in a test
            self.resolve(example)

    def resolve(self, options: dict) -> dict:
        """The full option set: given values converted to their declared types, defaults for the rest."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(self.defaults) or "none"
            raise ValueError(f"unknown option(s) {unknown} for method {self.name!r}; its options are: {valid}")
        try:
            return {o.name: o.convert(options.get(o.name, o.default)) for o in self.options}
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None


METHODS: dict[str, Method] = {}  # name -> Method, the built-ins first (methods() fills it)
BUILT_IN = {"full": "selective", "head": "selective", "last_k": "selective", "bitfit": "selective", "lora": "lora",
            "qlora": "qlora", "dora": "dora", "adapter": "adapter", "prefix": "prefix", "prompt": "prompt",
            "llama_adapter": "llama_adapter", "ia3": "ia3", "vera": "vera", "loha": "loha",
            "lokr": "lokr"}  # method -> the file of minipeft/core/ that registers it, in METHODS' order
_loading_built_in = False


def _load_built_in(file: str):
    global _loading_built_in
    loading, _loading_built_in = _loading_built_in, True
    try:
        importlib.import_module(f"{__package__}.{file}")
    finally:
        _loading_built_in = loading


def methods() -> dict[str, Method]:
    """METHODS, with every built-in method in it: their files are imported (each registers itself) on the
    first call, so that importing the model alone loads no method (get_method loads only the one named)."""
    if not all(name in METHODS for name in BUILT_IN):
        for file in dict.fromkeys(BUILT_IN.values()):
            _load_built_in(file)
        ordered = {name: METHODS[name] for name in [*BUILT_IN, *METHODS] if name in METHODS}  # built-ins first
        METHODS.clear()
        METHODS.update(ordered)
    return METHODS


def register(method: Method, replace: bool = False) -> Method:
    """Add `method` to METHODS (so mp.apply, train.py and the conformance suite know it). An option
    name another method uses already must have the same type: the CLI has one flag per name."""
    built_in_file = f"{__package__}.{BUILT_IN.get(method.name)}"
    if not _loading_built_in and method.apply.__module__ != built_in_file:  # a user's method is checked
        methods()  # against every built-in one (a built-in file imported directly registers its own alone)
    if method.name in METHODS and not replace:
        raise ValueError(f"a method named {method.name!r} is registered already; pick another name "
                         "(or register(..., replace=True))")
    for option in method.options:
        for other in METHODS.values():
            theirs = next((o for o in other.options if o.name == option.name), None)
            if theirs is not None and other.name != method.name and theirs.type is not option.type:
                raise ValueError(f"option {option.name!r} of {method.name!r} is {option.type.__name__}, but "
                                 f"{other.name!r} declares it {theirs.type.__name__}; rename one of them")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The method registered as `name` (a built-in one is loaded from its file on first use)."""
    if name not in METHODS and name in BUILT_IN:
        _load_built_in(BUILT_IN[name])
    if name not in METHODS and name not in methods():
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        raise ValueError(f"unknown method {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                         f"valid methods are: {', '.join(METHODS)}")
    return METHODS[name]


AFTER_APPLY: list[Callable] = []  # f(model) run after every apply; scale/precision.py adds its cast


def apply(model, method: str, tokenizer=None, **options):
    """Freeze the base model and add `method` to it in place; returns the model. `tokenizer` is needed
    only by methods that read text (prompt tuning with init="text")."""
    spec = get_method(method)
    if model.peft_config:
        raise ValueError(f"this model already has method {model.peft_config['method']!r}; "
                         "apply one method to a fresh base model")
    if model.cfg.flavor not in spec.flavors:
        raise ValueError(f"method {method!r} does not fit a {model.cfg.flavor} model "
                         f"(it supports {', '.join(spec.flavors)})")
    resolved = spec.resolve(options)
    fingerprint = base_fingerprint(model)
    base_names = frozenset(name for name, _ in model.named_parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    try:
        spec.apply(model, **resolved, **({"tokenizer": tokenizer} if spec.uses_tokenizer else {}))
    except ValueError:  # a method checks its options before it changes the model: undo the freezing
        for p in trainable:
            p.requires_grad_(True)
        raise
    model.train(model.training)  # new modules start in training mode: an eval model's dropout must stay off
    if model.cfg.n_classes:
        model.head.requires_grad_(True)
    model.peft_config = {"method": method, "options": resolved, "base_fingerprint": fingerprint}
    model.base_parameter_names = getattr(model, "base_parameter_names", None) or base_names  # extras/disable.py
    for hook in AFTER_APPLY:
        hook(model)
    return model

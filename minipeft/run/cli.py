"""What train.py and eval.py share: the method-option flags and one way to report bad input.

Every method option a method declares (registry.Option) becomes a flag of the same name (`targets` ->
`--targets`), with the option's own type and help text, defaulting to None so that only the options a
user actually typed reach `apply`; a flag that the chosen method does not take is an error naming the
method's options. `--import FILE` loads a user's file that registers more methods before the flags are
built, so their options get flags too.

Exit codes of `run`: 0 done (or stopped at --stop-at), 2 bad input (one line, no traceback unless
--debug), 1 training diverged (too many non-finite steps), 130 / 143 stopped by Ctrl-C / SIGTERM
after saving a checkpoint.
"""
import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from minipeft.formats.tasks import parse_sources
from minipeft.core.adapted import TASK_DEFAULTS, task_defaults
from minipeft.core.registry import get_method, methods
from minipeft.scale.precision import PRECISIONS
from minipeft.formats.pretrained import NAMED_MODELS
from minipeft.formats.readers import parse_columns
from minipeft.run.trainer import Stopped
from minipeft.scale.processes import exit_process


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help adds each flag's "(default: …)", unless its help already says what the default is or the
    flag is required (export.py's --out)."""

    def _get_help_string(self, action):
        if action.required or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


KIND_WORDS = {"classification": "classification", "sft": "instruction data", "lm": "causal LM",
              "dpo": "preference pairs (DPO)"}


def add_model_and_task_flags(parser: argparse.ArgumentParser, model_default: str | None = "minilm",
                             model_help: str = ""):
    parser.add_argument("--model", default=model_default, help=f"named model ({', '.join(NAMED_MODELS)}), an HF "
                        f"folder (any family of minipeft/core/model.py), a .gguf file, or a hub id (ORG/NAME) read from the "
                        f"Hugging Face cache{model_help}")
    parser.add_argument("--task", action=AppendSource, default="rotten_tomatoes", metavar="SOURCE[:WEIGHT]",
                        help="rotten_tomatoes, rotten_tomatoes_instruct, hamlet, a .txt file (causal LM), a .jsonl, "
                             ".json, .csv, .tsv or .parquet file, a folder of train/validation/test files, or a folder "
                             "written by datasets' save_to_disk. Rows of text,label are classification; "
                             "prompt/completion, messages, ShareGPT conversations or Alpaca instruction/output rows "
                             "are instruction data. Give --task more than once to mix sources of one kind: "
                             "SOURCE:WEIGHT draws round(WEIGHT x its size) training rows from it (default 1; "
                             "validation and test are every source's own)")
    parser.add_argument("--columns", default=None, metavar="FIELD=COLUMN,...",
                        help="read your files' columns under the names minipeft reads, e.g. "
                             "prompt=question,completion=answer or text=review,label=sentiment")
    parser.add_argument("--max-len", type=int, default=128,
                        help="truncate (classification, instruction rows: from the prompt's left) or window (LM) "
                             "to this many tokens")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a jinja2 chat template to use instead of the model's own (instruction data, --chat); "
                             "models without one get a plain 'User: / Assistant:' template")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


class AppendSource(argparse._AppendAction):
    """--task given once or more: the list of sources typed (the default, a single source, is replaced;
    an append action, so that a config file's list of sources is read as one)."""

    def __call__(self, parser, namespace, value, option_string=None):
        given = getattr(namespace, self.dest)  # the default (perhaps a config file's list) until a --task
        setattr(namespace, self.dest, (given if isinstance(given, list) and given is not self.default else []) + [value])


def task_flags(args) -> tuple[list[tuple[str, float]], dict]:
    """The --task sources with their weights, and the --columns; a bad weight or column name stops here,
    before anything is loaded."""
    return parse_sources(args.task), parse_columns(args.columns)


def check_lm_head(model, kind: str, who: str, what: str):
    """A classifier checkpoint (a …ForSequenceClassification folder) has no LM head: only a classification task
    runs on it. `who` names the model, `what` how the task was to be used ("train on", "score")."""
    if model.cfg.n_classes and kind != "classification":
        raise ValueError(f"{who} is a classifier ({model.cfg.n_classes} classes) without an LM head, so it cannot "
                         f"{what} a {kind} task; use its base language model instead")


def add_device_flags(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("device and precision")
    group.add_argument("--device", default="auto", metavar="DEVICE",
                       help="auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps; under torchrun with "
                            "CUDA each process takes cuda:LOCAL_RANK")
    group.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS),
                       help="fp32; bf16-mixed: frozen weights in bf16, trainable ones and AdamW state in fp32, "
                            "matmuls in bf16; bf16-true: everything in bf16; fp16-mixed: as bf16-mixed in fp16, "
                            "with dynamic loss scaling. auto: bf16-mixed on a CUDA GPU with bf16 and on a CPU with "
                            "AMX (where bf16 matmuls outrun fp32's), else fp32; a run's first line says which and why")


def add_import_flag(parser: argparse.ArgumentParser):
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="FILE",
                        help="a Python file (or module name) to import first, e.g. one that registers your "
                             "own method with mp.register; may be given more than once")


def import_user_files(argv) -> None:
    """Import every `--import FILE` in argv (before the parser is built: their methods add flags)."""
    pre = argparse.ArgumentParser(add_help=False)
    add_import_flag(pre)
    for name in pre.parse_known_args(argv)[0].imports:
        path = Path(name)
        if path.suffix == ".py":
            if not path.is_file():
                raise FileNotFoundError(f"--import {name}: no such file")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        else:
            import_module(name)


def import_module(name: str):
    """--import NAME of a module: a module that cannot be found (or that imports one that cannot) stops
    with one line."""
    if not name:
        raise ValueError("--import needs a Python file (path/to/file.py) or a module name, got ''")
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ValueError(f"--import {name}: {e}; install the module, or give a Python file as "
                         "path/to/file.py") from None


def add_method_flags(parser: argparse.ArgumentParser, only: str | None = None):
    """A flag per method option of every method (only: of that method alone, which loads no other)."""
    group = parser.add_argument_group("method options (each applies to the methods that take it)")
    declared = {}  # option name -> [(method, Option)]
    for method in [get_method(only)] if only else methods().values():
        for option in method.options:
            declared.setdefault(option.name, []).append((method, option))
    for name, takers in sorted(declared.items()):
        option = takers[0][1]  # register() made sure every method declares it with the same type
        if len({o.choices for _, o in takers}) > 1:  # (lora's init and prompt's): each method checks its own
            option = dataclasses.replace(option, choices=())
        text = "; ".join(f"{m.name}: {o.help}, default {o.default!r}" for m, o in takers) \
            if len({o.help for _, o in takers}) > 1 else \
            f"{option.help} [{', '.join(m.name for m, _ in takers)}; default " \
            f"{', '.join(sorted({repr(o.default) for _, o in takers}))}]"
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"opt_{name}", type=_text_to(option),
                           default=None, metavar=option.type.__name__.upper(), help=text.replace("%", "%%"))


def _text_to(option):
    """argparse's `type`: the option's own conversion (its name shows in argparse's error message)."""
    def convert(text):
        try:
            return option.convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = option.type.__name__
    return convert


def method_options(args) -> dict:
    """The method options the user typed, as keyword arguments for mp.apply."""
    return {k[len("opt_"):]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}


def list_methods() -> str:
    width = max(len(m) for m in methods())
    rows = [f"{m.name:<{width}}  {m.description}\n{'':<{width}}  options: "
            f"{', '.join(f'{k}={v!r}' for k, v in m.defaults.items()) or 'none'}\n{'':<{width}}  {_defaults(m)}"
            for m in methods().values()]
    return "\n".join(rows)


def _defaults(method) -> str:
    """"lr 0.002; instruction data: lr 0.001, targets=['all']": its lr and what a kind of task changes."""
    text = f"lr {method.lr:g}"
    for kind, row in TASK_DEFAULTS.items():
        if method.name in row:
            lr, options = task_defaults(method.name, kind)
            text += f"; {KIND_WORDS[kind]}: lr {lr:g}" + "".join(f", {k}={v!r}" for k, v in options.items())
    return text


def run(main, argv=None):
    """Run main(argv); bad input prints one line and exits with code 2 (use --debug for the traceback).

    A training run that stops early on purpose (trainer.Stopped) prints why and exits with its code:
    0 at --stop-at, 128 + the signal's number when interrupted (130 Ctrl-C, 143 SIGTERM), 1 when it
    diverged. A process torchrun started leaves through processes.exit_process, which says why."""
    argv = sys.argv[1:] if argv is None else argv
    code = None
    try:
        main(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ConnectionError) as e:
        if "--debug" in argv:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Stopped as e:
        if "--debug" in argv:
            traceback.print_exc()
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process stops alike; rank 0 says why
            print(e, file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    exit_process(code)  # under torchrun at once, without the interpreter's finalization

"""What train.py and eval.py share: the method-option flags and one way to report bad input.

Every method option (see peft.METHODS) becomes a flag of the same name (`targets` -> `--targets`),
defaulting to None so that only the options a user actually typed reach `apply`; a flag that the
chosen method does not take is an error naming the method's options.

Exit codes of `run`: 0 done (or stopped at --stop-at), 2 bad input (one line, no traceback unless
--debug), 1 training diverged (too many non-finite steps), 130 / 143 stopped by Ctrl-C / SIGTERM
after saving a checkpoint.
"""
import argparse
import os
import sys
import traceback

from .peft import METHODS
from .trainer import Stopped

OPTION_HELP = {
    "rank": "LoRA rank r (>= 1)",
    "alpha": "LoRA scale numerator: the update is multiplied by alpha / rank",
    "dropout": "dropout on the LoRA input path (the model's own dropout is --model-dropout)",
    "targets": "comma-separated linear layers to adapt: q,k,v,o,up,gate,down or 'all'",
    "layers": "number of top blocks to train (last_k) or to adapt",
}


def add_model_and_task_flags(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default="minilm", help="named model (minilm, smollm2, tiny-gpt2, "
                        "tiny-bert, tiny-llama), an HF folder or a .gguf file")
    parser.add_argument("--task", default="rotten_tomatoes",
                        help="rotten_tomatoes, hamlet, or a .csv/.jsonl (text,label) or .txt file")
    parser.add_argument("--max-len", type=int, default=128,
                        help="truncate (classification) or window (LM) to this many tokens")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def add_method_flags(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("method options (each applies to the methods that take it)")
    names = sorted({name for m in METHODS.values() for name in m.options})
    for name in names:
        takers = ", ".join(m.name for m in METHODS.values() if name in m.options)
        defaults = {repr(m.options[name]) for m in METHODS.values() if name in m.options}
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"opt_{name}", type=_parse_value,
                           default=None, metavar=name.upper(),
                           help=f"{OPTION_HELP.get(name, name)} [{takers}; default {', '.join(sorted(defaults))}]")


def method_options(args) -> dict:
    """The method options the user typed, as keyword arguments for peft.apply."""
    return {k[len("opt_"):]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}


def list_methods() -> str:
    width = max(len(m) for m in METHODS)
    rows = [f"{m.name:<{width}}  {m.description}\n{'':<{width}}  options: "
            f"{', '.join(f'{k}={v!r}' for k, v in m.options.items()) or 'none'}" for m in METHODS.values()]
    return "\n".join(rows)


def run(main, argv=None):
    """Run main(argv); bad input prints one line and exits with code 2 (use --debug for the traceback).

    A training run that stops early on purpose (trainer.Stopped) prints why and exits with its code:
    0 at --stop-at, 128 + the signal's number when interrupted (130 Ctrl-C, 143 SIGTERM), 1 when it
    diverged."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ConnectionError) as e:
        if "--debug" in argv:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        if "--debug" in argv:
            traceback.print_exc()
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process stops alike; rank 0 says why
            print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

"""The `minipeft` console command: one subcommand per script, with that script's own flags.

    minipeft train --method lora --rank 8        = python train.py --method lora --rank 8
    minipeft eval --adapter RUN/adapter          = python eval.py --adapter RUN/adapter
    minipeft chat --adapter RUN/adapter          = python eval.py --chat --adapter RUN/adapter
    minipeft export --adapter RUN/adapter ...    = python export.py --adapter RUN/adapter ...

The scripts stay the readable entry points: the command runs them as `python SCRIPT.py` would (as
__main__, with the rest of the command line), so their parsers, help and exit codes are the command's.
In a clone of the repository (or an editable install) they are the files at its top; an installed wheel
carries copies of them in minipeft/_scripts/ (pyproject.toml).
"""
import importlib.util
import sys
from pathlib import Path

from minipeft.formats.assets import repository

SUBCOMMANDS = {  # name -> (script, arguments put first, what it does)
    "train": ("train", [], "fine-tune a model with a parameter-efficient method"),
    "eval": ("eval", [], "score a model and adapter on a task's test split, or generate text"),
    "chat": ("eval", ["--chat"], "talk with a model and adapter in its chat template"),
    "export": ("export", [], "write a fine-tuned model for transformers, llama.cpp or peft"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<8} {what} ({script}.py{' ' + ' '.join(first) if first else ''})"
                     for name, (script, first, what) in SUBCOMMANDS.items())
    return ("usage: minipeft {train,eval,chat,export} [flags]\n\n"
            "Parameter-efficient fine-tuning written out by hand in plain PyTorch.\n\n"
            f"subcommands:\n{rows}\n\n"
            "Each takes its script's flags; see them with: minipeft train --help")


def script_path(script: str) -> Path | None:
    """The file of `script` (train, eval, export): the clone's own, else the wheel's copy; None if
    this installation has no such script."""
    root = repository()
    folder = root if root is not None else Path(__file__).resolve().parents[1] / "_scripts"
    path = folder / f"{script}.py"
    return path if path.is_file() else None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):  # asked for: on stdout; no subcommand is an error: on stderr
        print(usage(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"{usage()}\n\nerror: unknown subcommand {name!r}; choose one of {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        sys.exit(2)
    script, first, _ = SUBCOMMANDS[name]
    path = script_path(script)
    if path is None:
        print(f"error: minipeft {name} needs {script}.py, which this installation of minipeft does not "
              "have; install a version of minipeft that ships it", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"minipeft {name}", *first, *rest]  # argparse names the program after argv[0]
    spec = importlib.util.spec_from_file_location("__main__", path)  # run as `python SCRIPT.py` runs it
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


if __name__ == "__main__":
    main()

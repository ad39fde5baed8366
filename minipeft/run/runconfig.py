"""A run's settings in a YAML file: `train.py --config run.yaml`, and every run's settings saved in its
folder as config.yaml, so that `train.py --resume RUN` needs no other flag.

    # run.yaml: every flag of train.py is a key (but --config, --debug, --help), written batch_size or batch-size
    model: smollm2
    task: examples/chats.jsonl
    targets: [q, k, v, o]        # a list, or "q,k,v,o" as on the command line
    steps: 60
    pack: true                   # a switch: true or false (--no-pack on the command line undoes it)

Where a setting comes from, each later one winning:

    the flag's default  <  the resumed run's config.yaml (--resume RUN)  <  --config FILE  <  the command line

A key that is not a flag, a key given twice, or a value the flag does not take, stops the run before
anything is loaded or written, naming the key (ValueError: one line, exit code 2). A null value means
the flag's default.
Paths in the file are read from the folder the command runs in, as on the command line.

The settings saved in <out>/config.yaml are those the run used: every flag, with the method, its
options and the learning rate as resolved (the method's defaults written out), but not what only
concerns one invocation (--config, --resume, --out, --stop-at, --debug).
"""
import argparse
import difflib
import json
from pathlib import Path

import yaml

from . import cli
from minipeft.core import registry
from minipeft.formats.atomic import atomic_write
from minipeft.scale.output import flag_value, run_folder

SETTINGS_FILE = "config.yaml"
# how one invocation starts, stops or reports, not what the run is: not saved in config.yaml
NOT_SAVED = ("config", "resume", "out", "overwrite", "stop_at", "debug", "list_methods", "help")
COMMAND_LINE_ONLY = ("help", "config", "debug")  # flags that are not keys of a file (--debug: the run reads argv)


def add_config_flag(parser: argparse.ArgumentParser):
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a YAML file of settings, one key per flag (batch_size or batch-size: 16); flags "
                             "given on the command line win. --resume reads the run's own config.yaml first")


def parse_args(build_parser, argv: list[str], default_method: str | None = None) -> argparse.Namespace:
    """build_parser()'s arguments from the resumed run's config.yaml, the --config file and argv, in that
    order of precedence (argv wins). Files named by `import` keys or --import are imported first, so the
    methods they register have flags. When the settings name the method (or leave it at default_method),
    the flags of that method alone are built first, so no other method's file is loaded; a setting that
    parser does not know (another method's option, --help) falls back to every method's flags."""
    layers = settings_layers(argv)
    imports = [name for _, settings, _ in layers for name in as_list(settings.get("import", []))]
    cli.import_user_files([*(arg for name in imports for arg in ("--import", str(name))), *argv])
    method = chosen_method(argv, layers, default_method)
    if method is not None:
        try:
            args, unknown = with_settings(build_parser(method), layers).parse_known_args(argv)
            if not unknown:
                return args
        except ValueError:  # a key of the file that only the full parser knows, or a bad value: said below
            pass
    return with_settings(build_parser(), layers).parse_args(argv)


def with_settings(parser: argparse.ArgumentParser, layers: list[tuple[str, dict, bool]]) -> argparse.ArgumentParser:
    """The parser with the files' settings as its defaults, lowest first."""
    for source, settings, with_method_options in layers:
        defaults = defaults_from(parser, settings, source)
        if not with_method_options:
            defaults = {dest: v for dest, v in defaults.items() if not dest.startswith("opt_")}
        parser.set_defaults(**defaults)
    return parser


def chosen_method(argv: list[str], layers: list[tuple[str, dict, bool]], default: str | None) -> str | None:
    """The method the settings choose, if it is known before parsing: --method, else the files' "method",
    else `default` unless an adapter to start from (whose method is read later) is given. None under
    --help and --list-methods, which show every method."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # (--init is LoRA's, not --init-adapter)
    for flag in ("--method", "--init-adapter"):
        pre.add_argument(flag)
    given, rest = pre.parse_known_args(argv)
    if {"-h", "--help", "--list-methods"} & set(rest):
        return None
    files = [settings for _, settings, _ in reversed(layers)]  # highest first
    method = given.method or next((s["method"] for s in files if s.get("method")), None)
    if method is None and not (given.init_adapter or any(s.get("init_adapter") for s in files)):
        method = default
    return method if method in registry.BUILT_IN or method in registry.METHODS else None


def settings_layers(argv: list[str]) -> list[tuple[str, dict, bool]]:
    """[(file, its settings, whether its method options apply)] of the resumed run's config.yaml and the
    --config file, lowest first. The resumed run's method options do not apply when the --config file
    or argv choose another method (checkpoint.check_resumable then names the difference)."""
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--config", "--resume", "--method"):
        pre.add_argument(flag)
    given = pre.parse_known_args(argv)[0]
    config = read_settings(Path(given.config)) if given.config else {}
    layers = [(given.config, config, True)] if given.config else []
    resume = given.resume or config.get("resume")
    if resume and (saved := run_folder(resume) / SETTINGS_FILE).is_file():
        resumed = read_settings(saved)
        method = given.method or config.get("method") or resumed.get("method")
        layers.insert(0, (str(saved), resumed, method == resumed.get("method")))
    return layers


def read_settings(path: Path) -> dict:
    """A YAML file's mapping of keys to values, with '-' in keys read as '_'."""
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: {'a folder' if path.is_dir() else 'no such file'}; give a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
        settings, node = yaml.safe_load(text), yaml.compose(text)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid YAML ({' '.join(str(e).split())}); fix the file") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
        raise ValueError(f"{path} must hold one 'key: value' line per flag, e.g. 'batch_size: 16'")
    keys = [key.value.replace("-", "_") for key, _ in node.value]  # as written: YAML keeps a repeated key's last
    if twice := sorted({key for key in keys if keys.count(key) > 1}):
        raise ValueError(f"{path} sets {', '.join(twice)} more than once (batch-size and batch_size are one "
                         "key too); keep one line for each")
    return {key.replace("-", "_"): value for key, value in settings.items()}


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each flag's action by its key: --batch-size -> batch_size (COMMAND_LINE_ONLY flags are not keys)."""
    actions = {}
    for action in parser._actions:
        long = [s for s in action.option_strings if s.startswith("--")]
        if long and long[0][2:] not in COMMAND_LINE_ONLY:
            actions[long[0][2:].replace("-", "_")] = action
    return actions


def defaults_from(parser: argparse.ArgumentParser, settings: dict, source: str) -> dict:
    """The settings as parser.set_defaults takes them (by dest), each converted by its flag's own type."""
    actions = flag_actions(parser)
    defaults = {}
    for key, value in settings.items():
        if key in COMMAND_LINE_ONLY:
            raise ValueError(f"{source}: {key} is not a setting a file can hold; give --{key} on the command line")
        if key not in actions:
            close = difflib.get_close_matches(key, actions, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{source}: unknown key {key!r}; {hint}the keys are the flags of this command: "
                             f"{', '.join(actions)}")
        if value is not None:  # null: the flag's default
            defaults[actions[key].dest] = convert(actions[key], key, value, source)
    return defaults


def convert(action: argparse.Action, key: str, value, source: str):
    """A YAML value as the flag would have parsed it from the command line (or ValueError naming the key)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{source}: {key} is a switch: write {key}: true or {key}: false, not {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        return [convert_one(action, key, v, source) for v in as_list(value)]
    return convert_one(action, key, value, source)


def convert_one(action: argparse.Action, key: str, value, source: str):
    try:
        if action.dest.startswith("opt_"):  # a method option: its own conversion takes YAML's values as they are
            result = action.type(value)
        elif isinstance(value, (bool, dict)) or isinstance(value, list) and action.type in (int, float, None):
            raise ValueError(value)
        else:  # as typed on the command line; a list as its comma-separated items (--log csv,tensorboard)
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            result = action.type(text) if action.type else text
    except argparse.ArgumentTypeError as e:  # the flag's own words
        raise ValueError(f"{source}: {key}: {e}") from None
    except (ValueError, TypeError):
        kind = {int: "an integer", float: "a number"}.get(action.type, "text")
        raise ValueError(f"{source}: {key} takes {kind}, not {value!r}") from None
    if action.choices and result not in action.choices:
        raise ValueError(f"{source}: {key} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
    return result


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


# ----------------------------------------------------------------------------------------------------
# the settings a run used, saved in its folder


def run_settings(args: argparse.Namespace, method: str, options: dict, lr: float) -> dict:
    """What config.yaml holds: every flag of `args` but NOT_SAVED ones, by key, with the method, all its
    options (`options`: the model's peft_config["options"], defaults included) and the learning rate."""
    settings = {}
    for dest, value in vars(args).items():
        if dest in NOT_SAVED or dest.startswith("opt_"):
            continue
        settings["import" if dest == "imports" else dest] = flag_value(dest, value)
    settings.update(method=method, lr=lr, **options)
    return json.loads(json.dumps(settings))  # tuples as lists: plain YAML


class SettingsFile:
    """A MetricsLog writer (trainer.py) that writes the run's settings to <out>/config.yaml when the run
    starts writing (after every check has passed), and again on each resume."""

    def __init__(self, settings: dict):
        self.settings = settings

    def __call__(self, folder: Path) -> "SettingsFile":
        text = ("# the settings of this run; `--resume <this folder>` reads them, and any flag given with it\n"
                "# overrides them\n" + yaml.safe_dump(self.settings, sort_keys=False, allow_unicode=True))
        atomic_write(Path(folder) / SETTINGS_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return self

    def record(self, row: dict):
        pass

    def close(self):
        pass

"""A run's output folder: one run per folder, so nothing is lost without being asked.

    <out>/metrics.jsonl  adapter/  config.yaml  metrics.csv  plot.png     what a run writes (RUN_FILES)
    <out>/latest_checkpoint  checkpoint-<step>/                         its checkpoints (checkpoint.py)

`check_output_folder` stops a run whose --out holds another run's files unless it is that run, resumed,
or --overwrite lets `remove_run_files` delete them once every check has passed (the folder's other files
stay); a run given no --out gets a new folder of its own (`new_run_folder`). `find` and `read_state`
name a run's checkpoint and read its trainer_state.json, no tensors, so train.py checks the checkpoint to
resume before loading anything with this file alone, and a run that saves none never loads checkpoint.py.
"""
import itertools
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch.distributed as dist

FORMAT_VERSION = 1  # of trainer_state.json
LATEST = "latest_checkpoint"  # names the newest complete checkpoint-<step> folder
STATE_JSON = "trainer_state.json"  # in every checkpoint folder
CHECKPOINT_FOLDER = re.compile(r"checkpoint-\d+")
# with the checkpoint folders: what a run writes in its --out (train.py's config.yaml and watch.py's logs too)
RUN_FILES = ("metrics.jsonl", "adapter", LATEST, "config.yaml", "metrics.csv", "plot.png", "tensorboard", "wandb")
RUNS = Path("checkpoints")  # where a run given no --out gets a folder of its own (new_run_folder)


def run_folder(path) -> Path:
    """The output folder of the run that `path` (as given to --resume) belongs to."""
    path = Path(path)
    return path.parent if (path / STATE_JSON).is_file() and not (path / LATEST).is_file() else path


def find(path) -> Path:
    """The checkpoint folder that `path` means: a run's output folder (its latest checkpoint) or a
    checkpoint-<step> folder itself."""
    path = Path(path)
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text().strip()
        if not (path / name / STATE_JSON).is_file():
            raise ValueError(f"{path / LATEST} names {name!r}, which is not a complete checkpoint "
                             f"folder in {path}; resume from another checkpoint or start a new run")
        return path / name
    if (path / STATE_JSON).is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"--resume {path}: no such folder; give the --out folder of the run "
                                "to continue")
    raise ValueError(f"--resume {path}: no checkpoint there (no {LATEST} or {STATE_JSON}); give the "
                     "--out folder of a run started by train.py, or one of its checkpoint-<step> folders")


def read_state(path) -> tuple[Path, dict]:
    """(checkpoint folder, its trainer_state.json), checked to be readable; no tensors are read."""
    folder = find(path)
    file = folder / STATE_JSON
    try:
        state = json.loads(file.read_text())
        state["step"], state["steps"], state["progress"]["epoch"], state["progress"]["batch"]
        state["run"], state["method"], state["optimizer"]["param_groups"], state["python_rng"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{file} is corrupt ({type(e).__name__}: {e}); this checkpoint cannot be "
                         "resumed: resume from another copy or start a new run") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file} has format_version {state.get('format_version')!r}; this minipeft "
                         f"reads version {FORMAT_VERSION}")
    return folder, state


def flag_value(option: str, value):
    """A run option's value as its flag takes it (--model-dropout model: the checkpoint's own dropout)."""
    return "model" if option == "model_dropout" and value is None else value


def check_writable(folder: Path):
    """Stop before any work if `folder` (or, while it does not exist, its nearest existing parent)
    cannot be written."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {folder}: {existing} is a file, not a folder; choose another --out")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"--out {folder}: cannot write in {existing} ({e.strerror}); choose a writable "
                         "folder") from None


def run_files(out: Path) -> list[str]:
    """What a run writes in its output folder (metrics.jsonl, adapter/, latest_checkpoint,
    checkpoint-<step>/ and the temporary folders of a save) that `out` holds, by name."""
    out = Path(out)
    if not out.is_dir():
        return []
    ours = [p for p in out.iterdir()
            if p.name in RUN_FILES or CHECKPOINT_FOLDER.fullmatch(p.name) or p.name.startswith(".checkpoint-")]
    return sorted(p.name + "/" * p.is_dir() for p in ours)


def check_output_folder(out: Path, resume=None, overwrite: bool = False):
    """Stop before any work if `out` cannot be written, or if it holds another run's files (run_files):
    they are kept unless this run is that run, resumed, or `overwrite` lets it replace them."""
    out = Path(out)
    check_writable(out)
    same_run = resume is not None and run_folder(resume).resolve() == out.resolve()
    if same_run and overwrite:
        raise ValueError(f"--overwrite would delete the run that --resume {resume} continues; give one "
                         "or the other")
    found = run_files(out)
    if not found or same_run or overwrite:
        return
    try:
        folder, state = read_state(out)
        unfinished = state["step"] < state["steps"]
    except (ValueError, OSError):  # no checkpoint yet, or one that cannot be read: still another run's
        unfinished = False
    if unfinished:
        raise ValueError(f"--out {out} holds an unfinished run ({folder.name}, step {state['step']} of "
                         f"{state['steps']}); continue it with --resume {out}, replace it with --overwrite, "
                         "or choose another --out")
    raise ValueError(f"--out {out} holds another run ({', '.join(found)}); replace it with --overwrite, "
                     "choose another --out, or give none for a new folder")


def remove_run_files(out: Path) -> list[str]:
    """--overwrite: delete the previous run's files in `out` (run_files; the folder's other files stay),
    so that its metrics.jsonl, adapter and checkpoints cannot mix with this run's. Returns their names."""
    found = run_files(out)
    for name in found:
        path = Path(out) / name.rstrip("/")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


def new_run_folder(run: dict, method: str, parent: Path = RUNS) -> Path:
    """The output folder of a run given none, created now so that no other run takes it:
    <parent>/<model>-<task>-<method>-<YYYYmmdd-HHMMSS>, with -2, -3, ... if that is taken (model and
    task as `run` names them, when it does). Under torchrun every process must call this: rank 0
    creates the folder and the others get its name."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        name = [str(_create_run_folder(run, method, parent)) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(name, src=0)
        return Path(name[0])
    return _create_run_folder(run, method, parent)


def _create_run_folder(run: dict, method: str, parent: Path) -> Path:
    words = [_short_name(run[key]) for key in ("model", "task") if run.get(key) is not None]
    base = "-".join([*words, method, time.strftime("%Y%m%d-%H%M%S")])
    for n in itertools.count(1):
        folder = Path(parent) / (base if n == 1 else f"{base}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:  # a run started in the same second
            continue


def _short_name(source) -> str:
    """A model or task as a folder name takes it: a file by its stem (my_chats.jsonl -> my_chats), a
    folder by its name, a named one as it is; characters other than letters, digits, '.', '_' and '-'
    become '_'."""
    path = Path(str(source))
    return re.sub(r"[^\w.-]+", "_", path.stem if path.is_file() else path.name) or "run"

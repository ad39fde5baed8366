"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder inside the run's output folder. It is written whole into a temporary folder
and then renamed, and only then does `latest_checkpoint` (also replaced by a rename) point at it, so
a crash at any moment leaves the previous checkpoint or the new one, never half of one:

    <out>/latest_checkpoint          the name of the newest complete checkpoint folder
    <out>/checkpoint-<step>/
        adapter.safetensors          the trainable parameters        } an ordinary adapter folder
        adapter_config.json          method, options, base model     } (eval.py --adapter reads it)
        trainer_state.safetensors    every other tensor: AdamW's moments, as "optimizer.<i>.<name>"
                                     (i = the parameter's index in the optimizer), and each process's
                                     torch RNG states, as "rng.torch.<rank>" and "rng.cuda.<rank>"
        trainer_state.json           the rest: step, progress (data position: epoch and next batch;
                                     metrics so far), scheduler, the run's options, method, library
                                     versions, the optimizer's param_groups with an index of the
                                     tensors each parameter's state holds, and Python's RNG

Nothing is pickled: tensors go to safetensors, everything else to JSON. After a new checkpoint is in
place the older checkpoint-<step> folders are removed, so a run keeps one (the last good one).

The output folder around them, one run per folder, is output.py's.

Resuming (trainer.py calls these before it writes anything): `check_resumable` requires the
checkpoint's base model (by fingerprint), method, method options and run options (trainer.run_options) to
be this run's, where only where and how often a run saves, evaluates and stops may differ; `restore` then
puts the parameters, AdamW's state and the scheduler back and returns the run's progress.
"""
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minipeft.formats.adapter_io import ADAPTER_WEIGHTS, copy_parameters, save_adapter
from minipeft.formats.atomic import atomic_write
from minipeft.scale.output import CHECKPOINT_FOLDER, FORMAT_VERSION, LATEST, STATE_JSON, flag_value, read_state

STATE_TENSORS = "trainer_state.safetensors"
OLDER_VERSIONS_DID = {"precision": "fp32", "batching": "random"}  # run options added later, as they were before
FLAG_NAMES = {"max_grad_norm": "--clip", "world_size": "processes",  # for messages; else --the-name
              "device_type": "--device type", "dpo": "--beta and --dpo-loss"}


@dataclass
class Checkpoint:
    path: Path  # the checkpoint-<step> folder
    state: dict  # trainer_state.json
    tensors: dict[str, torch.Tensor]  # trainer_state.safetensors
    parameters: dict[str, torch.Tensor]  # adapter.safetensors


# ----------------------------------------------------------------------------------------------------
# saving


def save(out: Path, model, optimizer, state: dict, rng: dict[str, torch.Tensor]) -> Path:
    """Write `<out>/checkpoint-<step>` (step = state["step"]), point `latest_checkpoint` at it and
    remove older checkpoints. `state` is the JSON-able part, `rng` the RNG states (rng_states())."""
    name = f"checkpoint-{state['step']}"
    tmp = out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp)  # adapter.safetensors + adapter_config.json
    tensors, optimizer_index = _flatten_optimizer(optimizer)
    tensors.update(rng)
    save_file(tensors, str(tmp / STATE_TENSORS))
    state = {"format_version": FORMAT_VERSION, **state, "optimizer": optimizer_index,
             "python_rng": random.getstate()}
    (tmp / STATE_JSON).write_text(json.dumps(state, indent=1))
    _fsync_folder(tmp)

    final = out / name
    if final.exists():  # a checkpoint of the same step left by an earlier run in this folder
        final.rename(out / f".{name}.old-{os.getpid()}")
    tmp.rename(final)
    atomic_write(out / LATEST, lambda tmp: Path(tmp).write_text(name))
    for old in out.iterdir():  # older checkpoints, and leftovers of interrupted saves
        ours = CHECKPOINT_FOLDER.fullmatch(old.name) or old.name.startswith(".checkpoint-")
        if ours and old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _flatten_optimizer(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors by flat name, a JSON index that rebuilds it with them)."""
    state_dict = optimizer.state_dict()
    tensors, index = {}, {}
    for i, values in state_dict["state"].items():
        index[str(i)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{i}.{key}"] = value.detach().cpu().contiguous()
                index[str(i)][key] = {"tensor": f"optimizer.{i}.{key}"}
            else:
                index[str(i)][key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": index}


def rng_states(world_size: int = 1) -> dict[str, torch.Tensor]:
    """Every process's torch RNG states (CPU, and its CUDA device's), by rank. With world_size > 1
    every process must call this (it is a collective), and every process gets them all."""
    mine = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    if world_size == 1:
        return {f"rng.{kind}.0": state for kind, state in mine.items()}
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    states = {}
    for kind, state in mine.items():
        gathered = [torch.empty_like(state, device=device) for _ in range(world_size)]
        dist.all_gather(gathered, state.to(device))
        states.update({f"rng.{kind}.{rank}": s.cpu() for rank, s in enumerate(gathered)})
    return states


def _fsync_folder(folder: Path):
    """Flush the folder's files to disk, so the rename that publishes them cannot outrun them."""
    for file in folder.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------
# loading (output.find names the folder)


def load(path) -> Checkpoint:
    """Read a checkpoint completely (so a corrupt file stops the run before anything is written)."""
    folder, state = read_state(path)
    tensors = _read_safetensors(folder / STATE_TENSORS)
    parameters = _read_safetensors(folder / ADAPTER_WEIGHTS)
    return Checkpoint(folder, state, tensors, parameters)


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise ValueError(f"checkpoint {file.parent} is incomplete: {file.name} is missing; resume from "
                         "another copy or start a new run")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is corrupt or truncated ({e}); this checkpoint cannot be resumed: "
                         "resume from another copy or start a new run") from None


# ----------------------------------------------------------------------------------------------------
# restoring


def restore_parameters(model, checkpoint: Checkpoint):
    """Copy the checkpoint's trainable parameters into the model (same names and shapes, or an error)."""
    copy_parameters(model, checkpoint.parameters, f"checkpoint {checkpoint.path}")


def restore_optimizer(optimizer, checkpoint: Checkpoint):
    index = checkpoint.state["optimizer"]
    state = {}
    missing = [v["tensor"] for values in index["state"].values() for v in values.values()
               if isinstance(v, dict) and v["tensor"] not in checkpoint.tensors]
    if missing:
        raise ValueError(f"checkpoint {checkpoint.path} is incomplete: {STATE_TENSORS} lacks "
                         f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    for i, values in index["state"].items():
        state[int(i)] = {key: checkpoint.tensors[value["tensor"]] if isinstance(value, dict) else value
                         for key, value in values.items()}
    try:
        optimizer.load_state_dict({"state": state, "param_groups": index["param_groups"]})
    except (ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {checkpoint.path}: its optimizer state does not fit this run "
                         f"({e})") from None


def restore_rng(checkpoint: Checkpoint, rank: int = 0):
    """Put this process's torch RNGs (CPU, and CUDA if saved and present) and Python's RNG back where
    they were when the checkpoint was saved."""
    if f"rng.torch.{rank}" not in checkpoint.tensors:
        raise ValueError(f"checkpoint {checkpoint.path} has no RNG state for process {rank}")
    torch.set_rng_state(checkpoint.tensors[f"rng.torch.{rank}"])
    if torch.cuda.is_available() and f"rng.cuda.{rank}" in checkpoint.tensors:
        torch.cuda.set_rng_state(checkpoint.tensors[f"rng.cuda.{rank}"])
    version, internal, gauss = checkpoint.state["python_rng"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------------------------------
# resuming: is the checkpoint this run's?


def check_resumable(ckpt: Checkpoint, model, options: dict, steps: int | None = None):
    """The checkpoint must come from the same base model, method and options as this run; every
    difference is named in one message. `steps`: this run's step count; it may differ from the
    checkpoint's (--steps changed: the run goes on longer, or ends sooner) if it lies past the checkpoint's step."""
    saved_run = _saved_run_options(ckpt, options)
    differences = [_base_model_difference(ckpt, model, saved_run, options),
                   _method_difference(ckpt, model), _sharding_difference(saved_run, options)]
    changes_steps = steps is not None and steps != ckpt.state["steps"]
    if changes_steps and steps <= ckpt.state["step"]:
        differences.append((f"is at step {ckpt.state['step']}, which this run's {steps} steps do not pass",
                            f"give more than {ckpt.state['step']} --steps to continue it"))
    ignored = ("steps", "epochs") if changes_steps else ()  # they set only how many steps the run takes
    differ = [k for k in sorted(saved_run.keys() | options.keys())
              if k not in ignored and saved_run.get(k) != options.get(k)]
    if differ:
        listed = ", ".join(f"{FLAG_NAMES.get(k, '--' + k.replace('_', '-'))} {flag_value(k, saved_run.get(k))} "
                           f"(this run: {flag_value(k, options.get(k))})" for k in differ)
        differences.append((f"was made with other options: {listed}",
                            f"resume with the same options, or start a new run from its weights with "
                            f"--init-adapter {ckpt.path}"))
    differences = [d for d in differences if d is not None]
    if differences:
        what = [d[0] for d in differences]
        what = what[0] if len(what) == 1 else ", ".join(what[:-1]) + " and " + what[-1]
        raise ValueError(f"checkpoint {ckpt.path} {what}; {'; '.join(d[1] for d in differences)}")


def _saved_run_options(ckpt: Checkpoint, options: dict) -> dict:
    """The checkpoint's run options; those checkpoints of older versions do not record: what those
    versions always did (when this run records the option at all), or this run's."""
    older_defaults = {k: v for k, v in OLDER_VERSIONS_DID.items() if k in options}
    return {**older_defaults, "device_type": options.get("device_type"), **ckpt.state["run"]}


def _base_model_difference(ckpt: Checkpoint, model, saved_run: dict, options: dict):
    saved, mine = ckpt.state["method"], model.peft_config
    if saved.get("base_fingerprint") != mine["base_fingerprint"]:
        return (f"was trained on another base model ({saved_run.get('model', 'unknown')}, fingerprint "
                f"{saved.get('base_fingerprint')}) than this run's ({options.get('model', 'this model')}, "
                f"fingerprint {mine['base_fingerprint']})", "resume with the model it was trained on")
    return None


def _method_difference(ckpt: Checkpoint, model):
    saved, mine = ckpt.state["method"], model.peft_config
    my_options = json.loads(json.dumps(mine["options"]))
    if saved.get("method") != mine["method"] or saved.get("options") != my_options:
        return (f"is method {saved.get('method')} {saved.get('options')}, but this run is {mine['method']} "
                f"{my_options}", "resume with the checkpoint's method and options")
    return None


def _sharding_difference(saved_run: dict, options: dict):
    if saved_run.get("sharding") == options.get("sharding"):
        return None
    n, was_sharded = saved_run.get("world_size"), saved_run.get("sharding")
    made = f"with --fsdp on {n} processes" if was_sharded else f"without --fsdp ({n} process{'es' * (n != 1)})"
    fix = f"with torchrun --nproc_per_node {n} train.py ... --fsdp" if was_sharded else "without --fsdp"
    return (f"was saved by a run {made}, but this run {'shards' if options.get('sharding') else 'does not shard'} "
            "the model", f"resume it {fix}")


def restore(ckpt: Checkpoint, model, optimizer, scheduler, progress_type):
    """Trainable parameters, optimizer and scheduler as saved, and the run's progress as `progress_type`
    (trainer.Progress); the RNG comes back later, just before the first step (restore_rng)."""
    restore_parameters(model, ckpt)
    restore_optimizer(optimizer, ckpt)
    try:
        scheduler.load_state_dict(ckpt.state["scheduler"])
        return progress_type(**ckpt.state["progress"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {ckpt.path}: {STATE_JSON} is corrupt ({e}); resume "
                         "from another copy or start a new run") from None

"""Watching a run: the rows of metrics.jsonl also go to a CSV file, TensorBoard or Weights & Biases
(`train.py --log csv,tensorboard,wandb`), and every run ends with a plot of its loss, learning rate and
validation metric (<out>/plot.png), also when it stops early.

Each is a MetricsLog writer (trainer.py): opened with the run's folder once every check has passed, it
gets every row the run records and is closed at the end. The scalars of a row, by group:

    train        loss, grad_norm, lr (loss_scale under fp16-mixed) of every step
    validation   the validation metrics at the steps they are taken (accuracy; loss and perplexity;
                 exact_match ...)
    test         the test split's metrics before training (step 0) and after (the last step)

    metrics.csv           one row per event: event, step, then train columns by name and the others as
                          validation_<name>, test_<name> (a column first seen later rewrites the file)
    tensorboard/          event files, scalars tagged <group>/<name>: tensorboard --logdir <out>
    wandb/                a W&B run (project minipeft, or $WANDB_PROJECT); offline, to sync later with
                          `wandb sync`, unless logged in or WANDB_MODE says otherwise
    plot.png              drawn from metrics.jsonl, so a resumed run's plot holds all its steps
"""
import argparse
import csv
import importlib.util
import io
import json
import math
import os
from pathlib import Path

from minipeft.formats.atomic import atomic_write

LOGGERS = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb"}  # name -> the package it needs
DEFAULT_LOG = "csv"
HEADLINE = ("accuracy", "exact_match", "choice_accuracy", "perplexity")  # the validation metric plotted


def add_log_flag(parser: argparse.ArgumentParser):
    parser.add_argument("--log", type=log_list, default=DEFAULT_LOG, metavar="LIST",
                        help="where the metrics go besides metrics.jsonl, comma-separated: csv (metrics.csv), "
                             "tensorboard (<out>/tensorboard; pip install tensorboard), wandb (Weights & Biases; "
                             "offline unless logged in; pip install wandb), or none. Every run also ends with "
                             "plot.png: loss, learning rate and validation metric over the steps")


def log_list(text: str) -> tuple[str, ...]:
    """--log: the loggers named, each checked to be known and installed."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if names == ("none",):
        names = ()
    if "none" in names:
        raise argparse.ArgumentTypeError(f"none means no logger, so it cannot go with others (got {text!r}); "
                                         "give none alone, or leave it out")
    for name in names:
        if name not in LOGGERS:
            raise argparse.ArgumentTypeError(f"unknown logger {name!r}; choose from {', '.join(LOGGERS)} or none")
        if LOGGERS[name] and importlib.util.find_spec(LOGGERS[name]) is None:
            raise argparse.ArgumentTypeError(f"{name} needs the {LOGGERS[name]} package: pip install "
                                             f"{LOGGERS[name]}, or leave {name} out of --log")
    if importlib.util.find_spec("matplotlib") is None:
        raise argparse.ArgumentTypeError("the plot every run ends with needs matplotlib: pip install matplotlib")
    return names


def writers(names, settings: dict) -> list:
    """MetricsLog writers for the loggers `names` (log_list), then the plot. `settings`: the run's
    (runconfig.run_settings), which W&B keeps as the run's config."""
    made = {"csv": CsvLog, "tensorboard": TensorBoardLog, "wandb": lambda folder: WandbLog(folder, settings)}
    return [made[name] for name in names] + [Plot]


def scalars(row: dict) -> tuple[str, int, dict] | None:
    """(group, step, {name: number}) of a metrics.jsonl row, or None for rows that hold no metrics."""
    event = row.get("event")
    if event == "step":
        group, step, values = "train", row["step"], row
    elif event == "validation":
        group, step, values = "validation", row["step"], row
    elif event == "test_before":
        group, step, values = "test", 0, row
    elif event == "summary":
        group, step, values = "test", row["steps"], row.get("test_after") or {}
    else:
        return None
    numbers = {k: v for k, v in values.items()
               if k not in ("event", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return group, step, numbers


# ----------------------------------------------------------------------------------------------------
# the loggers


class CsvLog:
    """<out>/metrics.csv, rebuilt from this run's rows of metrics.jsonl when opened (a resumed run
    continues it), then a row per event."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "metrics.csv"
        self.columns, self.rows = ["event", "step", "loss", "grad_norm", "lr"], []
        for row in read_rows(Path(folder) / "metrics.jsonl"):
            self.add(row)
        self.rewrite()

    def add(self, row: dict) -> bool:
        """Keep the row's scalars; True if the file must be written anew (a new column, or a new run)."""
        if row.get("event") == "start":  # a new run in this folder: an earlier run's rows go
            self.rows = []
            return True
        found = scalars(row)
        if found is None:
            return False
        group, step, numbers = found
        event = "test_after" if row["event"] == "summary" else row["event"]
        flat = {"event": event, "step": step,
                **{(name if group == "train" else f"{group}_{name}"): v for name, v in numbers.items()}}
        new = [k for k in flat if k not in self.columns]
        self.columns += new
        self.rows.append(flat)
        return bool(new)

    def rewrite(self):
        text = io.StringIO()
        table = csv.DictWriter(text, self.columns, lineterminator="\n")
        table.writeheader()
        table.writerows(self.rows)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text.getvalue()))

    def record(self, row: dict):
        if self.add(row):
            self.rewrite()
        elif scalars(row) is not None:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns, lineterminator="\n").writerow(self.rows[-1])

    def close(self):
        pass


class TensorBoardLog:
    """Event files in <out>/tensorboard (torch.utils.tensorboard, which needs the tensorboard package)."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(Path(folder) / "tensorboard"))

    def record(self, row: dict):
        if (found := scalars(row)) is not None:
            group, step, numbers = found
            for name, value in numbers.items():
                self.writer.add_scalar(f"{group}/{name}", value, step)
            self.writer.flush()

    def close(self):
        self.writer.close()


class WandbLog:
    """A Weights & Biases run in <out>/wandb: online when logged in (or WANDB_MODE=online), else offline
    (no account needed; `wandb sync <out>/wandb/offline-run-*` uploads it later)."""

    def __init__(self, folder: Path, settings: dict):
        import wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb.login(prompt=False) else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minipeft"), name=Path(folder).name,
                              dir=str(folder), config=settings, mode=mode,
                              settings=wandb.Settings(console="off"))

    def record(self, row: dict):
        if (found := scalars(row)) is not None:
            group, step, numbers = found
            self.run.log({f"{group}/{name}": value for name, value in numbers.items()}, step=step)

    def close(self):
        self.run.finish()


def read_rows(path: Path) -> list[dict]:
    """This run's rows of a metrics.jsonl file: from its last "start" row on (a folder may hold an earlier
    run's rows before it; a resume adds no "start"). None if there is no file; a line cut short by a crash
    is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    starts = [i for i, row in enumerate(rows) if row.get("event") == "start"]
    return rows[starts[-1]:] if starts else rows


# ----------------------------------------------------------------------------------------------------
# the plot


class Plot:
    """Draws <out>/plot.png from <out>/metrics.jsonl when the run ends (close), however it ends."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def record(self, row: dict):
        pass

    def close(self):
        rows = read_rows(self.folder / "metrics.jsonl")
        if any(r.get("event") == "step" for r in rows):
            plot(rows, self.folder / "plot.png")


def plot(rows: list[dict], path: Path):
    """Three panels over the steps: training loss (and validation loss, where measured), learning rate,
    and the validation metric (HEADLINE's first that the run measures); saved to `path` as PNG and
    returned (a matplotlib Figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = [r for r in rows if r.get("event") == "step"]
    validation = [r for r in rows if r.get("event") == "validation"]
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax, metric_ax = fig.subplots(1, 3)
    finite = [(r["step"], r["loss"]) for r in steps if r.get("loss") is not None and math.isfinite(r["loss"])]
    if finite:
        loss_ax.plot(*zip(*finite), lw=1, label="training")
    if valid_loss := [(r["step"], r["loss"]) for r in validation if "loss" in r]:
        loss_ax.plot(*zip(*valid_loss), "o-", label="validation")
    loss_ax.set(title="loss", xlabel="step")
    if finite or valid_loss:  # (every step non-finite: no line to name)
        loss_ax.legend()
    lr_ax.plot([r["step"] for r in steps], [r["lr"] for r in steps], lw=1)
    lr_ax.set(title="learning rate", xlabel="step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    metric = next((m for m in HEADLINE if any(m in r for r in validation)), None)
    if metric:
        metric_ax.plot([r["step"] for r in validation if metric in r], [r[metric] for r in validation if metric in r],
                       "o-", color="tab:green")
    else:
        metric_ax.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=metric_ax.transAxes)
    metric_ax.set(title=f"validation {metric or 'metric'}", xlabel="step")
    for ax in (loss_ax, lr_ax, metric_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(path.parent.name)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return fig

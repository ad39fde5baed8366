"""Watching a run: metrics.csv, TensorBoard event files and an offline W&B run hold what metrics.jsonl
holds (read back with the csv module, tensorboard's own reader and wandb's own record format), plot.png
ends every run (also one stopped early, and a resumed one covers every step), the progress bar's s/step
is the summary's, and a logger that is unknown or not installed stops before anything is written."""
import csv
import io
import json
import re
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
from pathlib import Path

import train as train_cli
from minipeft.run import watch
from test_robust import run_main, words

tensorboard = pytest.importorskip("tensorboard")
wandb = pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("watch") / "text.txt"
    path.write_text(words(200))
    return path


def args(text, out, *extra):
    return ["--model", "tiny-gpt2", "--task", text, "--max-len", "16", "--batch-size", "4", "--steps", "6",
            "--eval-every", "2", "--out", out, *extra]


def rows(out, event):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


@pytest.fixture(scope="module")
def watched(text, tmp_path_factory):
    """A run logged everywhere: (its folder, what it printed on stdout, on stderr)."""
    out = tmp_path_factory.mktemp("runs") / "watched"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as env, redirect_stdout(stdout), redirect_stderr(stderr):
        env.setenv("WANDB_MODE", "offline")  # no account needed
        env.setenv("WANDB_SILENT", "true")
        train_cli.main([str(a) for a in args(text, out, "--log", "csv,tensorboard,wandb")])
    return out, stdout.getvalue(), stderr.getvalue()


def test_csv_holds_the_steps_and_validations(watched):
    out, _, _ = watched
    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    steps = [r for r in table if r["event"] == "step"]
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4, 5, 6]
    for row, logged in zip(steps, rows(out, "step")):
        assert float(row["loss"]) == logged["loss"] and float(row["lr"]) == logged["lr"]
    validations = [r for r in table if r["event"] == "validation"]
    assert [(int(r["step"]), float(r["validation_perplexity"])) for r in validations] == \
        [(r["step"], r["perplexity"]) for r in rows(out, "validation")]
    assert [r["event"] for r in table if r["event"].startswith("test")] == ["test_before", "test_after"]


def test_tensorboard_events_hold_the_scalars(watched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _, _ = watched
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "validation/perplexity", "test/perplexity"} <= \
        set(events.Tags()["scalars"])
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows(out, "step")]
    assert [e.step for e in events.Scalars("test/perplexity")] == [0, 6]


def wandb_history(run_file) -> list[dict]:
    """The history rows of an offline W&B run file: records in leveldb's log format (32 KiB blocks; each
    record a 7-byte header: crc32, length, type 1 whole / 2 first / 3 middle / 4 last piece) after a
    7-byte file header, each a wandb Record protobuf."""
    from wandb.proto import wandb_internal_pb2
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, pieces, history = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
    return history


def test_wandb_offline_run_holds_the_scalars(watched):
    out, _, _ = watched
    run_file = next((out / "wandb").glob("offline-run-*/run-*.wandb"))
    history = wandb_history(run_file)
    logged = {row["_step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert logged == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in rows(out, "step")}
    assert any("validation/perplexity" in row for row in history)


def test_progress_bar_and_summary_agree_on_seconds_per_step(watched):
    _, stdout, stderr = watched
    summary = re.search(r"\(([\d.]+) s/step\)", stdout).group(1)
    bar = re.findall(r"([\d.]+) s/step", stderr)[-1]  # the bar's last state: after the last step
    assert bar == summary


def test_plot_ends_every_run(watched, text, tmp_path, capsys):
    from matplotlib.image import imread
    out, _, _ = watched
    assert imread(out / "plot.png").shape[:2] == (360, 1200)
    stopped = tmp_path / "stopped"
    code, err = run_main(train_cli.main, args(text, stopped, "--stop-at", "3"), capsys)
    assert code == 0 and "reached --stop-at" in err
    assert (stopped / "plot.png").is_file() and (stopped / "metrics.csv").is_file()
    code, err = run_main(train_cli.main, ["--resume", stopped], capsys)
    assert code == 0, err
    with open(stopped / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r["event"] == "step"] == [1, 2, 3, 4, 5, 6]


def test_plot_shows_loss_lr_and_the_validation_metric(tmp_path):
    """The three panels' lines hold the logged values (read back from the figure the PNG is drawn from)."""
    logged = [{"event": "step", "step": s, "loss": 3.0 / s, "lr": 1e-3 * (1 - s / 4), "grad_norm": 1.0}
              for s in range(1, 5)]
    logged += [{"event": "validation", "step": 2, "accuracy": 0.6}, {"event": "validation", "step": 4, "accuracy": 0.7}]
    figure = watch.plot(logged, tmp_path / "plot.png")
    loss_ax, lr_ax, metric_ax = figure.axes
    assert list(loss_ax.lines[0].get_ydata()) == [3.0, 1.5, 1.0, 0.75]
    assert list(lr_ax.lines[0].get_ydata()) == [r["lr"] for r in logged[:4]]
    assert metric_ax.get_title() == "validation accuracy" and list(metric_ax.lines[0].get_ydata()) == [0.6, 0.7]
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_or_missing_logger_stops_before_writing(text, tmp_path, capsys, monkeypatch):
    code, err = run_main(train_cli.main, args(text, tmp_path / "a", "--log", "csv,mlflow"), capsys)
    assert code == 2 and "unknown logger 'mlflow'; choose from csv, tensorboard, wandb or none" in err
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    code, err = run_main(train_cli.main, args(text, tmp_path / "b", "--log", "tensorboard"), capsys)
    assert code == 2 and "tensorboard needs the tensorboard package: pip install tensorboard" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_earlier_runs_rows_stay_out(text, tmp_path, capsys):
    """A folder whose metrics.jsonl holds an earlier, finished run: the CSV and the plot are this run's."""
    out = tmp_path / "run"
    assert run_main(train_cli.main, args(text, out, "--steps", "3"), capsys)[0] == 0
    assert run_main(train_cli.main, args(text, out, "--steps", "2", "--overwrite"), capsys)[0] == 0
    with open(out / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r["event"] == "step"] == [1, 2]
    plotted = watch.read_rows(out / "metrics.jsonl")  # what plot.png is drawn from
    assert [r["step"] for r in plotted if r["event"] == "step"] == [1, 2]


def test_a_run_records_the_commit_of_a_checkout_or_a_worktree(tmp_path):
    """versions()["minipeft"] is the checkout's commit as git names it, in a clone and in a git worktree."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    code = "from minipeft.run.report import _git_commit; print(_git_commit())"
    worktree = tmp_path / "worktree"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(worktree)], cwd=root, check=True)
    try:
        for checkout in (root, worktree):
            expected = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True,
                                      text=True, check=True).stdout.strip()[:12]
            found = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True)
            assert found.stdout.strip() == expected, found.stderr
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=root, check=False)

"""Robust training (issue 8): checkpoints that resume bit-identically, Ctrl-C / SIGTERM that save
before stopping, the non-finite-step guard, --init-adapter, and bad input that stops with one clear
line, exit code 2, no traceback, and no existing file changed.

Everything runs train.py's / eval.py's `main` in-process through `cli.run` (so exit codes and
messages are exactly what a user sees), except the tests that stop a run with a signal, which need a
real process."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import eval as eval_cli
import minipeft as mp
import train as train_cli
from minipeft.scale import checkpoint, output, processes
from minipeft.run import cli
from minipeft.core import loop
from minipeft.run import trainer
from conftest import tiny_model

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------
# helpers and shared runs


def words(n: int, seed: int = 0) -> str:
    import random
    rng = random.Random(seed)
    vocab = "the cat sat on a mat and then it ran far away from home to see the wide world".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("robust")


@pytest.fixture(scope="module")
def text(folder):
    """~40 windows of 16 byte tokens: a causal-LM task that trains in milliseconds per step."""
    path = folder / "text.txt"
    path.write_text(words(160))
    return path


@pytest.fixture(scope="module")
def reviews(folder):
    path = folder / "reviews.csv"
    rows = ["text,label"] + [f"{'great' if i % 2 else 'awful'} film {i},{i % 2}" for i in range(60)]
    path.write_text("\n".join(rows) + "\n")
    return path


def lm_args(text, out, *extra):
    """A short LoRA run on tiny-gpt2 into `out` (None: no --out)."""
    return ["--model", "tiny-gpt2", "--task", text, "--max-len", "16", "--batch-size", "4", "--steps", "8",
            "--eval-every", "100", *(["--out", out] if out is not None else []), *extra]


def run_main(main, args, capsys):
    """main(args) through cli.run, as the command line runs it: (exit code, stderr)."""
    try:
        cli.run(main, [str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def hashes(path: Path) -> dict:
    """Every file's sha256 and every folder (the top one too) under `path`: {} if it does not exist."""
    if path is None or not Path(path).exists():
        return {}
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "folder"
            for f in sorted([Path(path), *Path(path).rglob("*")])}


def step_losses(out: Path) -> dict:
    """step -> logged loss; a step logged twice (redone after a resume) keeps its last row."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["event"] == "step"}


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished(folder, text):
    """A finished run: its folder is the --out of the bad-input cases, which must not change it."""
    out = folder / "finished"
    train_cli.main([str(a) for a in lm_args(text, out, "--save-every", "4")])
    return out


@pytest.fixture(scope="module")
def unfinished(folder, text):
    """A run stopped after step 4 of 8, to resume (or to wrongly start over)."""
    out = folder / "unfinished"
    with pytest.raises(trainer.Stopped):
        train_cli.main([str(a) for a in lm_args(text, out, "--stop-at", "4")])
    return out


@pytest.fixture(scope="module")
def other_base_adapter(folder, text):
    out = folder / "llama"
    train_cli.main([str(a) for a in lm_args(text, out, "--model", "tiny-llama", "--steps", "1")])
    return out / "adapter"


def truncate(file: Path):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


GPT2_CONFIG = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 257, "n_positions": 64,
               "layer_norm_epsilon": 1e-5}


def hf_gpt2_folder(folder: Path) -> Path:
    """A complete 1-layer GPT-2 folder as transformers saves it (config.json, model.safetensors with
    Conv1D (in, out) weights, tokenizer.json), for breaking one file at a time."""
    from safetensors.torch import save_file

    from minipeft.formats.pretrained import byte_tokenizer
    folder.mkdir()
    d = GPT2_CONFIG["n_embd"]
    shapes = {"wte.weight": (257, d), "wpe.weight": (64, d), "ln_f.weight": (d,), "ln_f.bias": (d,),
              "h.0.ln_1.weight": (d,), "h.0.ln_1.bias": (d,), "h.0.ln_2.weight": (d,), "h.0.ln_2.bias": (d,),
              "h.0.attn.c_attn.weight": (d, 3 * d), "h.0.attn.c_attn.bias": (3 * d,),
              "h.0.attn.c_proj.weight": (d, d), "h.0.attn.c_proj.bias": (d,),
              "h.0.mlp.c_fc.weight": (d, 4 * d), "h.0.mlp.c_fc.bias": (4 * d,),
              "h.0.mlp.c_proj.weight": (4 * d, d), "h.0.mlp.c_proj.bias": (d,)}
    save_file({k: torch.randn(shape) * 0.02 for k, shape in shapes.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(GPT2_CONFIG))
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


# ----------------------------------------------------------------------------------------------------
# bad input: one line, exit code 2, no traceback, nothing changed


def bad_train_inputs(tmp, text, reviews, finished, unfinished, other_base_adapter):
    """(name, train.py arguments, message, folder that must not change). Unless a case gives its own,
    the --out is tmp/"new", which must not come to exist."""
    fin = ["--out", tmp / "new"]
    lm = lambda *extra: lm_args(text, tmp / "new", *extra)  # noqa: E731
    cls = lambda task, *extra: ["--model", "tiny-bert", "--task", task, "--batch-size", "4", "--steps", "2",  # noqa: E731
                                *fin, *extra]

    def make(name, content: bytes | str):
        path = tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    corrupt_model = tmp / "corrupt-model"
    corrupt_model.mkdir()
    (corrupt_model / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 50, "n_positions": 64,
         "layer_norm_epsilon": 1e-5}))
    (corrupt_model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    bad_config = hf_gpt2_folder(tmp / "bad-config")
    (bad_config / "config.json").write_text('{"model_type": "gpt2", "n_embd": ')
    short_config = hf_gpt2_folder(tmp / "short-config")
    (short_config / "config.json").write_text(json.dumps({k: v for k, v in GPT2_CONFIG.items() if k != "n_head"}))
    bad_tokenizer = hf_gpt2_folder(tmp / "bad-tokenizer")
    truncate(bad_tokenizer / "tokenizer.json")
    split_dir = tmp / "splits"
    split_dir.mkdir()
    (split_dir / "train.csv").write_text("text,label\ngood,pos\nbad,neg\nfine,pos\nawful,neg\n")
    (split_dir / "validation.csv").write_text("text,label\nok,pos\nmeh,maybe\n")
    (split_dir / "test.csv").write_text("text,label\nnice,pos\nugly,neg\n")
    a_file = make("a-file", "not a folder")

    def copy_of(run, name):
        copy = tmp / name
        shutil.copytree(run, copy)
        return copy

    bad_adapter = copy_of(finished / "adapter", "bad-adapter")
    truncate(bad_adapter / "adapter.safetensors")
    bad_json = copy_of(unfinished, "bad-json")
    (bad_json / "checkpoint-4" / "trainer_state.json").write_text('{"step": 4, "steps": ')
    bad_state = copy_of(unfinished, "bad-state")
    truncate(bad_state / "checkpoint-4" / "trainer_state.safetensors")
    bad_params = copy_of(unfinished, "bad-params")
    truncate(bad_params / "checkpoint-4" / "adapter.safetensors")
    dangling = copy_of(unfinished, "dangling")
    shutil.rmtree(dangling / "checkpoint-4")
    crashed = tmp / "crashed"  # a run that stopped before its first checkpoint
    crashed.mkdir()
    shutil.copy(unfinished / "metrics.jsonl", crashed)
    resume = lambda run, *extra: [*lm_args(text, run, "--resume", run), *extra]  # noqa: E731

    return [
        ("unknown model", ["--model", "gpt5", *fin], "'gpt5' is not a named model (minilm, smollm2", finished),
        ("missing model folder", ["--model", tmp / "nowhere", *fin], "nor an existing HF folder", finished),
        ("corrupt model weights", ["--model", corrupt_model, "--task", reviews, *fin], "corrupt or truncated",
         finished),
        ("corrupt config.json", lm("--model", bad_config), "config.json is corrupt or truncated", finished),
        ("config.json without a needed key", lm("--model", short_config),
         "config.json has no 'n_head', which a gpt2 config needs", finished),
        ("corrupt tokenizer.json", lm("--model", bad_tokenizer), "tokenizer.json is corrupt or truncated", finished),
        ("unknown task", lm("--task", "imdb"), "unknown data source 'imdb'", finished),
        ("unknown method", lm("--method", "lorax"), "unknown method 'lorax' (did you mean 'lora'?); valid methods are: "
         "full", finished),
        ("option of another method", lm("--method", "prompt", "--rank", "4"),
         "unknown option(s) ['rank'] for method 'prompt'", finished),
        ("unknown flag", lm("--rnak", "4"), "unrecognized arguments: --rnak", finished),
        ("unknown target", lm("--targets", "q,x"), "unknown target(s) ['x']", finished),
        ("rank 0", lm("--rank", "0"), "LoRA rank must be >= 1, got 0", finished),
        ("rank larger than the layer", lm("--rank", "65"), "LoRA rank 65 is larger than the layer (64×64)",
         finished),
        ("max-len beyond the positions", lm("--max-len", "600"),
         "--max-len 600 does not fit tiny-gpt2: it has 512 positions; use --max-len 512 or less", finished),
        ("max-len plus virtual tokens", cls(reviews, "--model", "tiny-gpt2", "--method", "prompt", "--length", "20",
                                            "--max-len", "500"),
         "512 positions minus 20 virtual tokens of the method; use --max-len 492 or less", finished),
        ("batch size 0", lm("--batch-size", "0"), "--batch-size must be >= 1, got 0", finished),
        ("negative learning rate", lm("--lr", "-1"), "--lr must be a finite number > 0, got -1.0", finished),
        ("batch larger than the data", lm("--batch-size", "1000"), "fewer than one batch of 1000", finished),
        ("empty data file", cls(make("empty.csv", "")), "empty.csv is empty", finished),
        ("no text column", cls(make("notext.csv", "review,label\ngood,1\n")), "has no 'text' column", finished),
        ("no label column", cls(make("nolabel.csv", "text,stars\ngood,5\n")), "has no 'label' column", finished),
        ("unknown label", cls(split_dir), "line 3 has label 'maybe', which never occurs in the training data",
         finished),
        ("not UTF-8", cls(make("latin1.csv", "text,label\ngood,1\nna\xefve,0\n".encode("latin-1"))),
         "is not UTF-8 text (line 3 has an invalid byte)", finished),
        ("malformed JSON line", cls(make("bad.jsonl", '{"text": "good", "label": 1}\n{"text": bad}\n')),
         "bad.jsonl line 2 is not valid JSON", finished),
        ("output folder is a file", lm("--out", a_file / "run"), "is a file, not a folder", finished),
        ("output folder holds an unfinished run", lm("--out", unfinished),
         f"holds an unfinished run (checkpoint-4, step 4 of 8); continue it with --resume {unfinished}, replace "
         "it with --overwrite, or choose another --out", unfinished),
        ("output folder holds a finished run", lm("--out", finished),
         "holds another run (adapter/, checkpoint-8/, config.yaml, latest_checkpoint, metrics.csv, metrics.jsonl, "
         "plot.png); replace it with "
         "--overwrite, choose another --out, or give none for a new folder", finished),
        ("output folder holds a run stopped before its first checkpoint", lm("--out", crashed),
         "holds another run (metrics.jsonl)", crashed),
        ("--overwrite of the run --resume continues", resume(unfinished, "--overwrite"),
         f"--overwrite would delete the run that --resume {unfinished} continues", unfinished),
        # --overwrite removes the old run only once every check has passed, also the trainer's own
        ("--overwrite with a batch larger than the data", lm("--out", finished, "--overwrite", "--batch-size", "1000"),
         "fewer than one batch of 1000", finished),
        ("--overwrite, resuming a checkpoint of another base model",
         lm("--out", finished, "--overwrite", "--resume", unfinished, "--model", "tiny-llama"),
         "was trained on another base model", finished),
        ("resume into another unfinished run", lm("--resume", finished, "--out", unfinished),
         "holds an unfinished run", unfinished),
        ("missing init adapter", lm("--init-adapter", tmp / "no-adapter"), "is not an adapter folder", finished),
        ("truncated init adapter", lm("--init-adapter", bad_adapter), "corrupt or truncated", finished),
        ("init adapter of another base model", lm("--init-adapter", other_base_adapter), "another base model",
         finished),
        ("init adapter with other options", lm("--init-adapter", finished / "adapter", "--rank", "2"),
         "'rank': 8", finished),
        ("resume of nothing", lm("--resume", tmp / "never-ran"), "no such folder", finished),
        ("resume of a folder without a checkpoint", lm("--resume", tmp), "no checkpoint there", finished),
        ("resume with a corrupt trainer_state.json", resume(bad_json), "trainer_state.json is corrupt", bad_json),
        ("resume with truncated optimizer state", resume(bad_state),
         "trainer_state.safetensors is corrupt or truncated", bad_state),
        ("resume with truncated parameters", resume(bad_params), "adapter.safetensors is corrupt or truncated",
         bad_params),
        ("resume whose latest checkpoint is gone", resume(dangling), "is not a complete checkpoint folder", dangling),
        ("resume on another base model", resume(unfinished, "--model", "tiny-llama"),
         "was trained on another base model (tiny-gpt2", unfinished),
        ("resume with other method options", resume(unfinished, "--rank", "2"), "is method lora", unfinished),
        ("resume with another method", resume(unfinished, "--method", "adapter"), "is method lora", unfinished),
        ("resume with other options", resume(unfinished, "--lr", "0.003"),
         "other options: --lr 0.002 (this run: 0.003)", unfinished),
        ("resume with other batching", resume(unfinished, "--batching", "random"),
         "other options: --batching by-length (this run: random)", unfinished),
        ("resume with the checkpoint's own dropout", resume(unfinished, "--model-dropout", "model"),
         "other options: --model-dropout 0.0 (this run: model)", unfinished),
        ("resume with another batch size", resume(unfinished, "--batch-size", "2"),
         "--batch-size 4 (this run: 2)", unfinished),
    ]


def test_bad_train_input_is_one_clear_error(tmp_path, capsys, text, reviews, finished, unfinished,
                                             other_base_adapter):
    cases = bad_train_inputs(tmp_path, text, reviews, finished, unfinished, other_base_adapter)
    assert len(cases) >= 30
    failures = []
    for name, args, message, keep in cases:
        before = hashes(keep)
        code, err = run_main(train_cli.main, args, capsys)
        problems = [f"{tmp_path / 'new'} was created"] if (tmp_path / "new").exists() else []
        if code != 2:
            problems.append(f"exit code {code}")
        if "Traceback" in err:
            problems.append("traceback")
        if message not in err:
            problems.append(f"message {message!r} not in {err[-400:]!r}")
        if hashes(keep) != before:
            problems.append(f"{keep} changed")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)


def test_bad_eval_input_is_one_clear_error(tmp_path, capsys, text, finished):
    bad_adapter = tmp_path / "adapter"
    shutil.copytree(finished / "adapter", bad_adapter)
    truncate(bad_adapter / "adapter.safetensors")
    long_text = tmp_path / "long.txt"
    long_text.write_text(words(600))
    cases = [
        (["--model", "tiny-gpt2", "--adapter", tmp_path / "none", "--task", text], "is not an adapter folder"),
        (["--model", "tiny-gpt2", "--adapter", bad_adapter, "--task", text], "corrupt or truncated"),
        (["--model", "tiny-bert", "--adapter", finished / "adapter", "--task", text], "another base model"),
        (["--model", "tiny-gpt2", "--task", long_text, "--max-len", "600"], "longer than the model's 512"),
        (["--model", "gpt5"], "is not a named model"),
    ]
    for args, message in cases:
        before = hashes(finished)
        code, err = run_main(eval_cli.main, args, capsys)
        assert (code, "Traceback" in err) == (2, False), (args, err)
        assert message in err, (args, err)
        assert hashes(finished) == before


def test_debug_shows_the_traceback(capsys, text, unfinished):
    code, err = run_main(train_cli.main, [*lm_args(text, unfinished, "--resume", unfinished, "--lr", "0.5"),
                                          "--debug"], capsys)
    assert code == 2 and "Traceback" in err and "other options" in err


def unwritable_folder(tmp_path) -> Path:
    """A folder this process cannot create files in: a read-only one, or (as root, who may write
    anywhere) sysfs's top folder, where nobody can create files."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked
    if " /sys sysfs " not in Path("/proc/mounts").read_text():
        pytest.skip("running as root without sysfs at /sys: no folder is unwritable")
    return Path("/sys")


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_unwritable_output_folder(tmp_path, capsys, text):
    locked = unwritable_folder(tmp_path)
    code, err = run_main(train_cli.main, lm_args(text, locked / "minipeft-run"), capsys)
    assert code == 2 and "Traceback" not in err
    assert f"cannot write in {locked}" in err and "choose a writable folder" in err
    assert not (locked / "minipeft-run").exists()


# ----------------------------------------------------------------------------------------------------
# one run per output folder: --overwrite, and a folder of its own without --out


def run_printing(args, capsys) -> tuple[int, str]:
    """train.py's main(args) through cli.run: (exit code, what it printed on stdout and stderr)."""
    code = 0
    try:
        cli.run(train_cli.main, [str(a) for a in args])
    except SystemExit as e:
        code = e.code
    printed = capsys.readouterr()
    return code, printed.out + printed.err


def events(out: Path) -> list[str]:
    return [json.loads(line)["event"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_overwrite_replaces_another_run_and_keeps_other_files(tmp_path, text, finished, capsys):
    old = tmp_path / "old"
    shutil.copytree(finished, old)
    (old / "notes.txt").write_text("the user's own file")
    (old / "adapter" / "from_the_old_run.txt").write_text("goes with the old adapter")  # folders go whole
    old_adapter = hashes(old / "adapter")
    code, printed = run_printing(lm_args(text, old, "--steps", "2", "--overwrite"), capsys)
    assert code == 0, printed
    assert (f"--overwrite: removed the previous run's adapter/, checkpoint-8/, config.yaml, latest_checkpoint, "
            f"metrics.csv, metrics.jsonl, plot.png from {old}") in printed
    assert events(old).count("start") == 1 and step_losses(old).keys() == {1, 2}  # no row of the old run
    assert sorted(p.name for p in old.iterdir()) == ["adapter", "checkpoint-2", "config.yaml", "latest_checkpoint",
                                                     "metrics.csv", "metrics.jsonl", "notes.txt", "plot.png"]
    assert (old / "notes.txt").read_text() == "the user's own file"
    assert hashes(old / "adapter") != old_adapter and not (old / "adapter" / "from_the_old_run.txt").exists()


def test_runs_without_out_get_new_folders_of_their_own(tmp_path, text, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the runs' folders go to ./checkpoints
    args = lm_args(text, None, "--steps", "2")
    folders, contents = [], []
    for _ in range(2):
        code, printed = run_printing(args, capsys)
        assert code == 0, printed
        new = sorted(set((tmp_path / "checkpoints").iterdir()) - set(folders))
        assert len(new) == 1, new
        folder = new[0].relative_to(tmp_path)
        assert re.fullmatch(r"tiny-gpt2-text-lora-\d{8}-\d{6}(-\d+)?", folder.name)
        assert printed.splitlines()[0].endswith(f", output in {folder}")  # named on the first line
        assert f"output folder        {folder}" in printed  # and after the summary
        assert events(folder).count("start") == 1 and step_losses(folder).keys() == {1, 2}
        folders.append(new[0])
        contents.append(hashes(new[0]))
    assert hashes(folders[0]) == contents[0]  # the second run did not touch the first's folder


def test_a_run_without_out_that_fails_leaves_no_folder(tmp_path, text, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = lm_args(text, None, "--batch-size", "1000")
    code, printed = run_printing(args, capsys)
    assert code == 2 and "fewer than one batch of 1000" in printed
    assert not list((tmp_path / "checkpoints").iterdir())


def test_new_run_folders_started_in_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.setattr(output.time, "strftime", lambda _: "20260101-120000")  # both in one second
    run = {"model": "smollm2", "task": tmp_path / "my data.jsonl"}
    (tmp_path / "my data.jsonl").write_text("")
    a, b = (output.new_run_folder(run, "lora", parent=tmp_path / "runs") for _ in range(2))
    assert a.name == "smollm2-my_data-lora-20260101-120000" and b.name == a.name + "-2"
    assert a.is_dir() and b.is_dir()


def test_the_python_api_trains_as_train_py(tmp_path, text, monkeypatch):
    """trainer.train with TrainConfig's defaults takes the steps train.py takes with its own defaults
    (learning rate, batching, and the rest): the same losses and adapter, bit for bit."""
    import minipeft as mp
    from minipeft.formats import tasks
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    train_cli.main(["--model", "tiny-gpt2", "--task", str(text), "--max-len", "16", "--steps", "3",
                    "--batch-size", "4", "--out", str(cli_out)])
    torch.manual_seed(0)  # as train.py seeds the method's initialization (--seed 0)
    model, tokenizer = mp.from_pretrained("tiny-gpt2")
    task = tasks.load_task(text, tokenizer, max_len=16)
    mp.apply(model, "lora")
    trainer.train(model, task, trainer.TrainConfig(steps=3, batch_size=4, out=str(api_out)))
    assert step_losses(api_out) == step_losses(cli_out)
    assert tensors_equal(load_file(api_out / "adapter" / "adapter.safetensors"),
                         load_file(cli_out / "adapter" / "adapter.safetensors"))
    start = next(json.loads(line) for line in (api_out / "metrics.jsonl").read_text().splitlines())
    assert start["config"]["lr"] == mp.get_method("lora").lr  # resolved, and logged as resolved
    # and without out, a new folder of its own under ./checkpoints, as train.py
    monkeypatch.chdir(tmp_path)
    summary = trainer.train(model, task, trainer.TrainConfig(steps=1, batch_size=4))
    [folder] = (tmp_path / "checkpoints").iterdir()
    assert re.fullmatch(r"lora-\d{8}-\d{6}", folder.name)
    assert summary["adapter"] == str(folder.relative_to(tmp_path) / "adapter")


# ----------------------------------------------------------------------------------------------------
# checkpoints and resume


def test_checkpoint_layout(finished):
    assert (finished / "latest_checkpoint").read_text() == "checkpoint-8"
    assert sorted(p.name for p in finished.iterdir() if p.name.startswith(("checkpoint", "."))) == \
        ["checkpoint-8"]  # the older checkpoint-4 is gone, no temporary folders are left
    ckpt = finished / "checkpoint-8"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter.safetensors", "adapter_config.json",
                                                       "trainer_state.json", "trainer_state.safetensors"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == state["steps"] == 8 and state["progress"]["batch"] == 8
    tensors = load_file(ckpt / "trainer_state.safetensors")
    assert "rng.torch.0" in tensors and any(k.endswith(".exp_avg_sq") for k in tensors)
    # the checkpoint's parameters are the final adapter's
    assert tensors_equal(load_file(ckpt / "adapter.safetensors"),
                         load_file(finished / "adapter" / "adapter.safetensors"))


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, text):
    """12 steps straight vs 5 + stop + 7 resumed: dropout (the model's and LoRA's), gradient
    accumulation, and epoch boundaries on both sides of the stop; every loss and every trainable
    parameter must be exactly equal."""
    common = ["--model-dropout", "0.1", "--dropout", "0.1", "--grad-accum", "2", "--steps", "12",
              "--eval-every", "4", "--seed", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_cli.main([str(a) for a in lm_args(text, straight, *common)])
    with pytest.raises(trainer.Stopped) as stopped:
        train_cli.main([str(a) for a in lm_args(text, resumed, *common, "--stop-at", "5")])
    assert stopped.value.exit_code == 0 and "--resume" in str(stopped.value)
    assert step_losses(resumed).keys() == set(range(1, 6))
    train_cli.main([str(a) for a in lm_args(text, resumed, *common, "--resume", resumed)])

    a, b = step_losses(straight), step_losses(resumed)
    assert a.keys() == set(range(1, 13)) and a == b  # exact float equality
    assert tensors_equal(load_file(straight / "adapter" / "adapter.safetensors"),
                         load_file(resumed / "adapter" / "adapter.safetensors"))
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows].count("resume") == 1
    summary = rows[-1]
    assert summary["event"] == "summary" and summary["seed"] == 3 and summary["versions"]["torch"]

    other_seed = tmp_path / "seed4"
    train_cli.main([str(a) for a in lm_args(text, other_seed, *common[:-1], "4")])
    assert step_losses(other_seed) != a


def test_resume_from_a_checkpoint_folder_into_another_out(tmp_path, text, unfinished, finished):
    out = tmp_path / "continued"
    before = hashes(unfinished)
    train_cli.main([str(a) for a in lm_args(text, out, "--resume", unfinished / "checkpoint-4")])
    assert step_losses(out).keys() == set(range(5, 9))
    assert step_losses(out) == {k: v for k, v in step_losses(finished).items() if k > 4}
    assert hashes(unfinished) == before


def test_resume_from_a_checkpoint_folder_continues_in_its_run_folder(tmp_path, text, unfinished, finished):
    """--resume <out>/checkpoint-4 without --out: the run goes on in <out> (its settings, its metrics.jsonl,
    its adapter), not inside the checkpoint folder."""
    run = tmp_path / "unfinished"
    shutil.copytree(unfinished, run)
    train_cli.main([str(a) for a in lm_args(text, None, "--resume", run / "checkpoint-4")])
    assert step_losses(run) == step_losses(finished)  # steps 1-4 as stopped, 5-8 resumed
    assert (run / "adapter" / "adapter.safetensors").is_file()
    assert (run / "latest_checkpoint").read_text() == "checkpoint-8"
    assert not (run / "checkpoint-4").exists()  # the older checkpoint goes once a newer one is in place


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, text, signum):
    out = tmp_path / "run"
    args = [str(a) for a in lm_args(text, out, "--steps", "100000", "--save-every", "0")]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and '"step"' in (out / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and "interrupted: stopped after step" in err
    last = max(step_losses(out))
    assert (out / "latest_checkpoint").read_text() == f"checkpoint-{last}"
    assert json.loads((out / f"checkpoint-{last}" / "trainer_state.json").read_text())["step"] == last
    # and it continues from there
    with pytest.raises(trainer.Stopped):
        train_cli.main([*args, "--resume", str(out), "--stop-at", str(last + 2)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed_at = [r["event"] for r in rows].index("resume")
    assert [r["step"] for r in rows[resumed_at:] if r["event"] == "step"] == [last + 1, last + 2]


# ----------------------------------------------------------------------------------------------------
# non-finite steps


def poison(monkeypatch, bad_steps):
    """Make loss_fn return NaN on the given (1-based) training calls; with grad_accum 1, call i is step i."""
    calls = {"n": 0}
    real = loop.loss_fn

    def loss_fn(model, batch, kind, reduction="mean"):
        calls["n"] += model.training  # evaluation calls it too, in eval mode
        loss = real(model, batch, kind, reduction)
        return loss * float("nan") if model.training and calls["n"] in bad_steps else loss
    monkeypatch.setattr(loop, "loss_fn", loss_fn)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, text, monkeypatch, capsys):
    out, reference = tmp_path / "nan", tmp_path / "reference"
    with pytest.raises(trainer.Stopped):
        train_cli.main([str(a) for a in lm_args(text, reference, "--stop-at", "6")])
    poison(monkeypatch, {7, 8})
    code, err = run_main(train_cli.main, lm_args(text, out), capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in rows if r["event"] == "step" and r.get("skipped")]
    assert skipped == [7, 8] and rows[-1]["skipped_steps"] == 2
    # no update on a skipped step: the final parameters are those after step 6
    assert tensors_equal(load_file(out / "adapter" / "adapter.safetensors"),
                         load_file(reference / "checkpoint-6" / "adapter.safetensors"))


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path, text, monkeypatch, capsys):
    out = tmp_path / "diverged"
    poison(monkeypatch, set(range(3, 100)))
    code, err = run_main(train_cli.main, lm_args(text, out, "--save-every", "2", "--max-bad-steps", "3"), capsys)
    assert code == 1 and "Traceback" not in err
    assert "not finite for 3 steps in a row (steps 3-5, --max-bad-steps 3)" in err
    assert "checkpoint-2 (step 2), is kept" in err
    assert (out / "latest_checkpoint").read_text() == "checkpoint-2"
    assert not (out / "adapter").exists()


# ----------------------------------------------------------------------------------------------------
# --init-adapter


def test_init_adapter_starts_from_the_saved_weights_and_method(tmp_path, text, capsys):
    first, out = tmp_path / "first", tmp_path / "again"
    train_cli.main([str(a) for a in lm_args(text, first, "--rank", "4", "--targets", "q,k,v")])
    code, err = run_main(train_cli.main, lm_args(text, out, "--init-adapter", first / "adapter", "--steps", "2"),
                         capsys)
    assert code == 0, err
    before = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()][-1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the adapter's method and options, not the default rank 8 on q,v
    assert rows[-1]["options"]["rank"] == 4 and rows[-1]["options"]["targets"] == ["q", "k", "v"]
    test_before = next(r for r in rows if r["event"] == "test_before")
    assert test_before["loss"] == pytest.approx(before["test_after"]["loss"], abs=1e-6)


class Clock:
    """A clock that moves only when told (for processes.StopSignal's grace time)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_repeated_signal_within_the_grace_time_is_the_same_request(capsys):
    """Under torchrun Ctrl-C reaches a worker twice (terminal and torchrun): still one graceful stop.
    A signal later than the grace time quits at once. Real signals and handlers; only the clock is
    controlled (signal.raise_signal runs the Python handler before it returns)."""
    clock = Clock()
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN when started in the background
    with processes.StopSignal(clock=clock) as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT
        assert "SIGINT: saving a checkpoint after this step" in capsys.readouterr().err
        clock.now += processes.StopSignal.GRACE  # the grace time itself still counts as the same request
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGINT
        clock.now += 0.01
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        # the handlers are back to what they were before, even while still inside `with`
        assert signal.getsignal(signal.SIGINT) is before
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("raised, code, said", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (trainer.Stopped("stopped at step 3 (--stop-at)", 0), 0, "stopped at step 3"),
    (ValueError("no such task"), 2, "error: no such task"),
])
@pytest.mark.parametrize("debug", [False, True])
def test_cli_run_exits_with_the_code_of_what_stopped_main(raised, code, said, debug, capsys):
    """cli.run: one line on stderr and the exit code; the traceback only with --debug (Ctrl-C never
    needs one); a main that returns leaves cli.run without exiting."""
    def main(argv):
        raise raised
    with pytest.raises(SystemExit) as exit_:
        cli.run(main, ["--debug"] if debug else [])
    err = capsys.readouterr().err
    assert exit_.value.code == code and said in err
    assert ("Traceback" in err) == (debug and not isinstance(raised, KeyboardInterrupt))
    assert cli.run(lambda argv: None, []) is None


def test_a_checkpoint_of_the_same_step_replaces_the_one_left_in_the_folder(tmp_path):
    """A run that saves step 3 where an earlier run in the same folder left checkpoint-3: the new one takes
    its place whole, and nothing of the old one (or of the renaming) stays behind."""
    model = mp.apply(tiny_model("llama"), "lora", rank=2)
    optimizer = loop.make_optimizer(model, lr=1e-3, weight_decay=0.0)
    for value in (1.0, 2.0):  # the earlier run's B, then this run's
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.fill_(value)
        checkpoint.save(tmp_path, model, optimizer, {"step": 3, "steps": 10}, checkpoint.rng_states())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", checkpoint.LATEST]
    saved = load_file(str(tmp_path / "checkpoint-3" / checkpoint.ADAPTER_WEIGHTS))
    assert {float(t.unique()) for name, t in saved.items() if "lora_B" in name} == {2.0}

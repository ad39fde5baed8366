"""A run's settings in a file: --config run.yaml (every flag a key, the command line wins), config.yaml
saved in the run's folder and read back by --resume (no flags needed), every difference from the
checkpoint named at once, --steps extending a finished run, and bad keys or values stopping with one
line before anything is written."""
import json
import math
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import train as train_cli
from minipeft.run import cli, runconfig
from minipeft.core import loop
from minipeft.formats import tasks
from minipeft.core.registry import METHODS
from test_robust import hashes, run_main, words

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("runconfig") / "text.txt"
    path.write_text(words(200))
    return path


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def logged(out: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def settings_of(text, out, steps=6):
    return (f"model: tiny-gpt2\ntask: {text}\nmax-len: 16\nbatch_size: 4\nsteps: {steps}\neval_every: 3\n"
            f"skip_test_before: true\ntargets: [q, k, v]\nlr: 1e-3\nout: {out}\n")


def test_config_file_keys_and_command_line_override(text, tmp_path, capsys):
    config = write_yaml(tmp_path / "run.yaml", settings_of(text, tmp_path / "run") + "log: [csv]\n")
    code, err = run_main(train_cli.main, ["--config", config, "--steps", "4", "--rank", "4"], capsys)
    assert code == 0, err
    start = logged(tmp_path / "run", "start")[0]
    assert (start["config"]["batch_size"], start["config"]["steps"], start["config"]["lr"]) == (4, 4, 1e-3)
    assert start["method"]["options"]["targets"] == ["q", "k", "v"] and start["method"]["options"]["rank"] == 4
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["steps"], saved["rank"], saved["targets"], saved["lr"], saved["method"]) == \
        (4, 4, ["q", "k", "v"], 1e-3, "lora")
    assert saved["alpha"] == 16.0  # the method's defaults written out
    assert not {"out", "resume", "config", "stop_at"} & saved.keys()


def test_every_flag_and_every_method_option_reads_back(tmp_path):
    """config.yaml holds every flag (method options as the method resolved them) and reads back as the
    same arguments, for every method."""
    parser = train_cli.build_parser()
    keys = {key for key, action in runconfig.flag_actions(parser).items() if not action.dest.startswith("opt_")}
    for method in METHODS.values():
        args = parser.parse_args(["--method", method.name])
        settings = runconfig.run_settings(args, method.name, method.defaults, lr=3e-4)
        assert keys - settings.keys() <= set(runconfig.NOT_SAVED), method.name
        file = write_yaml(tmp_path / f"{method.name}.yaml", yaml.safe_dump(settings))
        again = runconfig.parse_args(train_cli.build_parser, ["--config", str(file)])
        given = {k: v for k, v in method.defaults.items() if v is not None}  # None: the option's default
        assert json.loads(json.dumps(cli.method_options(again))) == json.loads(json.dumps(given))
        def plain(namespace):  # the flags but method options, --config and --lr; --task as its parsed sources
            return {k: tasks.parse_sources(v) if k == "task" else v for k, v in vars(namespace).items()
                    if not k.startswith("opt_") and k not in ("config", "lr")}
        assert plain(again) == plain(args)
        assert again.lr == 3e-4


def test_resume_needs_no_flags(text, tmp_path, capsys):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert run_main(train_cli.main, ["--config", write_yaml(tmp_path / "a.yaml", settings_of(text, whole))],
                    capsys)[0] == 0
    config = write_yaml(tmp_path / "b.yaml", settings_of(text, stopped))
    assert run_main(train_cli.main, ["--config", config, "--stop-at", "3"], capsys)[0] == 0
    code, err = run_main(train_cli.main, ["--resume", stopped], capsys)
    assert code == 0, err
    assert [r["loss"] for r in logged(stopped, "step")] == [r["loss"] for r in logged(whole, "step")]


def test_a_resume_may_change_how_the_run_evaluates(text, tmp_path, capsys):
    """--eval-every and --test decide what is scored, not what is trained: a resume may change them."""
    out = tmp_path / "run"
    assert run_main(train_cli.main, ["--config", write_yaml(tmp_path / "a.yaml", settings_of(text, out)),
                                     "--stop-at", "3"], capsys)[0] == 0
    code, err = run_main(train_cli.main, ["--resume", out, "--eval-every", "0", "--no-test"], capsys)
    assert code == 0, err
    assert [r["step"] for r in logged(out, "validation")] == [3] and logged(out, "summary")[0]["test_after"] is None


def test_every_difference_is_named_at_once(text, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(train_cli.main, ["--config", write_yaml(tmp_path / "a.yaml", settings_of(text, out)),
                                     "--stop-at", "2"], capsys)[0] == 0
    before = hashes(out)
    code, err = run_main(train_cli.main, ["--resume", out, "--lr", "0.003", "--batch-size", "2", "--rank", "4"],
                         capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    line = err.strip()
    assert "is method lora {'rank': 8" in line and "but this run is lora {'rank': 4" in line
    assert "was made with other options: --batch-size 4 (this run: 2), --lr 0.001 (this run: 0.003)" in line
    # another method: the saved run's LoRA options do not reach it; the difference is the message
    code, err = run_main(train_cli.main, ["--resume", out, "--method", "adapter"], capsys)
    assert code == 2 and "is method lora {'rank': 8" in err and "but this run is adapter {'size': 64" in err
    assert hashes(out) == before


def test_steps_extends_a_finished_run(text, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(train_cli.main, ["--config", write_yaml(tmp_path / "a.yaml", settings_of(text, out))],
                    capsys)[0] == 0
    cli.run(train_cli.main, ["--resume", str(out), "--steps", "9"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "extending" in line]
    assert len(lines) == 1 and lines[0].startswith("extending the finished run from 6 to 9 steps: AdamW's state "
                                                   "carries on, and the warmup-cosine learning-rate schedule now "
                                                   "spans 9 steps")
    steps = logged(out, "step")
    assert [r["step"] for r in steps] == list(range(1, 10))
    schedule = loop.warmup_cosine(math.ceil(0.06 * 9), 9)  # step s runs at the schedule's factor(s - 1)
    assert [r["lr"] for r in steps[6:]] == pytest.approx([1e-3 * schedule(s - 1) for s in (7, 8, 9)])
    # AdamW's moments went on from step 6: its step count is the run's, not 3 of a fresh optimizer
    state = load_file(str(out / "checkpoint-9" / "trainer_state.safetensors"))
    assert {float(v) for k, v in state.items() if k.endswith(".step")} == {9.0}
    assert yaml.safe_load((out / "config.yaml").read_text())["steps"] == 9
    before = hashes(out)
    code, err = run_main(train_cli.main, ["--resume", out, "--steps", "5"], capsys)
    assert code == 2 and "is at step 9, which this run's 5 steps do not pass; give more than 9 --steps" in err
    assert hashes(out) == before


def test_steps_may_end_a_stopped_run_sooner_but_not_at_or_before_its_checkpoint(text, tmp_path, capsys):
    """A run stopped at step 3 of 6 resumes with --steps 4 (one step more, on a schedule of 4), but --steps 3
    would end where it already is: refused, with nothing written."""
    out = tmp_path / "run"
    assert run_main(train_cli.main, ["--config", write_yaml(tmp_path / "a.yaml", settings_of(text, out)),
                                     "--stop-at", "3"], capsys)[0] == 0
    before = hashes(out)
    code, err = run_main(train_cli.main, ["--resume", out, "--steps", "3"], capsys)
    assert code == 2 and "is at step 3, which this run's 3 steps do not pass; give more than 3 --steps" in err
    assert hashes(out) == before
    code, err = run_main(train_cli.main, ["--resume", out, "--steps", "4"], capsys)
    assert code == 0, err
    steps = logged(out, "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[3]["lr"] == pytest.approx(1e-3 * loop.warmup_cosine(math.ceil(0.06 * 4), 4)(3))


@pytest.mark.parametrize("text, message", [
    ("batch_sise: 4\n", "unknown key 'batch_sise'; did you mean 'batch_size'? the keys are the flags of this "
                        "command: model, task"),
    ("batch-size: four\n", "batch_size takes an integer, not 'four'"),
    ("lr: [1, 2]\n", "lr takes a number, not [1, 2]"),
    ("pack: 1\n", "pack is a switch: write pack: true or pack: false, not 1"),
    ("batching: shuffled\n", "batching must be one of by-length, random, not 'shuffled'"),
    ("rank: eight\n", "rank: option 'rank' takes an integer, not 'eight'"),
    ("log: [csv, mlflow]\n", "log: unknown logger 'mlflow'"),
    ("alpha: .nan\n", "alpha: option 'alpha' takes a finite number, not nan"),
    ("debug: true\n", "debug is not a setting a file can hold; give --debug on the command line"),
    ("batch-size: 8\nbatch_size: 2\n", "sets batch_size more than once"),
    ("steps: 5\nsteps: 1\n", "sets steps more than once"),
    ("- steps: 4\n", "must hold one 'key: value' line per flag"),
    ("steps: [4\n", "is not valid YAML"),
])
def test_bad_config_is_one_line_and_writes_nothing(text, message, tmp_path, capsys):
    config = write_yaml(tmp_path / "bad.yaml", text)
    code, err = run_main(train_cli.main, ["--config", config, "--out", tmp_path / "run"], capsys)
    assert code == 2 and err.startswith(f"error: {config}") and len(err.strip().splitlines()) == 1
    assert message in err
    assert not (tmp_path / "run").exists()


def test_examples_are_valid_settings():
    for name in ("chat-lora.yaml", "classify-lora.yaml"):
        args = runconfig.parse_args(train_cli.build_parser, ["--config", str(ROOT / "examples" / name)])
        assert args.method == "lora" and args.out == f"checkpoints/{name.removesuffix('.yaml')}"
    chats = (ROOT / "examples" / "chats.jsonl").read_text().splitlines()
    assert len(chats) == 100 and all(json.loads(line)["messages"] for line in chats)


def test_a_run_loads_only_its_methods_file(tmp_path):
    """The method's own flags are built without importing any other method's file; --help shows them all."""
    import subprocess
    import sys
    code = ("import sys, train; from minipeft.run import runconfig; "
            "args = runconfig.parse_args(train.build_parser, sys.argv[1:], 'lora'); "
            "print(getattr(args, 'opt_rank', None), sorted(m[len('minipeft.core.'):] for m in sys.modules if m in "
            "[f'minipeft.core.{f}' for f in ('selective', 'qlora', 'dora', 'prefix', 'vera', 'lora')]))")
    for argv, expected in ((["--rank", "4"], "4 ['lora']"), (["--method", "prefix"], "None ['prefix']")):
        out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True)
        assert out.stdout.strip() == expected, out.stderr
    assert "--length" in train_cli.build_parser().format_help()
    assert "--length" not in train_cli.build_parser("lora").format_help()


@pytest.mark.parametrize("argv, key", [(["--length", "4"], None), ([], "length: 4\n")])
def test_another_methods_option_is_parsed_and_refused_by_the_method(text, tmp_path, capsys, argv, key):
    """An option of another method, on the command line or in the file, still reaches apply, which names
    the chosen method's options (the flags of every method are built for it)."""
    config = write_yaml(tmp_path / "run.yaml", settings_of(text, tmp_path / "run") + (key or ""))
    code, err = run_main(train_cli.main, ["--config", config, *argv], capsys)
    assert code == 2 and "['length']" in err and "for method 'lora'" in err, err
    assert not (tmp_path / "run").exists()


def test_a_switch_set_in_the_file_is_undone_on_the_command_line(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", "pack: true\nskip_test_before: true\n")
    args = runconfig.parse_args(train_cli.build_parser, ["--config", str(config), "--no-pack"], "lora")
    assert (args.pack, args.skip_test_before) == (False, True)
    assert runconfig.parse_args(train_cli.build_parser, ["--config", str(config)], "lora").pack is True

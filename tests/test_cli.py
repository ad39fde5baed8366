"""train.py / eval.py end to end on tiny models: a real (short) run, and bad input that must stop with
one clear line, exit code 2 and no traceback."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import minipeft as mp
from minipeft.run import trainer

ROOT = Path(__file__).resolve().parent.parent


def root_script(name: str):
    """train.py, eval.py or export.py as a module, read from the repository's root by path: `import export`
    finds bench/export.py instead once a test has put bench/ on sys.path (tests/test_layout.py does)."""
    module = sys.modules.get(name)
    if module is None or Path(getattr(module, "__file__", "")) != ROOT / f"{name}.py":
        spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return module


def run(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """A small sentiment CSV whose label is learnable from one word."""
    folder = tmp_path_factory.mktemp("data")
    rows = ["text,label"]
    for i in range(120):
        good = i % 2 == 0
        rows.append(f"\"{'great' if good else 'awful'} film number {i}\",{int(good)}")
    path = folder / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(reviews, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    done = run("train.py", "--model", "tiny-bert", "--task", reviews, "--method", "lora", "--rank", "4",
               "--targets", "q,v", "--steps", "30", "--batch-size", "8", "--lr", "3e-3", "--out", out,
               "--memory-report")
    assert done.returncode == 0, done.stderr
    return out, done


def test_train_writes_summary_metrics_and_adapter(trained):
    out, done = trained
    assert "trainable parameters" in done.stdout and "s/step" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows].count("step") == 30
    summary = rows[-1]
    assert summary["event"] == "summary" and summary["steps"] == 30
    assert (out / "adapter" / "adapter.safetensors").exists()
    assert (out / "adapter" / "adapter_config.json").exists()


def test_train_prints_the_memory_ledger_beside_the_measured_peak(trained):
    out, done = trained
    assert "memory ledger: batch 8 ×" in done.stdout and "checkpointing off" in done.stdout
    measured = next(line for line in done.stdout.splitlines() if "measured peak RSS" in line)
    assert float(measured.split("ledger / measured")[1].split(";")[0]) > 0


def test_the_ledger_is_printed_only_when_asked(reviews, tmp_path):
    done = run("train.py", "--model", "tiny-bert", "--task", reviews, "--steps", "2", "--batch-size", "8",
               "--eval-every", "0", "--skip-test-before", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "memory ledger" not in done.stdout and "peak memory (RSS)" in done.stdout


def test_save_every_0_writes_no_checkpoint_but_the_adapter(reviews, tmp_path):
    done = run("train.py", "--model", "tiny-bert", "--task", reviews, "--steps", "2", "--batch-size", "8",
               "--eval-every", "0", "--skip-test-before", "--save-every", "0", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob("checkpoint-*")) and (tmp_path / "adapter" / "adapter.safetensors").exists()


def test_grad_checkpoint_flag_keeps_the_losses(trained, reviews, tmp_path):
    """--grad-checkpoint recomputes each block in backward: the same run, the same losses."""
    out, _ = trained
    done = run("train.py", "--model", "tiny-bert", "--task", reviews, "--method", "lora", "--rank", "4",
               "--targets", "q,v", "--steps", "30", "--batch-size", "8", "--lr", "3e-3", "--out", tmp_path,
               "--grad-checkpoint", "--memory-report")
    assert done.returncode == 0, done.stderr
    assert "checkpointing on" in done.stdout  # the ledger's line

    def losses(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["event"] == "step"]
    assert losses(tmp_path) == pytest.approx(losses(out), abs=1e-6)


def test_eval_with_adapter_reproduces_the_training_result(trained, reviews):
    out, done = trained
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    result = run("eval.py", "--model", "tiny-bert", "--task", reviews, "--adapter", out / "adapter")
    assert result.returncode == 0, result.stderr
    assert f"accuracy {summary['test_after']['accuracy']:.4f}" in result.stdout


def test_list_methods_and_help():
    """Every registered method is listed, and every option any method declares is a flag with help."""
    listed = run("train.py", "--list-methods")
    assert listed.returncode == 0 and "rank=8" in listed.stdout
    helped = run("train.py", "--help")
    assert helped.returncode == 0
    for method in mp.METHODS.values():
        assert method.name in listed.stdout
        for option in method.options:
            assert f"--{option.name.replace('_', '-')} {option.type.__name__.upper()}" in helped.stdout
            assert option.help.split(":")[0] in " ".join(helped.stdout.split())


def test_help_says_each_default_once():
    """A flag whose help names its default gets no second "(default: …)" from argparse; the others get one."""
    import re

    eval_cli, export_cli, train_cli = (root_script(name) for name in ("eval", "export", "train"))
    texts = [" ".join(parser.format_help().split())
             for parser in (train_cli.build_parser(), eval_cli.build_parser(), export_cli.build_parser())]
    for text in texts:
        assert not re.search(r"\(default: [^)]*\) \(default: ", text)
    assert "--seed SEED seed for initialization, shuffling and dropout (default: 0)" in texts[0]
    assert "--out DIR the folder to create (it must not exist) --format" in texts[2]  # required: no default
    assert "--test, --no-test score the test split after training, and before unless --skip-test-before (default: " \
           "yes, unless --eval-every 0) --skip-test-before" in texts[0]


def test_generate_on_a_causal_model():
    result = run("eval.py", "--model", "tiny-gpt2", "--generate", "Hello", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello")


def bad_inputs(reviews, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    no_label = tmp_path / "nolabel.csv"
    no_label.write_text("text,stars\ngood,5\nbad,1\n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "good", "label": 1}\n{"text": "bad", label: 0}\n')
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1,
                                                     "n_head": 2, "vocab_size": 50, "n_positions": 64,
                                                     "layer_norm_epsilon": 1e-5}))
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    short = ["--steps", "1", "--batch-size", "4", "--out", tmp_path / "out"]
    return [
        (["--model", "gpt5"], "is not a named model (minilm, smollm2"),
        (["--method", "lorax"], "unknown method 'lorax' (did you mean 'lora'?)"),
        (["--model", "tiny-gpt2", "--task", f"{reviews}:0", *short], "a mixing weight must be a number > 0"),
        (["--model", "tiny-gpt2", "--task", reviews, "--columns", "text=review", *short],
         "has no column 'review' (--columns text=review); its columns are: text, label"),
        (["--model", "tiny-gpt2", "--task", reviews, "--targets", "q,x", *short], "unknown target"),
        (["--model", "tiny-gpt2", "--task", reviews, "--rank", "0", *short], "rank must be >= 1"),
        (["--model", "tiny-gpt2", "--task", reviews, "--method", "full", "--rank", "4", *short],
         "unknown option"),
        (["--model", tmp_path / "missing", "--task", reviews], "missing"),
        (["--model", corrupt, "--task", reviews, *short], "corrupt"),
        (["--model", "tiny-gpt2", "--task", empty, *short], "empty"),
        (["--model", "tiny-gpt2", "--task", no_label, *short], "label"),
        (["--model", "tiny-gpt2", "--task", bad_json, *short], "line 2"),
        (["--model", "tiny-gpt2", "--task", tmp_path / "nothing.csv", *short], "nothing.csv"),
    ]


def test_bad_input_is_one_clear_error(reviews, tmp_path):
    for args, message in bad_inputs(reviews, tmp_path):
        result = run("train.py", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        assert result.stderr.startswith("error: ") and message.lower() in result.stderr.lower(), \
            (args, result.stderr)
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("script, flags, message", [
    ("train", ["--epochs", "inf"], "--epochs must be a finite number > 0, got inf"),
    ("train", ["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    ("train", ["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
    ("train", ["--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
    ("train", ["--beta", "inf"], "--beta must be a finite number > 0, got inf"),
    ("train", ["--mmap-threshold", str(2**64)], "--mmap-threshold must be in [0, 2**31)"),
    ("train", ["--dropout", "nan"], "option 'dropout' takes a finite number, not nan"),
    ("train", ["--alpha", "inf"], "option 'alpha' takes a finite number, not inf"),
    ("train", ["--import", "no_such_module_xyz"], "--import no_such_module_xyz: No module named 'no_such_module_xyz'"),
    ("train", ["--log", "none,csv"], "none means no logger, so it cannot go with others"),
    ("eval", ["--calibrate"], "--calibrate works only with --few-shot"),
    ("eval", ["--merge"], "--merge works only with --adapter"),
    ("eval", ["--system", "Be brief.", "--generate", "Hi"], "--system works only with --chat"),
    ("eval", ["--chat", "--generate", "Hi"], "give one of them"),
    ("eval", ["--seed", str(2**64)], "--seed must be in [0, 2**63)"),
    ("eval", ["--out", "{tmp}"], "must be a file in an existing folder"),
    ("eval", ["--out", "{tmp}/p.jsonl"], "is a classification task, whose score is printed"),
    ("eval", ["--out", "{tmp}/p.jsonl", "--generate", "Hi"], "--generate, --chat and --few-shot print theirs"),
    ("eval", ["--task", "{pairs}", "--task", "{pairs}"], "reward accuracy reads one --task source of preference pairs"),
    ("export", ["--max-shard-gb", "inf"], "--max-shard-gb must be a finite number > 0, got inf"),
    ("export", ["--nf4-report"], "the requantization report compares the merged weights with the base's"),
    ("export", ["--chat-template", "{tmp}/none.jinja"], "error: --chat-template {tmp}/none.jinja: no such file"),
])
def test_bad_flag_is_one_clear_error_and_writes_nothing(script, flags, message, reviews, tmp_path, capsys):
    """In-process (train.py on tiny-bert, eval.py and export.py on tiny-gpt2): exit code 2 naming the flag,
    no traceback, no output folder."""
    from test_robust import run_main
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "Say hi", "chosen": "hi", "rejected": "no"}\n' * 20)
    flags = [f.format(tmp=tmp_path, pairs=tmp_path / "pairs.jsonl") for f in flags]
    out = tmp_path / "out"
    first = {"train": ["--model", "tiny-bert", "--task", reviews, "--steps", "1", "--batch-size", "4", "--out", out],
             "eval": ["--model", "tiny-gpt2", "--task", reviews, "--limit", "2"],
             "export": ["--model", "tiny-gpt2", "--out", out]}[script]
    code, err = run_main(root_script(script).main, [*first, *flags], capsys)
    assert code == 2 and "Traceback" not in err and message.format(tmp=tmp_path) in err, err
    assert not out.exists()


def test_eval_takes_the_base_model_from_the_adapter_and_scores_a_file_whole(trained, reviews):
    """Without --model, eval.py loads the base model the adapter records; --split all scores every row."""
    out, done = trained
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    result = run("eval.py", "--task", reviews, "--adapter", out / "adapter")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tiny-bert + ") and f"accuracy {summary['test_after']['accuracy']:.4f}" in result.stdout
    whole = run("eval.py", "--task", reviews, "--adapter", out / "adapter", "--split", "all")
    assert whole.returncode == 0 and f"on {reviews} all: accuracy" in whole.stdout, whole.stderr
    (out / "copy").mkdir(exist_ok=True)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    (out / "copy" / "adapter_config.json").write_text(json.dumps({**config, "base": {**config["base"], "source": None}}))
    unknown = run("eval.py", "--task", reviews, "--adapter", out / "copy")
    assert unknown.returncode == 2 and "does not record its base model; give it with --model" in unknown.stderr


def test_eval_every_zero_switches_evaluation_off(reviews, tmp_path):
    """Default: four validation passes, after steps ⌈k·steps/4⌉ (6 steps: 2, 3, 5, 6), and the test split
    scored before and after; --eval-every 0: no validation and no test score, unless --test asks for it."""
    import train as train_cli

    def evaluated(name, *flags):
        out = tmp_path / name
        train_cli.main(["--model", "tiny-bert", "--task", str(reviews), "--steps", "6", "--batch-size", "4",
                        "--out", str(out), *flags])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        tested = [r["event"] for r in rows if r["event"] == "test_before" or r.get("test_after")]
        return [r["step"] for r in rows if r["event"] == "validation"], tested
    assert evaluated("default") == ([2, 3, 5, 6], ["test_before", "summary"])
    assert evaluated("off", "--eval-every", "0") == ([], [])
    assert evaluated("test", "--eval-every", "0", "--test", "--skip-test-before") == ([], ["summary"])
    assert evaluated("every4", "--eval-every", "4", "--no-test") == ([4, 6], [])
    assert trainer.validation_steps(2, None) == {1, 2} and trainer.validation_steps(100, None) == {25, 50, 75, 100}


@pytest.mark.parametrize("method, model", [("lora", "tiny-bert"), ("qlora", "tiny-llama")])
def test_train_runs_the_fast_twins(method, model, reviews, tmp_path):
    """train.py trains with minipeft.fast's twins in, NF4's where the model has 4-bit layers (the Python API
    keeps the readable core until asked)."""
    import minipeft.fast
    import train as train_cli
    minipeft.fast.disable()
    train_cli.main(["--model", model, "--task", str(reviews), "--method", method, "--steps", "1", "--batch-size", "4",
                    "--skip-test-before", "--eval-every", "0", "--out", str(tmp_path)])
    assert minipeft.fast.enabled(nf4=False) and minipeft.fast.enabled() == (method == "qlora")
    minipeft.fast.disable()


def test_adapter_from_another_base_is_refused(trained, reviews):
    out, _ = trained
    result = run("eval.py", "--model", "tiny-gpt2", "--task", reviews, "--adapter", out / "adapter")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "another base model" in result.stderr


def test_debug_shows_the_traceback():
    result = run("train.py", "--model", "gpt5", "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr


def flags(options: dict) -> list[str]:
    """An example option set as the command line spells it (lists comma-separated)."""
    return [part for name, value in options.items()
            for part in (f"--{name.replace('_', '-')}", ",".join(value) if isinstance(value, list) else str(value))]


@pytest.mark.parametrize("method", list(mp.METHODS))
def test_every_method_trains_on_hamlet_and_generates(method, tmp_path):
    """train.py on the built-in LM task with a tiny model, with the method's last example option set
    typed as flags, then eval.py generating through the adapter."""
    import eval as eval_cli
    import train as train_cli
    spec = mp.METHODS[method]
    model = "tiny-llama" if "llama" in spec.flavors else "tiny-gpt2"
    options = flags(spec.examples[-1])
    train_cli.main(["--model", model, "--task", "hamlet", "--method", method, *options, "--steps", "2",
                    "--batch-size", "2", "--max-len", "32", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["options"] == spec.resolve(spec.examples[-1])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["event"] == "summary" and "perplexity" in rows[-1]["test_after"]
    eval_cli.main(["--model", model, "--adapter", str(tmp_path / "adapter"), "--generate", "To be",
                   "--max-new-tokens", "4"])


# train.py's flags for TrainConfig's fields whose flag is not --the-field-name; test_before is the inverse
# of --skip-test-before
FLAG_OF_FIELD = {"max_grad_norm": "--clip", "test_before": "--skip-test-before"}
NO_FLAG = {"eval_batch_size", "run", "dpo"}  # evaluation's batch size has no flag; run holds the other flags;
# dpo (None unless preference pairs) is built from --beta and --dpo-loss


def test_train_py_and_trainconfig_share_every_default():
    """One default per setting: the parser's default of each flag equals the TrainConfig field it sets,
    field by field, and train.py's TrainConfig from no flags at all equals TrainConfig()."""
    import dataclasses

    import torch

    import train as train_cli
    from minipeft.run import trainer
    parser = train_cli.build_parser()
    actions = {flag: action for action in parser._actions for flag in action.option_strings}
    differ = []
    for field in dataclasses.fields(trainer.TrainConfig):
        if field.name in NO_FLAG:
            continue
        flag = FLAG_OF_FIELD.get(field.name, "--" + field.name.replace("_", "-"))
        default = actions[flag].default
        if field.name == "test_before":
            default = not default
        if default != field.default:
            differ.append(f"{flag} {default!r} but TrainConfig.{field.name} {field.default!r}")
    assert not differ, "; ".join(differ)
    from_flags = train_cli.train_config(parser.parse_args([]), "fp32", torch.device("cpu"))
    assert dataclasses.replace(from_flags, run={}) == trainer.TrainConfig()


def test_minipeft_without_a_subcommand_is_an_error_on_stderr(capsys):
    """`minipeft` alone: the usage on stderr and exit code 2 (--help: on stdout, exit code 0)."""
    from minipeft.run import command
    for argv, code, stream in (([], 2, "err"), (["--help"], 0, "out")):
        with pytest.raises(SystemExit) as stopped:
            command.main(argv)
        assert stopped.value.code == code and getattr(capsys.readouterr(), stream).startswith("usage: minipeft")

"""The package: a wheel built from the repository's files installs a `minipeft` command that works from
any folder (train, eval, chat, export with the scripts' own parsers), and the asset cache of an installed
minipeft is the platform's cache folder unless MINIPEFT_CACHE says otherwise.

The venvs see the machine's site-packages (torch and the other dependencies are not installed again, and
its pip and setuptools do the installing), and the wheel is built without build isolation (no download)."""
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120  # seconds for any one command; the whole module takes ~40 s


def run(cmd, cwd, env=None, check=True):
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MINIPEFT_CACHE", "PYTHONPATH")}
    return {**env, **extra}


def source_copy(into: Path) -> Path:
    """The files a fresh clone has that the package is built from (not the caches and runs of this one)."""
    into.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt", *(p.name for p in ROOT.glob("*.py"))):
        shutil.copy(ROOT / name, into / name)
    shutil.copytree(ROOT / "minipeft", into / "minipeft", ignore=shutil.ignore_patterns("__pycache__"))
    return into


def venv(folder: Path) -> Path:
    """A venv that sees this Python's packages, pip and setuptools included (none of its own)."""
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", folder], cwd=folder.parent)
    return folder / ("Scripts" if os.name == "nt" else "bin")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of a venv with the wheel installed, the wheel)."""
    tmp = tmp_path_factory.mktemp("package")
    source = source_copy(tmp / "src")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-q", "-w", tmp / "dist", source], cwd=tmp)
    wheel = next((tmp / "dist").glob("minipeft-*.whl"))
    bin_dir = venv(tmp / "venv")
    run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", "-q",
         wheel], cwd=tmp)
    return bin_dir, wheel


def test_wheel_holds_the_package_and_the_scripts_only(installed):
    names = zipfile.ZipFile(installed[1]).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"minipeft", next(t for t in tops if t.endswith(".dist-info"))}
    tracked = run(["git", "ls-files", "minipeft"], cwd=ROOT).stdout.split()  # modules and the files they read
    ours = set(tracked) - {"minipeft/_scripts/__init__.py"}  # the wheel's minipeft/_scripts/ is the top scripts
    assert "minipeft/fast/nf4_native.c" in ours
    assert ours <= set(names), f"not in the wheel: {sorted(ours - set(names))} (pyproject.toml: packages, package-data)"
    scripts = sorted(p.name for p in ROOT.glob("*.py"))
    assert {f"minipeft/_scripts/{s}" for s in scripts} <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "minipeft = minipeft.run.command:main" in zipfile.ZipFile(installed[1]).read(entry_points).decode()


def test_command_runs_the_scripts_from_another_folder(installed, tmp_path):
    bin_dir = installed[0]
    command = bin_dir / "minipeft"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_env(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    train_help = run([command, "train", "--help"], cwd=elsewhere, env=env).stdout
    assert train_help.startswith("usage: minipeft train") and "--config" in train_help and "--log" in train_help
    assert "--system" in run([command, "chat", "--help"], cwd=elsewhere, env=env).stdout
    assert run([command, "eval", "--help"], cwd=elsewhere, env=env).stdout.startswith("usage: minipeft eval")
    assert run([command], cwd=elsewhere, env=env, check=False).returncode == 2
    module = run([bin_dir / "python", "-m", "minipeft", "train", "--help"], cwd=elsewhere, env=env).stdout
    assert module == train_help
    bad = run([command, "train", "--batch-size", "0"], cwd=elsewhere, env=env, check=False)
    assert bad.returncode == 2 and "error: --batch-size must be >= 1" in bad.stderr
    # a real run of the installed package: a tiny model on a text file
    (elsewhere / "text.txt").write_text(" ".join(["the cat sat on the mat"] * 40))
    run([command, "train", "--model", "tiny-gpt2", "--task", "text.txt", "--max-len", "16", "--batch-size", "4",
         "--steps", "2", "--skip-test-before", "--out", "run"], cwd=elsewhere, env=env)
    assert (elsewhere / "run" / "adapter" / "adapter.safetensors").is_file()
    assert (elsewhere / "run" / "config.yaml").is_file() and (elsewhere / "run" / "plot.png").is_file()
    summary = json.loads((elsewhere / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert summary["versions"]["minipeft"] == version  # the installed package's (no git checkout there)
    score = run([command, "eval", "--model", "tiny-gpt2", "--task", "text.txt", "--max-len", "16",
                 "--adapter", "run/adapter"], cwd=elsewhere, env=env).stdout
    assert "perplexity" in score


def test_installed_cache_is_the_platforms_unless_minipeft_cache(installed, tmp_path):
    python = installed[0] / "python"
    code = "from minipeft.formats.assets import cache_dir; print(cache_dir())"
    xdg = run([python, "-c", code], cwd=tmp_path, env=clean_env(XDG_CACHE_HOME=str(tmp_path / "xdg"))).stdout
    assert Path(xdg.strip()) == tmp_path / "xdg" / "minipeft"
    home = clean_env(HOME=str(tmp_path))
    home.pop("XDG_CACHE_HOME", None)
    assert Path(run([python, "-c", code], cwd=tmp_path, env=home).stdout.strip()) == tmp_path / ".cache" / "minipeft"
    chosen = run([python, "-c", code], cwd=tmp_path, env=clean_env(MINIPEFT_CACHE=str(tmp_path / "mine"))).stdout
    assert Path(chosen.strip()) == tmp_path / "mine"


def test_editable_install_runs_the_clones_scripts(tmp_path):
    source = source_copy(tmp_path / "clone")
    bin_dir = venv(tmp_path / "venv")
    run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-q", "-e", source], cwd=tmp_path)
    (source / "train.py").write_text("import sys\nprint(\"this clone's train.py\", sys.argv[1:])\n")
    out = run([bin_dir / "minipeft", "train", "--help"], cwd=tmp_path, env=clean_env()).stdout
    assert "this clone's train.py ['--help']" in out
    code = "from minipeft.formats.assets import cache_dir; print(cache_dir())"
    assert Path(run([bin_dir / "python", "-c", code], cwd=tmp_path, env=clean_env()).stdout.strip()) == \
        source / "checkpoints" / "pretrained"


def test_dependencies_are_requirements_txt():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert declared == listed

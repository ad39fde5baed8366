"""README "Add your own method", run as written: the method file is copied out of the README, the
conformance suite (and the memory ledger's check) runs over it, and train.py trains it."""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Add your own method", 1)[1].split("\n## ", 1)[0]


def test_readme_method_passes_the_conformance_suite_and_trains(tmp_path):
    section = readme_section()
    code = re.search(r"```python\n(# my_method\.py.*?)```", section, re.S)[1]
    (tmp_path / "my_method.py").write_text(code)
    commands = re.search(r"```bash\n(.*?)```", section, re.S)[1].strip().splitlines()
    assert len(commands) == 2 and commands[0].startswith("python -m pytest") and \
        commands[1].startswith("python train.py")

    tests = commands[0].split()[1:]
    tests = [str(ROOT / t) if t.startswith("tests/") else str(tmp_path / t) if t.endswith(".py") else t
             for t in tests]
    suite = subprocess.run([sys.executable, *tests, "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert suite.returncode == 0, suite.stdout[-3000:] + suite.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", suite.stdout)[1])
    assert passed >= 40 and "failed" not in suite.stdout  # every promise × flavour × example × head

    args = commands[1].split()[2:]
    args = [str(tmp_path / a) if a.endswith(".py") else a for a in args]
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--out", str(tmp_path / "run"),
                          "--batch-size", "4", "--max-len", "32"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = rows[-1]
    assert summary["event"] == "summary" and summary["method"] == "output_scale"
    assert summary["options"] == {"targets": ["q", "v"]}
    assert summary["trainable_parameters"] == 2 * (64 + 32)  # tiny-llama: 2 layers; q 64 wide, v 32 (GQA)
    assert summary["test_after"]["perplexity"] < summary["test_before"]["perplexity"]

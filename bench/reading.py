"""What a reader meets: the statements the headline run executes (as `coverage report` counts them, and how
many of them ran after import), the modules `import minipeft` loads, the files a reader opens from train.py
to the LoRA update, and the size of minipeft/core/ (lines per file, the longest function).

    python bench/reading.py                 # the headline run for 5 steps, then the tables
    python bench/reading.py --per-file      # every executed file, not only the total per folder
    python bench/reading.py --run qlora     # the statements of another run (sft, qlora: SmolLM2, 2 steps)

Needs coverage (requirements-dev.txt). The headline run: train.py --method lora --rank 8 --steps 5
--eval-every 5 --skip-test-before --save-every 0 (MiniLM on Rotten Tomatoes, as the README's, cut short);
sft and qlora: SmolLM2-135M-Instruct on rotten_tomatoes_instruct, every linear layer, 2 steps of 8, no
evaluation (qlora with activation checkpointing, as the README's QLoRA run).
"""
import argparse
import ast
import collections
import inspect
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_SFT = ["--model", "smollm2", "--task", "rotten_tomatoes_instruct", "--targets", "all", "--steps", "2",
               "--batch-size", "8", "--eval-every", "0", "--save-every", "0"]
RUNS = {
    "headline": ["--method", "lora", "--rank", "8", "--steps", "5", "--eval-every", "5", "--skip-test-before",
                 "--save-every", "0"],
    "sft": ["--method", "lora", *SMOLLM2_SFT],
    "qlora": ["--method", "qlora", "--grad-checkpoint", *SMOLLM2_SFT],
}


def executed_statements(run: list[str], out: Path) -> dict[str, tuple[int, int]]:
    """{file: (statements executed, of which inside a function)} for minipeft/ and train.py during
    `train.py *run`. The others ran at import: imports, constants, every `def` and `class` line."""
    data = out / "coverage.data"
    try:
        import coverage
    except ImportError:
        sys.exit("bench/reading.py needs coverage: pip install -r requirements-dev.txt")
    done = subprocess.run([sys.executable, "-m", "coverage", "run", f"--data-file={data}",
                           "--include=minipeft/*,train.py", "train.py", *run, "--out", str(out / "run")],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"train.py {' '.join(run)} failed:\n{done.stderr[-3000:]}")
    return counted_statements(data, ROOT)


def counted_statements(data: Path, root: Path) -> dict[str, tuple[int, int]]:
    """{file relative to root: (statements executed, of which inside a function)} from a coverage data file,
    statements as `coverage report` counts them: a statement over several lines is one (the lines the
    tracer saw would count a multi-line list or call once per line)."""
    import coverage
    cov = coverage.Coverage(data_file=str(data))
    cov.load()
    executed = {}
    for file in cov.get_data().measured_files():
        _, statements, _, missing, _ = cov.analysis2(file)
        ran = set(statements) - set(missing)
        executed[str(Path(file).relative_to(root))] = (len(ran), len(ran & function_body_lines(Path(file))))
    return executed


def function_body_lines(path: Path) -> set[int]:
    """The line numbers inside the bodies of the functions (and methods) of a file."""
    lines = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines.update(n.lineno for statement in node.body for n in ast.walk(statement) if hasattr(n, "lineno"))
    return lines


def modules_on_import() -> int:
    code = "import sys, minipeft; print(sum(m.startswith('minipeft') for m in sys.modules))"
    return int(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout)


def lora_reading_path() -> dict[str, int]:
    """{file: lines} a reader opens to follow train.py to the LoRA update: train.py, the file of `mp.apply`,
    and the files of LoRALinear and of every base class minipeft defines for it."""
    sys.path.insert(0, str(ROOT))
    import minipeft
    from minipeft.core.lora import LoRALinear
    files = [ROOT / "train.py", Path(inspect.getsourcefile(minipeft.apply))]
    files += [Path(inspect.getsourcefile(c)) for c in LoRALinear.__mro__ if c.__module__.startswith("minipeft")]
    return {str(f.relative_to(ROOT)): len(f.read_text().splitlines()) for f in dict.fromkeys(files)}


def core_sizes() -> tuple[dict[str, int], tuple[int, str]]:
    lines, longest = {}, (0, "")
    for path in sorted((ROOT / "minipeft" / "core").glob("*.py")):
        lines[path.name] = len(path.read_text().splitlines())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                longest = max(longest, (node.end_lineno - node.lineno + 1, f"{path.name}:{node.name}"))
    return lines, longest


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-file", action="store_true", help="list every executed file")
    parser.add_argument("--run", choices=RUNS, default="headline", help="the train.py run to count")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        executed = executed_statements(RUNS[args.run], Path(tmp))
    folders = collections.defaultdict(lambda: [0, 0])
    for file, counts in executed.items():
        for i, count in enumerate(counts):
            folders[str(Path(file).parent) if "/" in file else file][i] += count
    rows = sorted(executed.items()) if args.per_file else sorted(folders.items(), key=lambda row: -row[1][0])
    print(f"| executed by `train.py {' '.join(RUNS[args.run])}` | statements | of which after import |\n"
          "|---|---:|---:|")
    for name, (count, in_functions) in rows:
        print(f"| {name} | {count:,} | {in_functions:,} |")
    total, in_functions = map(sum, zip(*executed.values()))
    print(f"| **total ({len(executed)} files)** | **{total:,}** | **{in_functions:,}** |\n")
    lines, (length, where) = core_sizes()
    loaded = modules_on_import()
    print(f"`import minipeft` loads {loaded} minipeft module{'' if loaded == 1 else 's'}")
    path = lora_reading_path()
    print(f"from train.py to the LoRA update: {len(path)} files, {sum(path.values())} lines "
          f"({', '.join(f'{f} {n}' for f, n in path.items())})")
    print(f"minipeft/core/: {sum(lines.values()):,} lines in {len(lines)} files, the longest {max(lines.values())} "
          f"({max(lines, key=lines.get)}); the longest function {length} lines ({where})")


if __name__ == "__main__":
    main()

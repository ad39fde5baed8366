"""Mutation testing by hand: would a test selection notice if the math in a source file changed?

Each mutant is one small edit of the file's syntax tree:

    arithmetic   a + b <-> a - b, a * b <-> a / b, a ** b -> a * b, a // b -> a * b, << <-> >>,
                 the same in augmented assignments (x -= y -> x += y), x.add_(y) <-> x.sub_(y), x.mul_(y) <-> x.div_(y)
    operands     a @ b -> b @ a; kron / matmul / mm (a, b) -> (b, a); torch.where(c, a, b) -> torch.where(c, b, a)
    comparison   < <-> <=, > <-> >=, == <-> !=, is <-> is not, in <-> not in
    logic        if c -> if not c (also `a if c else b`), and <-> or, not c -> c
    constant     0 -> 1, 1 -> 0, other integers n -> n + 1, 0.0 -> 1.0, other floats x -> 2x, True <-> False, -x -> x
    dropped call x.detach(), x.clone(), x.T, x.transpose(…), x.t(), x.neg_(), x.exp_(), x.square_(), x.sqrt(),
                 x.clamp(…) -> x (torch.sqrt(x) -> x); `with torch.no_grad():` -> its body, run with gradients
    reduction    .sum() <-> .mean(), .max() <-> .min(), .amax() <-> .amin()
    deletion     `x = f(x)` (a name reassigned from itself), `t[i] = …`, `x op= y`, and a call standing
                 alone (`g.mul_(s)`, `nn.init.zeros_(w)`) -> pass

Input checks are left alone (anything inside `raise` or `assert`, the condition of an `if` whose body only
raises), and so are f-strings and annotations. A mutant is written into a scratch copy of the repository
(the working tree is never edited) as the whole file through ast.unparse (comments and layout go,
behaviour stays: the unmutated file, unparsed, is run first and must pass), then the test selection runs
there as `python -m pytest -x -q -p no:cacheprovider SELECTION`. Each mutant ends

    killed     the selection failed: a test noticed (the table names the first failing test)
    survived   it passed: no test checks what the edit changed, or the edit changes nothing (equivalent)
    timeout    it ran past --timeout (noticed, slowly: an endless loop)

Usage (from the repository's root; it is a script, not a test module: pytest does not collect it)

    python tests/mutate.py minipeft/fast/losses.py --list                      # the mutants, numbered
    python tests/mutate.py minipeft/fast/losses.py --tests tests/test_losses.py --sample 25 --seed 0
    python tests/mutate.py minipeft/core/lora.py --only add_lora,LoRALinear,residual_init \\
        --tests "tests/test_lora.py tests/test_lora_family.py -k 'not dora'" --report lora.md
    python tests/mutate.py minipeft/core/lora.py --only LoRALinear --tests tests/test_lora.py --ids 4,9

--only keeps the mutants inside the named functions or classes (`C`, `f` or `C.f`), --skip drops those
inside the ones it names; --sample N draws N of them at random
(seeded, so the numbers stay the same), --ids runs the listed numbers (rerun the survivors after adding
a test). It prints one row per mutant as it finishes and a summary; --report also writes the table.
"""
import argparse
import ast
import copy
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

OPERATORS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
             ast.FloorDiv: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift}
COMPARISONS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
               ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
RENAMED_CALLS = {"add_": "sub_", "sub_": "add_", "mul_": "div_", "div_": "mul_", "add": "sub", "sub": "add",
                 "mul": "div", "div": "mul", "sum": "mean", "mean": "sum", "max": "min", "min": "max",
                 "amax": "amin", "amin": "amax"}
DROPPED_CALLS = {"detach", "clone", "transpose", "t", "neg", "neg_", "exp_", "square_", "sqrt", "clamp", "clamp_"}
SWAPPED_ARGUMENTS = {"kron": (0, 1), "matmul": (0, 1), "mm": (0, 1), "where": (1, 2)}
MODULES = {"torch", "F", "nn", "math"}  # torch.sqrt(x): the dropped call leaves its argument
CHECKS = (ast.Raise, ast.Assert, ast.JoinedStr)


@dataclass
class Mutant:
    id: int
    line: int
    kind: str
    before: str
    after: str
    path: tuple  # where the edit goes: (field, index) steps from the module down to the node
    new: object  # the node (or, for a statement list, the nodes) put there


# ----------------------------------------------------------------------------------------------- mutants

def walk(node, path=(), ancestors=()):
    """Every node with its path from the root and its ancestors (depth first, in source order)."""
    yield path, node, ancestors
    for field, value in ast.iter_fields(node):
        children = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, child in children:
            if isinstance(child, ast.AST):
                yield from walk(child, path + ((field, index),), ancestors + (node,))


def only_raises(node) -> bool:
    return isinstance(node, ast.If) and all(isinstance(statement, ast.Raise) for statement in node.body)


def is_input_check(path, node, ancestors) -> bool:
    """Inside raise / assert / an f-string / an annotation, or an `if` that only raises (or its test)."""
    if any(isinstance(a, CHECKS) for a in ancestors) or any(f in ("annotation", "returns") for f, _ in path):
        return True
    return only_raises(node) or any(only_raises(a) and path[i][0] == "test" for i, a in enumerate(ancestors))


def changed(node, **fields):
    new = copy.deepcopy(node)
    for name, value in fields.items():
        setattr(new, name, value)
    return new


def constant_mutants(node):
    value = node.value
    if isinstance(value, bool):
        return [("constant", changed(node, value=not value))]
    if isinstance(value, int):
        return [("constant", changed(node, value={0: 1, 1: 0}.get(value, value + 1)))]
    if isinstance(value, float):
        return [("constant", changed(node, value=2 * value if value else 1.0))]
    return []


def call_mutants(node):
    func, out = node.func, []
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name in RENAMED_CALLS and isinstance(func, ast.Attribute):
        out.append(("reduction" if name in ("sum", "mean", "max", "min", "amax", "amin") else "arithmetic",
                    changed(node, func=changed(func, attr=RENAMED_CALLS[name]))))
    if name in DROPPED_CALLS and isinstance(func, ast.Attribute):
        on_module = isinstance(func.value, ast.Name) and func.value.id in MODULES
        if not on_module or node.args:
            out.append(("dropped call", copy.deepcopy(node.args[0] if on_module else func.value)))
    if name in SWAPPED_ARGUMENTS and len(node.args) > max(SWAPPED_ARGUMENTS[name]):
        i, j = SWAPPED_ARGUMENTS[name]
        args = copy.deepcopy(node.args)
        args[i], args[j] = args[j], args[i]
        out.append(("operands", changed(node, args=args)))
    return out


def is_no_grad(item) -> bool:
    call = item.context_expr
    return isinstance(call, ast.Call) and getattr(call.func, "attr", getattr(call.func, "id", "")) == "no_grad"


def deletable(node) -> bool:
    """Statements whose deletion leaves a program that still runs (so a test must look at the value)."""
    if isinstance(node, ast.AugAssign):
        return True
    if isinstance(node, ast.Expr):
        return isinstance(node.value, ast.Call)
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
        names = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
        return isinstance(target, ast.Subscript) or isinstance(target, ast.Name) and target.id in names
    return False


def mutants_of(node):
    """(kind, replacement) for every mutation of this one node."""
    out = []
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in OPERATORS:
        out.append(("arithmetic", changed(node, op=OPERATORS[type(node.op)]())))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
        out.append(("operands", changed(node, left=node.right, right=node.left)))
    if isinstance(node, ast.Compare):
        out += [("comparison", changed(node, ops=node.ops[:i] + [COMPARISONS[type(op)]()] + node.ops[i + 1:]))
                for i, op in enumerate(node.ops)]
    negated = isinstance(getattr(node, "test", None), ast.UnaryOp) and isinstance(node.test.op, ast.Not)
    if isinstance(node, (ast.If, ast.IfExp, ast.While)) and not negated:  # `if not c` -> `if c`: below
        out.append(("logic", changed(node, test=ast.UnaryOp(ast.Not(), node.test))))
    if isinstance(node, ast.BoolOp):
        out.append(("logic", changed(node, op=ast.Or() if isinstance(node.op, ast.And) else ast.And())))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        out.append(("constant" if isinstance(node.op, ast.USub) else "logic", copy.deepcopy(node.operand)))
    if isinstance(node, ast.Constant):
        out += constant_mutants(node)
    if isinstance(node, ast.Attribute) and node.attr == "T":
        out.append(("dropped call", copy.deepcopy(node.value)))
    if isinstance(node, ast.Call):
        out += call_mutants(node)
    if isinstance(node, ast.With) and any(is_no_grad(item) for item in node.items):
        out.append(("dropped call", copy.deepcopy(node.body)))  # a list: spliced in place of the with
    if deletable(node):
        out.append(("deletion", ast.Pass()))
    return out


def scope_of(ancestors) -> set:
    """The names of the enclosing functions and classes, alone and dotted: {"C", "f", "C.f"}."""
    names = [a.name for a in ancestors if isinstance(a, (ast.FunctionDef, ast.ClassDef))]
    return set(names) | {".".join(names)}


def all_mutants(tree, source: str, only: set, skip: set) -> list[Mutant]:
    """Every mutant of the file, numbered in source order; inside `only` (if given), outside `skip`."""
    mutants = []
    for path, node, ancestors in walk(tree):
        scope = scope_of(ancestors + (node,))
        if is_input_check(path, node, ancestors) or only and not scope & only or scope & skip:
            continue
        if isinstance(node, ast.Constant) and ancestors and isinstance(ancestors[-1], ast.UnaryOp):
            continue  # -100, -1: one mutant, the sign's
        for kind, new in mutants_of(node):
            before, after = shown(source, node, new)
            mutants.append(Mutant(len(mutants), node.lineno, kind, before, after, path, new))
    return mutants


def shown(source: str, node, new) -> tuple[str, str]:
    """The mutated line before and after, cut to the part around the edit (a block: its first line; a
    with's body: its first statement; an expression over several lines: unparsed on one)."""
    line = source.splitlines()[node.lineno - 1]
    if isinstance(new, list):
        return line.strip(), "(its body, no with) " + ast.unparse(new[0]).splitlines()[0]
    if isinstance(node, ast.stmt) and not isinstance(new, ast.Pass):
        return line.strip(), ast.unparse(new).splitlines()[0]
    if node.lineno != node.end_lineno:
        line, start, end = ast.unparse(node), 0, len(ast.unparse(node))
    else:
        start = len(line.encode()[:node.col_offset].decode())  # col offsets count UTF-8 bytes
        end = len(line.encode()[:node.end_col_offset].decode())
    after = line[:start] + ast.unparse(new) + line[end:]
    first = next((i for i, (a, b) in enumerate(zip(line, after)) if a != b), min(len(line), len(after)))
    same_tail = next((i for i, (a, b) in enumerate(zip(line[::-1], after[::-1])) if a != b), 0)
    same_tail = min(same_tail, len(line) - first, len(after) - first)
    return around(line, first, len(line) - same_tail), around(after, first, len(after) - same_tail)


def around(line: str, start: int, end: int, width: int = 56) -> str:
    """The part of a line around [start, end), about `width` characters."""
    indent = len(line) - len(line.lstrip())
    margin = max(0, (width - (end - start)) // 2)
    first, last = max(indent, start - margin), end + margin
    return ("…" if first > indent else "") + line[first:last] + ("…" if last < len(line) else "")


def mutated_source(tree, mutant: Mutant) -> str:
    tree = copy.deepcopy(tree)
    *steps, (field, index) = mutant.path
    parent = tree
    for step_field, step_index in steps:
        parent = getattr(parent, step_field) if step_index is None else getattr(parent, step_field)[step_index]
    new = copy.deepcopy(mutant.new)
    if index is None:
        setattr(parent, field, new)
    else:
        getattr(parent, field)[index:index + 1] = new if isinstance(new, list) else [new]
    return ast.unparse(ast.fix_missing_locations(tree))


# ----------------------------------------------------------------------------------------------- running

def scratch_copy() -> Path:
    """A copy of the repository in a temporary folder (without .git, caches and checkpoints)."""
    root = Path(tempfile.mkdtemp(prefix="minipeft-mutants-")) / "repo"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "checkpoints"))
    (root / "checkpoints").mkdir()
    return root


def run_tests(repo: Path, selection: str, timeout: float) -> tuple[str, float, str]:
    """(killed | survived | timeout, seconds, the first failing test or the last line pytest printed)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *shlex.split(selection)]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # a stale .pyc of another mutant must never load
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the whole session pytest started, nothing else
        process.communicate()
        return "timeout", time.monotonic() - start, ""
    seconds, lines = time.monotonic() - start, output.strip().splitlines() or [""]
    if process.returncode == 5:
        raise SystemExit(f"the selection {selection!r} collects no tests; check --tests")
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return ("survived" if process.returncode == 0 else "killed"), seconds, (failed or lines)[-1 if not failed else 0]


def row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def shorten(text: str, width: int = 64) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="the source file to mutate, relative to the repository's root")
    parser.add_argument("--tests", default="tests", help="the pytest selection, as one string (paths, -k …)")
    parser.add_argument("--only", default="", help="comma-separated functions / classes to mutate (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated functions / classes to leave alone")
    parser.add_argument("--sample", type=int, default=0, help="run this many mutants drawn at random (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample")
    parser.add_argument("--ids", default="", help="comma-separated mutant numbers to run (overrides --sample)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run before it counts as timeout")
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    parser.add_argument("--report", help="also write the table (Markdown) to this file")
    args = parser.parse_args(argv)

    source = (REPO / args.file).read_text()
    tree = ast.parse(source)
    names = lambda text: set(filter(None, text.split(",")))  # noqa: E731
    mutants = all_mutants(tree, source, names(args.only), names(args.skip))
    if args.ids:
        chosen = [mutants[int(i)] for i in args.ids.split(",")]
    elif args.sample and args.sample < len(mutants):
        chosen = sorted(random.Random(args.seed).sample(mutants, args.sample), key=lambda m: m.id)
    else:
        chosen = mutants
    header = ["id", "line", "kind", "before", "after"]
    print(f"{args.file}: {len(mutants)} mutants, running {len(chosen)}" if not args.list else
          f"{args.file}: {len(mutants)} mutants\n" + row(header))
    if args.list:
        for m in mutants:
            print(row([m.id, m.line, m.kind, shorten(m.before), shorten(m.after)]))
        return
    repo = scratch_copy()
    try:
        results = run_all(tree, args, chosen, repo)
    finally:
        shutil.rmtree(repo.parent)
    summary = {verdict: sum(r[-3] == verdict for r in results) for verdict in ("killed", "survived", "timeout")}
    lines = [row(header + ["result", "s", "first failure"]), row(["---"] * 8), *map(row, results),
             "", f"{args.file} ({args.tests}): {len(results)} run of {len(mutants)}, " +
             ", ".join(f"{n} {verdict}" for verdict, n in summary.items())]
    print("\n" + "\n".join(lines))
    if args.report:
        Path(args.report).write_text("\n".join(lines) + "\n")


def run_all(tree, args, chosen, repo) -> list[list]:
    """The baseline (the unparsed, unmutated file must pass), then every chosen mutant; rows of the table."""
    target = repo / args.file
    target.write_text(ast.unparse(tree))
    verdict, seconds, last = run_tests(repo, args.tests, args.timeout)
    if verdict != "survived":
        raise SystemExit(f"the unmutated file fails the selection ({verdict}: {last}); fix that first")
    print(f"baseline passes in {seconds:.0f} s", flush=True)
    results = []
    for m in chosen:
        target.write_text(mutated_source(tree, m))
        verdict, seconds, last = run_tests(repo, args.tests, args.timeout)
        test = last.removeprefix("FAILED ").removeprefix("ERROR ").split(" - ")[0].removeprefix("tests/")
        results.append([m.id, m.line, m.kind, shorten(m.before), shorten(m.after), verdict, f"{seconds:.0f}",
                        shorten(test, 80)])
        print(row(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()

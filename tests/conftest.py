"""Helpers every test module shares: tiny models and batches, the conformance cases (every example
option set of every registered method × flavour × head), and the `--method-file` option that registers
a user's own method before collection, so the conformance suite tests it too:

    python -m pytest tests/test_methods.py --method-file my_method.py -k my_method
    python -m pytest -m exhaustive            # the whole product: every example × flavour × head × case
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import minipeft as mp
import minipeft.fast
from minipeft.core.model import FAMILIES as FAMILY_TABLE

# The tests' tensors are tiny: one intra-op thread avoids the thread pool's start-up and hand-off cost,
# which on 2 cores costs more than the arithmetic (train.py runs in subprocesses keep their default).
torch.set_num_threads(1)

FAMILIES = tuple(FAMILY_TABLE)  # every family; the conformance suite runs all of them under -m exhaustive
# the families every test runs by default: the three original ones and Qwen2 (biases on q, k, v only, the
# pattern bitfit meets in today's models). Every family runs every method in tests/test_families.py.
FLAVORS = ("gpt2", "bert", "llama", "qwen2")
HEADS = ("lm", "classifier")


@pytest.fixture(autouse=True)
def fast_twins_as_they_were():
    """A test that runs train.py's main() in this process turns the fast twins on (train.py does); put them
    back as they were, so the next test runs the version it asks for (a module may turn them on for all of
    its tests with a fixture of its own)."""
    were = minipeft.fast.enabled()
    yield
    minipeft.fast.enable() if were else minipeft.fast.disable()


def pytest_addoption(parser):
    parser.addoption("--method-file", action="append", default=[], metavar="FILE",
                     help="a Python file that registers a method with mp.register, imported before the "
                          "conformance suite is collected")


def pytest_configure(config):
    config.addinivalue_line("markers", "exhaustive: the full product of every axis (deselected by default; "
                                       "run with -m exhaustive)")
    for file in config.getoption("method_file"):
        path = Path(file)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)


# per family, what its tiny model sets beyond the shared sizes, so that every code path runs: GQA (4 heads
# sharing 2 key/value heads), untied heads, head_dim != d_model / n_head, sliding windows shorter than
# tiny_batch's rows, partial and scaled RoPE, a query scale other than head_dim, RoBERTa's position offset.
# A field a switch reads (norm eps, RoPE base and scaling, head_dim, window, query scale, soft-caps) is set
# to a value that is neither transformers' default for the family nor ModelConfig's, so code that ignores
# it changes the numbers (llama's and qwen2's head_dim stays d_model / n_head, transformers' default for
# both, which the default suite's shapes assume)
_EPS = dict(norm_eps=1e-4)
_ROPE = dict(_EPS, n_kv_head=2, tie_embeddings=False, rope_theta=500.0)
TINY_EXTRAS = {
    "gpt2": _EPS,
    "bert": _EPS,
    "roberta": dict(_EPS, pos_offset=1),  # padding_idx + 1, with pad_token_id 0
    "distilbert": _EPS,
    "llama": dict(_ROPE, rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "mistral": dict(_ROPE, head_dim=16, sliding_window=4),
    "qwen2": _ROPE,
    "qwen3": dict(_ROPE, head_dim=16),
    "phi3": dict(_ROPE, head_dim=16, sliding_window=5, rope_fraction=0.5),
    "gemma": dict(_ROPE, head_dim=16, tie_embeddings=True),
    "gemma2": dict(_ROPE, head_dim=16, sliding_window=4, attn_scale=12.0, attn_softcap=5.0, final_softcap=3.0),
    "gemma3": dict(_ROPE, head_dim=16, sliding_window=4, attn_scale=12.0, rope_local_theta=100.0,
                   rope_scaling={"rope_type": "linear", "factor": 2.0}, final_softcap=4.0, tie_embeddings=True),
}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as lscpu lists them (read from /proc/cpuinfo; none known elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return {flag for line in lines if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def tiny_config(flavor: str, n_classes=None, **overrides) -> mp.ModelConfig:
    """A 2-layer model small enough to run a backward pass in milliseconds (TINY_EXTRAS per family)."""
    kw = dict(flavor=flavor, vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=64,
              n_classes=n_classes, pad_token_id=0, **TINY_EXTRAS.get(flavor, {}))
    kw.update(overrides)
    return mp.ModelConfig(**kw)


def tiny_model(flavor: str, n_classes=None, seed: int = 0, **overrides) -> mp.Transformer:
    torch.manual_seed(seed)
    return mp.Transformer(tiny_config(flavor, n_classes, **overrides))


def tiny_batch(vocab=97, B=3, T=12, seed=1):
    """Token ids (B, T) and a right-padded attention mask whose rows have different lengths."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for row in range(1, B):
        mask[row, T - 3 * row:] = 0
    idx[mask == 0] = 0
    return idx, mask


def random_words_file(folder: Path) -> Path:
    """A .txt LM task of 300 words drawn (seeded) from a small vocabulary: the multi-process tests' data."""
    import random
    rng = random.Random(1)
    vocab = "to be or not to be that is the question whether tis nobler in the mind".split()
    path = folder / "text.txt"
    path.write_text(" ".join(rng.choice(vocab) for _ in range(300)))
    return path


def spawn_gloo_group(worker, folder, *args, nprocs: int = 2):
    """Run worker(rank, nprocs, str(folder), *args) in `nprocs` new processes (torch.multiprocessing's
    spawn); the worker joins the group with join_gloo_group(rank, world_size, folder) and destroys it.

    A process whose worker returned leaves at once with os._exit(0), skipping the interpreter's
    finalization. Once a process has used DTensor (FSDP2 does), destroy_process_group no longer ends
    the gloo process group (torch keeps references to it), so its worker threads still run while the
    interpreter finalizes; a worker thread that is just releasing a finished collective then needs the
    GIL to free the collective's tensors, Python ends that thread (it may not take the GIL during
    finalization), the unwinding crosses C++ code that must not throw, and the process aborts:
    "terminate called without an active exception", "process 0 terminated with signal SIGABRT", after
    the test's work was done and written (seen in 1 of 20 to 40 short runs under load; a core dump
    shows ProcessGroupGloo::runLoop destroying an AsyncAllgatherCoalescedWork while the main thread is
    in Py_FinalizeEx). A worker that raised still leaves the usual way, with its traceback."""
    import torch.multiprocessing as multiprocessing
    multiprocessing.spawn(_work_then_leave, args=(worker, (nprocs, str(folder), *args)), nprocs=nprocs)


def _work_then_leave(rank: int, worker, args: tuple):
    import os
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def join_gloo_group(rank: int, world_size: int, folder: str):
    """Join the gloo process group of `world_size` processes that meet through the file
    <folder>/gloo-rendezvous (a new folder for each group, e.g. the test's tmp_path).

    A file (torch.distributed's FileStore), not a TCP port found free beforehand: until rank 0
    listens on that port, another process group on this machine (a test session running at the same
    time) may take it, and two groups that share one rendezvous pair their ranks across the groups,
    where gloo aborts the first process that receives a message of the wrong size."""
    import faulthandler

    import torch.distributed as dist
    faulthandler.enable()  # a crash in native code prints every thread's Python stack to the test's stderr
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{Path(folder) / 'gloo-rendezvous'}", rank=rank,
                            world_size=world_size)


def tiny_tokenizer() -> Tokenizer:
    """A word-level tokenizer whose ids fit the tiny models' 97-token vocabulary (prompt init="text")."""
    words = ["[UNK]", "a", "review", "movie", "great", "awful", "the", "is"]
    tokenizer = Tokenizer(models.WordLevel({w: i + 1 for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


# ------------------------------------------------------------------------------ conformance cases

def conformance_cases(exhaustive: bool = False, flavors=None, heads=HEADS):
    """(method, example index, flavour, head) for every registered method. By default every example
    option set runs on every flavour of FLAVORS with the LM head, and the defaults (example 0) with the
    classifier head too: each axis covered in full against the defaults of the others. `exhaustive`: the
    product, over every family (FAMILIES). `flavors` restricts either to those given."""
    flavors = flavors or (FAMILIES if exhaustive else FLAVORS)
    cases = []
    for method in mp.METHODS.values():
        for i, _ in enumerate(method.examples):
            for flavor in (f for f in flavors if f in method.flavors):
                for head in heads:
                    if exhaustive or i == 0 or head == "lm":
                        cases.append((method.name, i, flavor, head))
    return cases


def case_params(exhaustive_rest: bool = True, **filters):
    """conformance_cases as pytest params with readable ids; with `exhaustive_rest`, the cases only the
    full product has are added under the `exhaustive` marker."""
    default = conformance_cases(**filters)
    params = [pytest.param(*c, id=f"{c[0]}{c[1]}-{c[2]}-{c[3]}") for c in default]
    if exhaustive_rest:
        params += [pytest.param(*c, id=f"{c[0]}{c[1]}-{c[2]}-{c[3]}", marks=pytest.mark.exhaustive)
                   for c in conformance_cases(exhaustive=True, **filters) if c not in default]
    return params


def example_options(method: str, example: int) -> dict:
    return dict(mp.METHODS[method].examples[example])


def build(method, example, flavor, head, seed=0, **model_overrides):
    """A tiny model with `method` applied with its `example`-th option set."""
    model = tiny_model(flavor, n_classes=2 if head == "classifier" else None, seed=seed, **model_overrides)
    return mp.apply(model, method, tokenizer=tiny_tokenizer(), **example_options(method, example))


def loss_of(model, idx, mask):
    out = model(idx, attention_mask=mask)
    return out.float().pow(2).mean()


def perturb_trainable(model, seed=3, scale=0.02):
    """Move every trainable parameter a little (scale · N(0, 1)), as a few training steps would: at init
    some gradients are exactly zero by design (LoRA's A while B = 0), which would hide a broken gradient path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(params=FLAVORS)
def flavor(request):
    return request.param

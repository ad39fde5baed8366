"""Gemma 3 270M, the real weights (named asset gemma3-270m, a Q4_K_M GGUF), against transformers' own
GGUF loader: logits within 1e-3 over 320 Hamlet tokens, identical token ids on Hamlet and on Rotten
Tomatoes sentences, and the known greedy continuation.

    python -m pytest tests/test_gemma3_270m.py -s      # prints the largest logit differences

transformers takes minutes to load this file (bench/load.py measures it), so its outputs are
computed once, on the first run, and kept beside the asset as `transformers-<version>-reference.safetensors`
(the asset itself is cached the same way): full logits at every 10th position, and at every position
the 32 largest logits and the log-sum-exp. Later runs load only our side (a few tens of seconds).
"""
import bz2
import csv
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

from minipeft.formats.assets import asset_path
from minipeft.formats.atomic import atomic_write
from minipeft.formats.pretrained import from_pretrained

transformers = pytest.importorskip("transformers")

T, STRIDE, TOP = 320, 10, 32


def texts() -> dict[str, list[str]]:
    hamlet = asset_path("hamlet").read_text(encoding="utf-8")
    with bz2.open(asset_path("rotten_tomatoes"), "rt", encoding="utf-8", newline="") as f:
        reviews = [r["text"] for r in csv.DictReader(f) if r["category"] != "plot"][:3000]
    return {"hamlet": [hamlet], "rotten_tomatoes": reviews}


def flat(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    return {"ids": torch.tensor([i for row in rows for i in row], dtype=torch.int32),
            "lengths": torch.tensor([len(row) for row in rows], dtype=torch.int32)}


def transformers_reference() -> dict[str, torch.Tensor]:
    """transformers' token ids and logits for this file, computed once and cached (see the docstring)."""
    path = asset_path("gemma3-270m")
    cached = path.parent / f"transformers-{transformers.__version__}-reference.safetensors"
    if cached.exists():
        return load_file(cached)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    reference = {}
    for name, items in texts().items():
        for key, value in flat(tokenizer(items)["input_ids"]).items():
            reference[f"{name}.{key}"] = value
    ids = reference["hamlet.ids"][2000:2000 + T].long()[None]  # (1, T)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # (T, V)
    top = logits.topk(TOP, dim=-1)
    reference.update({"logits.input": ids[0], "logits.every_10th": logits[::STRIDE].contiguous(),
                      "logits.top_values": top.values, "logits.top_ids": top.indices,
                      "logits.logsumexp": logits.logsumexp(-1)})
    atomic_write(cached, lambda tmp: save_file({k: v.contiguous() for k, v in reference.items()}, tmp))
    return reference


@pytest.fixture(scope="module")
def gemma():
    return from_pretrained("gemma3-270m")


@pytest.fixture(scope="module")
def reference():
    return transformers_reference()


def test_the_config_is_gemma3_270m(gemma):
    cfg = gemma[0].cfg
    sizes = (cfg.flavor, cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim)
    assert sizes == ("gemma3", 18, 640, 4, 1, 256)
    assert (cfg.sliding_window, cfg.layer_pattern, cfg.rope_theta, cfg.rope_local_theta) == (512, "SSSSSF", 1e6, 1e4)
    assert cfg.vocab_size == 262_144 and cfg.tie_embeddings and cfg.extra["bos_token_id"] == 2


def test_logits_match_transformers_gguf_loader(gemma, reference):
    model, _ = gemma
    with torch.no_grad():
        logits = model(reference["logits.input"].long()[None])[0]  # (T, V)
    diffs = {"every 10th position, all logits": (logits[::STRIDE] - reference["logits.every_10th"]).abs().max(),
             "every position, top 32": (logits.gather(-1, reference["logits.top_ids"])
                                        - reference["logits.top_values"]).abs().max(),
             "every position, log-sum-exp": (logits.logsumexp(-1) - reference["logits.logsumexp"]).abs().max()}
    print("\n" + "\n".join(f"largest |logit difference|, {k}: {v:.2e}" for k, v in diffs.items()))
    assert all(d < 1e-3 for d in diffs.values()), diffs


@pytest.mark.parametrize("name", ["hamlet", "rotten_tomatoes"])
def test_token_ids_match_transformers_gguf_tokenizer(name, gemma, reference):
    _, tokenizer = gemma
    ours = flat([e.ids for e in tokenizer.encode_batch(texts()[name])])
    assert torch.equal(ours["lengths"], reference[f"{name}.lengths"])
    assert torch.equal(ours["ids"], reference[f"{name}.ids"])


def test_greedy_continues_hamlet(gemma):
    model, tokenizer = gemma
    ids = torch.tensor([tokenizer.encode("To be, or not to be,").ids])
    out = model.generate(ids, max_new_tokens=6)
    assert tokenizer.decode(out[0, ids.shape[1]:].tolist()).startswith(" that is the question.")

"""Models by hub id: a tiny HF model laid out in a Hugging Face cache folder as huggingface_hub lays out
a download (blobs, snapshot links, refs/main) loads by its id with no network, as transformers loads it
from the same cache; adapters (both formats) name the id and its commit, and peft loads its base by
them; an id that is not there stops with one sentence."""
import hashlib
import json
import os
import shutil
import sys

import pytest
import torch

import minipeft as mp
import train as train_cli
from minipeft.formats import hub
from test_pretrained import right_padded, save_hf, tiny_hf_llama, write_gguf
from test_robust import run_main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HUB_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache, hub_id: str, folder, commit: str = COMMIT):
    """Copy `folder`'s files into `cache` as a download of `hub_id` at `commit`: each file a blob named by
    its sha256, linked from snapshots/<commit>/, and refs/main naming the commit."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """(transformers' model, the hub cache folder holding it as tiny-org/tiny-llama)."""
    hf = tiny_hf_llama()
    folder = save_hf(hf, tmp_path_factory.mktemp("saved"))
    cache = tmp_path_factory.mktemp("hub")
    cache_model(cache, HUB_ID, folder)
    return hf, cache


@pytest.fixture
def hub_env(cached, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(cached[1]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cached


def test_hub_id_loads_from_the_cache_as_transformers_loads_it(hub_env):
    _, cache = hub_env
    theirs = transformers.AutoModelForCausalLM.from_pretrained(HUB_ID, cache_dir=str(cache),
                                                               local_files_only=True).eval()
    ours, _ = mp.from_pretrained(HUB_ID)
    idx, mask = right_padded(257)
    with torch.no_grad():
        ref = theirs(input_ids=idx, attention_mask=mask).logits
        out = ours(idx, attention_mask=mask)
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max().item() < 1e-5
    assert ours.cfg.extra["source"] == HUB_ID and ours.cfg.extra["revision"] == COMMIT


def test_cache_folder_follows_hf_home_and_xdg(cached, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub.cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    shutil.copytree(cached[1], tmp_path / "xdg" / "huggingface" / "hub", symlinks=True)
    assert hub.cached_snapshot(HUB_ID) == tmp_path / "xdg" / "huggingface" / "hub" / \
        "models--tiny-org--tiny-llama" / "snapshots" / COMMIT


def test_adapters_name_the_hub_id_and_peft_loads_the_base_by_it(hub_env, tmp_path):
    _, cache = hub_env
    model, _ = mp.from_pretrained(HUB_ID)
    mp.apply(model, "lora", rank=4, targets=("q", "v"))
    mp.save_adapter(model, tmp_path / "ours")
    base = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["base"]
    assert (base["source"], base["revision"]) == (HUB_ID, COMMIT)
    mp.save_adapter(model, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (HUB_ID, COMMIT)
    # peft finds the base by the id and commit the adapter names, in the same cache, offline
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft"), cache_dir=str(cache),
                                                           local_files_only=True)
    assert loaded.peft_config["default"].base_model_name_or_path == HUB_ID
    # and minipeft loads the adapter into the base named by id
    again, _ = mp.from_pretrained(base["source"])
    mp.load_adapter(again, tmp_path / "ours")


def test_train_by_hub_id(hub_env, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the cat sat on the mat"] * 30))
    code, err = run_main(train_cli.main, ["--model", HUB_ID, "--task", text, "--max-len", "16", "--batch-size", "4",
                                          "--steps", "2", "--skip-test-before", "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    base = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["base"]
    assert (base["source"], base["revision"]) == (HUB_ID, COMMIT)


def test_snapshot_of_one_gguf_file_loads_it(monkeypatch, tmp_path):
    hf = tiny_hf_llama()
    folder = tmp_path / "gguf"
    folder.mkdir()
    write_gguf(folder / "tiny.Q8_0.gguf", hf)
    cache_model(tmp_path / "hub", "tiny-org/tiny-llama-GGUF", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub.model_path("tiny-org/tiny-llama-GGUF").name == "tiny.Q8_0.gguf"
    model, _ = mp.from_pretrained("tiny-org/tiny-llama-GGUF")
    assert model.cfg.n_layer == 2 and model.cfg.extra["revision"] == COMMIT


def test_hub_id_not_in_the_cache_is_one_sentence(hub_env, tmp_path, capsys, monkeypatch):
    args = ["--model", "tiny-org/not-there", "--task", "hamlet", "--out", tmp_path / "run"]
    code, err = run_main(train_cli.main, args, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: 'tiny-org/not-there' is not a local folder nor in the Hugging Face cache ({hub_env[1]}), and "
        "HF_HUB_OFFLINE forbids downloading it; copy it into the cache or unset HF_HUB_OFFLINE"]
    monkeypatch.delenv("HF_HUB_OFFLINE")  # (huggingface_hub itself stays offline: read when it was imported)
    code, err = run_main(train_cli.main, args, capsys)
    assert code == 2 and "and downloading it failed (" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    code, err = run_main(train_cli.main, args, capsys)
    assert code == 2 and "pip install huggingface_hub to download it" in err
    assert not (tmp_path / "run").exists()

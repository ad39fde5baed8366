"""Models named by their Hugging Face hub id (`--model HuggingFaceTB/SmolLM2-135M-Instruct`), read from
the local Hugging Face cache, where transformers and huggingface_hub keep what they download:

    $HF_HUB_CACHE   (else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub)
        models--HuggingFaceTB--SmolLM2-135M-Instruct/
            refs/main                   the commit that "main" names
            snapshots/<commit>/         config.json, model.safetensors, tokenizer.json, ... (links into blobs/)
            blobs/

The snapshot of refs/main is an ordinary HF folder (pretrained.py loads it); a snapshot holding one
.gguf file and no config.json is that file. Nothing goes to the network for a model in the cache. One
that is not there is downloaded with huggingface_hub (config, tokenizer, safetensors weights), where it
is installed and HF_HUB_OFFLINE is not set; otherwise, or when the download fails, one sentence says so.
The model keeps the hub id as its source and the commit as its revision (model.cfg.extra), so adapters
(adapter_io.py) and peft adapters (peft_format/) name them.
"""
import os
import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # ORG/NAME
DOWNLOADED = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]  # what a download fetches


def is_hub_id(name: str) -> bool:
    """ORG/NAME, and not a local path (an existing one, or one to a .gguf file)."""
    return bool(HUB_ID.fullmatch(name)) and ".." not in name and not name.endswith(".gguf") and not Path(name).exists()


def cache_dir() -> Path:
    """The Hugging Face hub cache, found as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_snapshot(hub_id: str) -> Path | None:
    """The cache's snapshot folder of refs/main (or its only snapshot), or None if the model is not there."""
    repo = cache_dir() / f"models--{hub_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file() and (snapshot := repo / "snapshots" / ref.read_text().strip()).is_dir():
        return snapshot
    snapshots = [p for p in (repo / "snapshots").glob("*") if p.is_dir()]
    return snapshots[0] if len(snapshots) == 1 else None


def model_path(hub_id: str) -> Path:
    """The folder (or .gguf file) of the model `hub_id`: from the cache, or downloaded into it."""
    snapshot = cached_snapshot(hub_id) or download(hub_id)
    ggufs = list(snapshot.glob("*.gguf"))
    if not (snapshot / "config.json").is_file() and len(ggufs) == 1:
        return ggufs[0]
    return snapshot


def download(hub_id: str) -> Path:
    """huggingface_hub's snapshot_download of the files a model needs; FileNotFoundError when it cannot."""
    where = f"{hub_id!r} is not a local folder nor in the Hugging Face cache ({cache_dir()})"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", ""):
        raise FileNotFoundError(f"{where}, and HF_HUB_OFFLINE forbids downloading it; copy it into the cache "
                                "or unset HF_HUB_OFFLINE")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{where}; pip install huggingface_hub to download it, or copy it into the "
                                "cache") from None
    try:
        return Path(snapshot_download(hub_id, allow_patterns=DOWNLOADED, cache_dir=cache_dir()))
    except Exception as e:  # whatever stops it (no network, an unknown or gated id) is said in one line
        reason = " ".join(str(e).split())[:200]
        raise FileNotFoundError(f"{where}, and downloading it failed ({type(e).__name__}: {reason}); check the "
                                "id and the network, or copy the model into the cache") from None

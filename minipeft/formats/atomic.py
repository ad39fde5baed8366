"""Write a file so that a crash at any moment leaves either the old file or the whole new one.

    atomic_write(path, lambda tmp: save_file(tensors, tmp))

The writer fills a temporary file beside `path`; it is flushed to disk (fsync) and renamed over `path`
(a rename within one folder is atomic on POSIX and Windows). Adapters and checkpoints are saved this way.
"""
import os
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[str], None]):
    """`write(tmp)` writes the file under a temporary name, which is then fsynced and renamed to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

"""Content hashes: how stages prove that their inputs are the ones a manifest was written against."""

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks (shards can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def directory_hash(path: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over (relative name, bytes) of every file below `path`, in sorted order.

    Names are part of the hash so that renaming a file changes it; `exclude` skips bookkeeping files
    (e.g. a metadata file that itself records the hash).
    """
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel in exclude:
            continue
        digest.update(rel.encode() + b"\0" + file_sha256(file).encode() + b"\n")
    return digest.hexdigest()

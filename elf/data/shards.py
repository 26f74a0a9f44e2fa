"""Few, large Parquet shards with a manifest, written atomically and read back as a stream.

A stage writes its whole output directory under a temporary sibling name and renames it into place
only when every shard and the manifest are complete, so a crash or kill never leaves a torn output:
the next run removes the leftovers and starts that output again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from elf.errors import ElfError
from elf.hashing import file_sha256

MANIFEST = "manifest.json"


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


@contextlib.contextmanager
def atomic_output_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `final` only if the block succeeds.

    Leftover temporary directories of killed runs are removed first. On any exception the temporary
    directory is deleted and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(_tmp_prefix(final) + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f"{_tmp_prefix(final)}{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing it; the old `dst` is moved aside first, then deleted."""
    if dst.exists():
        trash = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | Path, what: str = "file") -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ElfError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ElfError(f"{path}: {what} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ElfError(f"{path}: {what} must be a JSON object")
    return data


class ShardWriter:
    """Write record batches into `part-00000.parquet`, `part-00001.parquet`, … of at most `shard_rows` rows.

    Each shard's rows, tokens and sha256 are collected for the manifest.
    """

    def __init__(self, out_dir: Path, schema: pa.Schema, shard_rows: int, token_columns: tuple[str, ...]):
        self.out_dir = out_dir
        self.schema = schema
        self.shard_rows = shard_rows
        self.token_columns = token_columns
        self.shards: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0
        self._tokens = 0

    def _open(self) -> None:
        name = f"part-{len(self.shards):05d}.parquet"
        self._writer = pq.ParquetWriter(self.out_dir / name, self.schema, compression="zstd")
        self.shards.append({"file": name})
        self._rows = self._tokens = 0

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        shard = self.shards[-1]
        shard.update(rows=self._rows, tokens=self._tokens, sha256=file_sha256(self.out_dir / shard["file"]))

    def write(self, table: pa.Table) -> None:
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                self._open()
            take = min(self.shard_rows - self._rows, table.num_rows - offset)
            piece = table.slice(offset, take)
            self._writer.write_table(piece)
            self._rows += take
            for column in self.token_columns:
                self._tokens += int(pc.sum(pc.list_value_length(piece[column])).as_py() or 0)
            offset += take
            if self._rows >= self.shard_rows:
                self._close()

    def close(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards


def open_parquet(path: Path) -> pq.ParquetFile:
    """Open a Parquet file, turning unreadable or truncated files into a one-line error naming it."""
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise ElfError(f"{path}: file not found") from None
    except (pa.ArrowException, OSError) as error:
        raise ElfError(f"{path}: not a readable Parquet file ({str(error).splitlines()[0]})") from None


def iter_parquet_batches(path: Path, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Stream `columns` of a Parquet file in batches; missing columns and corrupt pages name the file."""
    parquet = open_parquet(path)
    names = parquet.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ElfError(f"{path}: missing column '{missing[0]}' (found: {', '.join(names) or 'none'})")
    try:
        yield from parquet.iter_batches(batch_size=batch_rows, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise ElfError(f"{path}: not a readable Parquet file ({str(error).splitlines()[0]})") from None


def read_manifest(directory: str | Path, expected_format: str | None = None) -> dict[str, Any]:
    """The manifest of a shard directory, checked to list shards that exist (and, given `expected_format`, to
    be of that format: data written by an older layout is an error that says which stage to rerun)."""
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST, "manifest")
    if expected_format is not None and manifest.get("format") != expected_format:
        raise ElfError(f"{directory / MANIFEST}: format {manifest.get('format')!r} is not {expected_format!r} "
                       "(written by another version of the stage: rerun it)")
    for key in ("rows", "shards"):
        if key not in manifest:
            raise ElfError(f"{directory / MANIFEST}: manifest lacks '{key}'")
    for shard in manifest["shards"]:
        if not (directory / shard["file"]).is_file():
            raise ElfError(f"{directory / shard['file']}: shard listed in the manifest is missing")
    return manifest


def verify_shards(directory: str | Path, expected_format: str | None = None) -> dict[str, Any]:
    """Read the manifest and check every shard's sha256 (a full read: use where correctness beats speed)."""
    directory = Path(directory)
    manifest = read_manifest(directory, expected_format)
    for shard in manifest["shards"]:
        if file_sha256(directory / shard["file"]) != shard["sha256"]:
            raise ElfError(f"{directory / shard['file']}: checksum does not match {directory / MANIFEST}")
    return manifest


def iter_column(directory: str | Path, column: str, batch_rows: int = 4096,
                expected_format: str | None = None) -> Iterator[list]:
    """Stream one column of a shard directory, shard by shard in manifest order, as Python values."""
    directory = Path(directory)
    for shard in read_manifest(directory, expected_format)["shards"]:
        for batch in iter_parquet_batches(directory / shard["file"], [column], batch_rows):
            yield from batch.column(column).to_pylist()

"""Few, large Parquet shards with a manifest, written atomically and read back as a stream.

A stage writes its whole output directory with `elf.files.atomic_output_dir`: it appears only when every
shard and the manifest are complete, so a crash or kill never leaves a torn output.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from elf.errors import ElfError
from elf.files import read_json
from elf.hashing import file_sha256

MANIFEST = "manifest.json"


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

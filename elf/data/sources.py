"""Readers that turn raw corpora into rows of named strings, and the Parquet writer behind `prepare`.

Every reader yields plain dicts mapping *our* column names (``text`` for language modelling,
``source``/``target`` for conditional generation) to strings. ``fields`` says where each of our columns
lives in the input: a key, or a dotted path into nested mappings (``translation.de``). Bad input becomes a
one-line `ElfError` naming the file or dataset, the line or row, and the field, so a user can fix it.

Hub defaults (the ``hub:`` sections of ``params.yaml``)
--------------------------------------------------------
``datasets`` >= 4 no longer runs loading scripts, so each default points at a revision that holds plain
Parquet files. Checked against the Hub's own commit history and file trees:

* **OpenWebText** -- ``Skylion007/openwebtext``. Its ``main`` branch still ships ``openwebtext.py`` (the
  script-only layout that ``datasets`` 4 refuses), and its ``refs/convert/parquet`` export dates from
  August 2023, when the viewer capped script conversions at ~5 GB (about an eighth of the 40 GB corpus,
  stored as ``plain_text/partial-train`` -- which ``datasets`` would silently load as a short ``train``).
  The owner's own full conversion is pull request #18 ("convert-parquet-full": ``data/train-*-of-00093``
  Parquet shards, script deleted); we pin its head commit ``cf22a373...``. One ``train`` split of
  8,013,769 documents; the default config is used (``name`` None). There is no validation split: the
  pipeline holds out the *last* N documents (``hub_num_rows`` + ``skip``/``limit``).
* **WMT14 de-en** -- ``wmt/wmt14``, config ``de-en``, ``main``: converted to Parquet by the Hub team
  (``de-en/{train,validation,test}-*.parquet``, loading script deleted). Splits: train (4,508,785 pairs),
  validation (newstest2013, 3,000), test (newstest2014, 3,003). Column ``translation`` is a struct
  ``{de, en}``; we translate German to English.
* **XSum** -- ``EdinburghNLP/xsum``. ``main`` still has ``xsum.py``, so we read the viewer's Parquet export
  at ``refs/convert/parquet``, config ``default`` (~0.5 GB, converted in full): train (204,045),
  validation (11,332), test (11,334); columns ``document``, ``summary``, ``id``.

If a default stops resolving, any revision with Parquet files and the same columns works: pass it as
``revision`` (a branch, tag, ``refs/pr/N`` or a commit hash).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from elf.errors import ElfError
from elf.files import atomic_file

FILE_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "txt"}

_HUB_BATCH = 1_000
_PARQUET_BATCH = 1_000


# ---------------------------------------------------------------------------------------------------------
# Field extraction, shared by every reader
# ---------------------------------------------------------------------------------------------------------


def _split_fields(fields: Mapping[str, str]) -> dict[str, list[str]]:
    """Validate ``fields`` once so a typo is reported before any data is read."""
    if not fields:
        raise ElfError("fields: at least one column is required")
    parsed = {}
    for column, dotted in fields.items():
        parts = dotted.split(".") if isinstance(dotted, str) else []
        if not parts or any(not p for p in parts):
            raise ElfError(f"fields.{column}: {dotted!r} is not a key or dotted path")
        parsed[column] = parts
    return parsed


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _extract(row: Any, fields: Mapping[str, list[str]], where: str) -> dict[str, str]:
    """Map one input row to our columns; ``where`` says which file/line or dataset/row it came from."""
    out = {}
    for column, parts in fields.items():
        value = row
        for depth, key in enumerate(parts):
            if not isinstance(value, Mapping) or key not in value:
                dotted = ".".join(parts)
                level = ".".join(parts[:depth]) or "top level"
                if isinstance(value, Mapping):
                    detail = f"keys at {level}: {', '.join(map(str, value)) or 'none'}"
                else:
                    detail = f"{level} is {_kind(value)}, not a mapping"
                raise ElfError(f"{where}: missing field {dotted!r} ({detail})")
            value = value[key]
        if not isinstance(value, str):
            raise ElfError(f"{where}: field {'.'.join(parts)!r} is {_kind(value)}, expected a string")
        out[column] = value
    return out


def _check_top_level(where: str, fields: Mapping[str, list[str]], names: list[str]) -> list[str]:
    """Fail before reading any row when a top-level column is absent; return the columns to read."""
    for column, parts in fields.items():
        if parts[0] not in names:
            raise ElfError(
                f"{where}: missing field {'.'.join(parts)!r} for column {column!r} "
                f"(columns: {', '.join(names)})"
            )
    return list(dict.fromkeys(parts[0] for parts in fields.values()))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------------------------


def _describe(path: str, name: str | None, revision: str | None) -> str:
    extras = [f"config {name!r}"] if name else []
    if revision:
        extras.append(f"revision {revision!r}")
    return f"dataset {path!r}" + (f" ({', '.join(extras)})" if extras else "")


def _load_hub(path: str, name: str | None, revision: str | None, split: str, streaming: bool) -> Any:
    """`datasets.load_dataset`, with every failure (offline, unknown split, script repo...) as one line."""
    import datasets  # heavy import, only paid by stages that read the Hub

    try:
        return datasets.load_dataset(path, name, revision=revision, split=split, streaming=streaming)
    except Exception as exc:  # the library raises many unrelated types; the user needs one line
        raise ElfError(
            f"cannot load {_describe(path, name, revision)} split {split!r}: {_first_line(exc)}"
        ) from exc


def hub_num_rows(path: str, name: str | None, revision: str | None, split: str) -> int:
    """Exact row count of a Hub split, needed to hold out its last N rows (OWT has only ``train``).

    Downloads and prepares the split once (``datasets`` caches it, so the following `iter_hub_rows`
    call reuses it); the count comes from the data itself, not from possibly stale card metadata.
    """
    return len(_load_hub(path, name, revision, split, streaming=False))


def _check_range(skip: int, limit: int | None) -> None:
    if skip < 0:
        raise ElfError(f"skip: must be >= 0, got {skip}")
    if limit is not None and limit < 0:
        raise ElfError(f"limit: must be >= 0 or unset, got {limit}")


def _batched_rows(ds: Any) -> Iterator[dict[str, Any]]:
    """Rows of a (streaming or not) dataset, decoded a batch at a time: much faster than row access."""
    for batch in ds.iter(batch_size=_HUB_BATCH):
        columns = list(batch)
        for i in range(len(batch[columns[0]]) if columns else 0):
            yield {c: batch[c][i] for c in columns}


def iter_hub_rows(
    path: str,
    name: str | None,
    revision: str | None,
    split: str,
    fields: dict[str, str],
    limit: int | None = None,
    skip: int = 0,
    streaming: bool = False,
) -> Iterator[dict[str, str]]:
    """Yield rows ``skip .. skip+limit`` of a Hub (or local Hub-layout) dataset split as our columns.

    The non-streaming path selects the range by index (``Dataset.select``), so skipping millions of
    rows to reach a held-out tail costs nothing; streaming skips by reading.
    """
    parsed = _split_fields(fields)
    _check_range(skip, limit)
    label = f"{_describe(path, name, revision)} split {split!r}"
    ds = _load_hub(path, name, revision, split, streaming)
    if ds.column_names is not None:  # None only when streaming without declared features: checked per row
        tops = _check_top_level(label, parsed, ds.column_names)
        ds = ds.select_columns(tops)  # don't decode columns we drop anyway (e.g. XSum ``id``)

    if streaming:
        if skip:
            ds = ds.skip(skip)
        if limit is not None:
            ds = ds.take(limit)
    else:
        total = len(ds)
        if skip > total:
            raise ElfError(f"skip: {skip} is beyond the end of {label} ({total} rows)")
        stop = total if limit is None else min(total, skip + limit)
        if stop == skip:
            return  # `select` rejects an empty range that starts at the end
        if (skip, stop) != (0, total):
            ds = ds.select(range(skip, stop))

    index = skip
    try:
        for index, row in enumerate(_batched_rows(ds), start=skip):
            yield _extract(row, parsed, f"{label} row {index}")
    except ElfError:
        raise
    except Exception as exc:  # e.g. a network drop while streaming
        raise ElfError(f"{label}: reading failed near row {index}: {_first_line(exc)}") from exc


# ---------------------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------------------


def _file_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in set(FILE_FORMATS.values()):
            raise ElfError(f"{path}: unknown format {fmt!r} (expected jsonl, parquet or txt)")
        return fmt
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ElfError(
            f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; "
            f"use .jsonl, .json, .parquet or .txt, or set the format explicitly"
        )
    return FILE_FORMATS[suffix]


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without its line break), strictly UTF-8, one line in memory at a time."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # tolerate a UTF-8 byte-order mark, as editors on Windows write one
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ElfError(
                    f"{path}:{lineno}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
                ) from None
            yield lineno, text.rstrip("\r\n")


def _jsonl_rows(path: Path, fields: Mapping[str, list[str]]) -> Iterator[dict[str, str]]:
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            continue  # blank lines (often a trailing one) carry no record
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ElfError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise ElfError(f"{path}:{lineno}: expected a JSON object, got {_kind(obj)}")
        yield _extract(obj, fields, f"{path}:{lineno}")


def _txt_rows(path: Path, fields: Mapping[str, list[str]]) -> Iterator[dict[str, str]]:
    if set(fields) != {"text"}:
        raise ElfError(
            f"{path}: a .txt file holds a single 'text' column, but columns {sorted(fields)} were requested"
        )
    for _, line in _decoded_lines(path):
        if line:
            yield {"text": line}


def _parquet_rows(path: Path, fields: Mapping[str, list[str]]) -> Iterator[dict[str, str]]:
    def unreadable(exc: Exception) -> ElfError:
        return ElfError(f"{path}: not a readable Parquet file ({_first_line(exc)})")

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(exc) from exc
    with pf:
        tops = _check_top_level(str(path), fields, pf.schema_arrow.names)
        batches = pf.iter_batches(batch_size=_PARQUET_BATCH, columns=tops)
        row = 0
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:  # a truncated or corrupt page
                raise unreadable(exc) from exc
            if batch is None:
                return
            for record in batch.to_pylist():
                yield _extract(record, fields, f"{path}: row {row}")
                row += 1


def iter_file_rows(
    path: str | Path, fields: dict[str, str], fmt: str | None = None
) -> Iterator[dict[str, str]]:
    """Yield rows of a local jsonl/parquet/txt file as our columns, streaming (never the whole file).

    ``fmt`` defaults to the extension (.jsonl/.json -> jsonl, .parquet, .txt). Rows are numbered as a
    user would look for them: 1-based line numbers for text formats, 0-based row indices for Parquet.
    """
    path = Path(path)
    parsed = _split_fields(fields)
    kind = _file_format(path, fmt)
    if not path.exists():
        raise ElfError(f"{path}: file not found")
    if not path.is_file():
        raise ElfError(f"{path}: not a regular file")
    readers = {"jsonl": _jsonl_rows, "txt": _txt_rows, "parquet": _parquet_rows}
    yield from readers[kind](path, parsed)


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def write_rows_parquet(
    rows: Iterable[dict[str, str]], out_path: Path, columns: list[str], batch_rows: int = 10_000
) -> int:
    """Stream ``rows`` into a Parquet file of string ``columns``; return how many rows were written.

    Written with `elf.files.atomic_file`, so a crash or a bad row never leaves a half-written file where DVC
    would take it for a finished output. Rows are written as given: empty texts are counted and dropped
    later, by the tokenize stage.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    if not columns or len(set(columns)) != len(columns):
        raise ValueError(f"columns must be non-empty and unique, got {columns}")
    schema = pa.schema([(c, pa.string()) for c in columns])
    buffer: dict[str, list[str]] = {c: [] for c in columns}
    count = 0
    with atomic_file(out_path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for row in rows:
            for c in columns:
                buffer[c].append(row[c])
            count += 1
            if count % batch_rows == 0:
                writer.write_table(pa.Table.from_pydict(buffer, schema=schema))
                buffer = {c: [] for c in columns}
        if buffer[columns[0]]:
            writer.write_table(pa.Table.from_pydict(buffer, schema=schema))
    return count

"""The tokenize stage: raw Parquet text → int32 token shards + a manifest per split (elf-method §2).

Layout written to `data/tokens/<dataset>/<split>/`:
- lm: one column `input_ids`; every row holds at most L tokens and ends in exactly one EOS. No padding is
  stored (the loader right-pads). `tokenize.packing` decides how rows are filled:
  * `paragraphs` (the paper's OWT rows): text is packed across document boundaries. A paragraph is one
    line of a document (blank lines dropped, surrounding whitespace stripped), tokenized on its own, so its
    tokens do not depend on its neighbours or its batch. Rows are filled paragraph by paragraph with the
    tokens concatenated, no separator between paragraphs or documents; a row is closed with one EOS as soon
    as the next paragraph does not fit its body of L − 1 tokens, so rows end ≈ 85–100% full. A paragraph
    longer than L − 1 is cut into full rows and its remainder opens a row that later paragraphs continue.
    The open row is carried across batches: the rows do not depend on batch_size or workers, and only the
    last row of a split is flushed short.
  * `documents`: each document is cut into chunks of at most L − 1 tokens, each followed by one EOS; a row
    never spans two documents (short documents give short rows: about half full at L 1024 on OWT-like
    documents, against ≥ 85% with `paragraphs`; tests/test_tokens.py measures both).
  The manifest records `packing`, `mean_row_fill` (mean over rows of len(row) / L, EOS included),
  `paragraphs` (paragraphs packed; null for `documents`) and `split_documents`: the units longer than
  L − 1 that had to be split, i.e. paragraphs under `paragraphs` packing, documents under `documents`.
- seq2seq: `source_ids` = source tokens truncated to max_input_length, without EOS (the authors' rows have
  no separator between source and target); `target_ids` = target tokens truncated to leave room
  (len(source_ids) + len(target_ids) ≤ max_length), then EOS. The loader lays them out as
  [source ; target] and pads with EOS to max_length.

The stage streams: memory holds one batch of text, one open row and at most one shard writer, whatever
the corpus size. Empty or whitespace-only rows are skipped and counted in the manifest.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from elf.config import SPLITS, DatasetConfig, TokenizeConfig
from elf.data.shards import MANIFEST, ShardWriter, iter_parquet_batches, open_parquet
from elf.data.tokenizer import load_tokenizer, tokenizer_hash
from elf.errors import ElfError
from elf.files import atomic_output_dir, write_json_atomic
from elf.hashing import file_sha256
from elf.runtime import on_terminal
from elf.vocab import EOS_ID, PAD_ID

FORMAT = "elf-tokens/2"
TOKEN_TYPE = pa.list_(pa.int32())


def _strings(batch: pa.RecordBatch, column: str, path: Path, first_row: int) -> list[str | None]:
    """A text column as Python strings; invalid UTF-8 is an error naming the file, row and column."""
    array = batch.column(column)
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        values = []
        for i, raw in enumerate(array.to_pylist()):
            try:
                values.append(None if raw is None else raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise ElfError(f"{path}: row {first_row + i}, column '{column}': invalid UTF-8") from None
        return values
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise ElfError(f"{path}: column '{column}' must hold text (found type {array.type})")
    try:
        return array.to_pylist()
    except UnicodeDecodeError:
        for i in range(len(array)):
            try:
                array.slice(i, 1).to_pylist()
            except UnicodeDecodeError:
                raise ElfError(f"{path}: row {first_row + i}, column '{column}': invalid UTF-8") from None
        raise


def is_blank(text: str | None) -> bool:
    return text is None or not text.strip()


def _list_array(rows: list[list[int]]) -> pa.ListArray:
    """Build a list<int32> column from Python lists via one flat buffer (much faster than pa.array)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int32, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def paragraphs_of(text: str) -> list[str]:
    """A document's paragraphs: its lines, stripped, blank ones dropped (whitespace around a paragraph
    carries nothing once paragraphs are concatenated, and would cost tokens)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def pack_documents(docs: list[list[int]], max_length: int) -> tuple[list[list[int]], int]:
    """lm rows (`documents` packing): each document cut into chunks of ≤ L − 1 tokens, each followed by one EOS.

    Returns the rows and how many documents had to be split.
    """
    body = max_length - 1
    rows: list[list[int]] = []
    split_docs = 0
    for ids in docs:
        if len(ids) > body:
            split_docs += 1
        for start in range(0, max(len(ids), 1), body):
            rows.append(ids[start : start + body] + [EOS_ID])
    return rows, split_docs


class RowPacker:
    """lm rows (`paragraphs` packing) filled paragraph by paragraph across documents and batches.

    Streaming: `add` each batch of tokenized paragraphs in corpus order and write the rows it closes; the
    open row waits for the next batch. `flush` once at the end closes the last row. `split` counts the
    paragraphs longer than a row body (L − 1) that had to be cut.
    """

    def __init__(self, max_length: int):
        self.body = max_length - 1
        self.row: list[int] = []
        self.split = 0

    def add(self, paragraphs: Iterable[list[int]]) -> list[list[int]]:
        rows: list[list[int]] = []
        for ids in paragraphs:
            if len(self.row) + len(ids) > self.body:  # the next paragraph does not fit: close the row
                if self.row:
                    rows.append(self.row + [EOS_ID])
                    self.row = []
                if len(ids) > self.body:  # full chunks are rows of their own, the remainder opens a row
                    self.split += 1
                    full = len(ids) - len(ids) % self.body
                    rows += [ids[i : i + self.body] + [EOS_ID] for i in range(0, full, self.body)]
                    ids = ids[full:]
            self.row += ids
        return rows

    def flush(self) -> list[list[int]]:
        rows = [self.row + [EOS_ID]] if self.row else []
        self.row = []
        return rows


def truncate_source(source: list[int], max_input_length: int) -> list[int]:
    """seq2seq source ids: at most max_input_length tokens, no EOS (the authors' layout: no separator before
    the target). The tokenize stage and `elf sample --source` both lay out sources with it."""
    if not source:
        raise ElfError("a seq2seq source has no tokens after tokenization (nothing to condition on)")
    return source[:max_input_length]


def truncate_pair(source: list[int], target: list[int], max_length: int, max_input_length: int):
    """seq2seq: the source as `truncate_source` cuts it; the target fills the rest of max_length and ends in
    EOS."""
    source_ids = truncate_source(source, max_input_length)
    target_ids = target[: max_length - len(source_ids) - 1] + [EOS_ID]
    truncated = len(source) > len(source_ids) or len(target) + 1 > len(target_ids)
    return source_ids, target_ids, truncated


class _Encoder:
    """`tokenizer(texts)` in this process, or in a pool of worker processes that keeps batch order."""

    def __init__(self, tokenizer_dir: Path, workers: int):
        self.tokenizer_dir = tokenizer_dir
        self.workers = workers
        self.tokenizer = load_tokenizer(tokenizer_dir) if workers == 0 else None

    def map(self, batches: Iterator[Any]) -> Iterator[tuple[Any, list[list[list[int]]]]]:
        """For each (payload, [texts per column]) yield (payload, [token ids per column])."""
        if self.workers == 0:
            for payload, columns in batches:
                yield payload, [_encode(self.tokenizer, texts) for texts in columns]
            return
        window: collections.deque = collections.deque()
        with concurrent.futures.ProcessPoolExecutor(
            self.workers, initializer=_worker_init, initargs=(str(self.tokenizer_dir),)
        ) as pool:
            for payload, columns in batches:
                window.append((payload, pool.submit(_worker_encode, columns)))
                if len(window) > 2 * self.workers:  # bounded: memory does not grow with the corpus
                    done_payload, future = window.popleft()
                    yield done_payload, future.result()
            while window:
                done_payload, future = window.popleft()
                yield done_payload, future.result()


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:  # a batch whose rows were all blank; the tokenizer cannot take an empty list
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


_WORKER_TOKENIZER = None


def _worker_init(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir)


def _worker_encode(columns: list[list[str]]) -> list[list[list[int]]]:
    return [_encode(_WORKER_TOKENIZER, texts) for texts in columns]


def tokenize_split(
    raw_path: Path, out_dir: Path, dataset: DatasetConfig, settings: TokenizeConfig, encoder: _Encoder,
    tok_hash: str, vocab_size: int, name: str, split: str,
) -> dict[str, Any]:
    """Tokenize one raw split into shards in `out_dir` (a fresh directory) and return its manifest."""
    columns = list(dataset.columns)
    total = open_parquet(raw_path).metadata.num_rows
    stats = collections.Counter()
    by_paragraph = dataset.task == "lm" and settings.packing == "paragraphs"

    def text_batches():
        """((rows read, kept raw row numbers), [texts per column]); `paragraphs` packing: [[paragraphs]]."""
        row = 0
        for batch in iter_parquet_batches(raw_path, columns, settings.batch_size):
            values = [_strings(batch, c, raw_path, row) for c in columns]
            keep = [i for i in range(batch.num_rows) if not any(is_blank(v[i]) for v in values)]
            stats["documents"] += batch.num_rows
            stats["skipped_empty"] += batch.num_rows - len(keep)
            texts = [[v[i] for i in keep] for v in values]
            if by_paragraph:
                texts = [[p for text in texts[0] for p in paragraphs_of(text)]]
                stats["paragraphs"] += len(texts[0])
            yield (batch.num_rows, [row + i for i in keep]), texts
            row += batch.num_rows

    if dataset.task == "lm":
        schema = pa.schema([("input_ids", TOKEN_TYPE)])
    else:
        schema = pa.schema([("source_ids", TOKEN_TYPE), ("target_ids", TOKEN_TYPE)])
    writer = ShardWriter(out_dir, schema, settings.shard_rows, tuple(schema.names))
    packer = RowPacker(dataset.max_length) if by_paragraph else None

    def write_lm(rows: list[list[int]]) -> None:
        if rows:
            writer.write(pa.Table.from_arrays([_list_array(rows)], schema=schema))

    with tqdm(total=total, desc=f"tokenize {name}/{split}", unit="doc", mininterval=1.0,
              disable=not on_terminal()) as progress:
        for (num_rows, kept_rows), encoded in encoder.map(text_batches()):
            if packer is not None:
                write_lm(packer.add(encoded[0]))
            elif dataset.task == "lm":
                rows, split_docs = pack_documents(encoded[0], dataset.max_length)
                stats["split_documents"] += split_docs
                write_lm(rows)
            else:
                for number, source in zip(kept_rows, encoded[0], strict=True):
                    if not source:
                        raise ElfError(f"{raw_path}: row {number}, column 'source': no tokens after tokenization")
                pairs = [truncate_pair(s, t, dataset.max_length, dataset.max_input_length)
                         for s, t in zip(*encoded, strict=True)]
                stats["truncated"] += sum(p[2] for p in pairs)
                table = pa.Table.from_arrays(
                    [_list_array([p[0] for p in pairs]), _list_array([p[1] for p in pairs])], schema=schema
                )
                writer.write(table)
            progress.update(num_rows)
    if packer is not None:
        write_lm(packer.flush())
        stats["split_documents"] = packer.split
    shards = writer.close()
    rows, tokens = sum(s["rows"] for s in shards), sum(s["tokens"] for s in shards)
    lm = dataset.task == "lm"
    return {
        "format": FORMAT, "dataset": name, "split": split, "task": dataset.task,
        "columns": schema.names, "max_length": dataset.max_length, "max_input_length": dataset.max_input_length,
        "tokenizer_hash": tok_hash, "vocab_size": vocab_size, "pad_id": PAD_ID, "eos_id": EOS_ID,
        "raw_file": raw_path.as_posix(), "raw_sha256": file_sha256(raw_path),
        "rows": rows, "tokens": tokens,
        # lm rows hold their EOS and no padding, so the mean of len(row) / L is tokens / (rows · L).
        "packing": settings.packing if lm else None,
        "mean_row_fill": tokens / (rows * dataset.max_length) if lm and rows else None,
        "paragraphs": stats["paragraphs"] if by_paragraph else None,
        **{k: stats[k] for k in ("documents", "skipped_empty", "split_documents", "truncated")},
        "shards": shards,
    }


def tokenize_dataset(
    name: str, dataset: DatasetConfig, settings: TokenizeConfig, raw_dir: Path, tokenizer_dir: Path, out_dir: Path,
) -> dict[str, dict[str, Any]]:
    """Tokenize every raw split of a dataset; the output directory appears only when all splits are done."""
    raw_files = {s: raw_dir / f"{s}.parquet" for s in SPLITS if (raw_dir / f"{s}.parquet").exists()}
    if "train" not in raw_files:
        raise ElfError(f"{raw_dir / 'train.parquet'}: file not found (run `elf prepare {name}` first)")
    encoder = _Encoder(tokenizer_dir, settings.workers)
    tok_hash = tokenizer_hash(tokenizer_dir)
    vocab_size = len(encoder.tokenizer if encoder.tokenizer is not None else load_tokenizer(tokenizer_dir))
    manifests = {}
    with atomic_output_dir(out_dir) as tmp:
        for split, raw_path in raw_files.items():
            split_dir = tmp / split
            split_dir.mkdir()
            manifest = tokenize_split(raw_path, split_dir, dataset, settings, encoder, tok_hash, vocab_size,
                                      name, split)
            if not manifest["rows"]:
                raise ElfError(f"{raw_path}: no row with text in every column ({', '.join(dataset.columns)}); "
                               f"{manifest['documents']} row(s) read")
            write_json_atomic(split_dir / MANIFEST, manifest)
            manifests[split] = manifest
    return manifests

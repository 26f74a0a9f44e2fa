"""The embed stage (`embed@<ds>`): token shards + frozen encoder → cached float16 per-token embeddings.

Layout of `data/embeddings/<ds>/<split>/` (one directory per split of `data/tokens/<ds>/`):
- `part-XXXXX.parquet`, aligned 1:1 with the token shards: same file names, same rows in the same order and
  the same row-group sizes, because the training loader reads a token row group and its embedding row group
  together as one unit of random access.
- Columns: `token_crc32` (uint32, `layout.row_checksum` of the row's token ids, so the loader can prove each
  embedding belongs to its token row) and per-token vectors stored as `binary`: each value holds a row-major
  [n, d] array of little-endian float16 (n·d·2 bytes; read back with `row_vectors`).
  lm: `x`, the n valid tokens only (x is 0 at pads, see `layout`).
  seq2seq: `source` [len(source), d] (source attends only to source, so it is the same with or without the
  condition), `target_with_source` and `target_without_source` [L − len(source), d], the EOS-padded target
  region encoded with and without access to the source (elf-method §2: the condition-dropout variant).
- `part-XXXXX.json`: a sidecar written after its shard, recording the shard's sha256, the token shard's sha256
  and the encoder's content hash. It is the commit marker that makes the stage resumable: the directory
  persists across runs (DVC `persist: true`), and a rerun keeps every shard whose sidecar matches its inputs
  and whose bytes still hash right, redoes the rest, and removes anything else (stale shards, temp files).
- `manifest.json`, written last: format, task, dim, dtype, hashes of the encoder, tokenizer and tokens
  manifest, and every shard. Without caching (`cache=False`) it is the only file, with `"cached": false`:
  training then encodes online with the same encoder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from elf.config import SPLITS
from elf.data.layout import row_checksum, stack_lm, stack_seq2seq
from elf.data.shards import MANIFEST, open_parquet, verify_shards
from elf.data.tokens import FORMAT as TOKENS_FORMAT
from elf.encoders import ENCODER_JSON, FrozenEncoder, load_encoder
from elf.errors import ElfError
from elf.files import atomic_file, read_json, write_json_atomic
from elf.hashing import file_sha256
from elf.runtime import on_terminal

FORMAT = "elf-embeddings/1"
DTYPE = "float16"
VECTOR_DTYPE = np.dtype("<f2")
COMPRESSION = "none"  # float16 vectors barely compress (zstd: −8 %) but zstd reads ≈ 6× slower, every epoch
TOKEN_COLUMNS = {"lm": ("input_ids",), "seq2seq": ("source_ids", "target_ids")}
VECTOR_COLUMNS = {"lm": ("x",), "seq2seq": ("source", "target_with_source", "target_without_source")}
_MAX_CHUNK_BYTES = 1 << 30  # binary offsets are int32: keep each Arrow chunk well below 2 GiB


# ---------------------------------------------------------------------------------------------------------
# The on-disk format: Arrow columns ↔ numpy rows (shared with the loader)
# ---------------------------------------------------------------------------------------------------------


def schema(task: str) -> pa.Schema:
    return pa.schema([("token_crc32", pa.uint32())] + [(c, pa.binary()) for c in VECTOR_COLUMNS[task]])


def token_rows(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """A list<int32> column as one int32 numpy view per row (no per-row Python conversion)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy()
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(column))]


def read_token_rows(tokens_dir: Path, task: str, limit: int) -> list[tuple[np.ndarray, ...]]:
    """The first `limit` token rows of a split, in file order (lm: (ids,); seq2seq: (source, target)); for the
    held-out figures that must use the same rows every time (validation loss, reference text, the judge)."""
    from elf.data.shards import iter_parquet_batches, read_manifest

    manifest = read_manifest(tokens_dir, TOKENS_FORMAT)
    columns = list(TOKEN_COLUMNS[task])
    rows: list[tuple[np.ndarray, ...]] = []
    for shard in manifest["shards"]:
        for batch in iter_parquet_batches(tokens_dir / shard["file"], columns, 4096):
            rows += zip(*(token_rows(batch.column(c)) for c in columns), strict=True)
            if len(rows) >= limit:
                return rows[:limit]
    return rows


def row_vectors(column: pa.Array | pa.ChunkedArray, dim: int) -> list[np.ndarray]:
    """A binary vector column as one read-only [n, d] float16 view per row, zero-copy from the Arrow buffers."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    rows: list[np.ndarray] = []
    for chunk in chunks:
        if chunk.null_count:
            raise ValueError("vector column holds nulls")
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = chunk.buffers()[2]
        flat = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        for start, end in zip(offsets[:-1], offsets[1:], strict=True):
            if (end - start) % (2 * dim):
                raise ValueError(f"a vector holds {end - start} bytes, not a multiple of {dim} float16 values")
            rows.append(flat[start:end].view(VECTOR_DTYPE).reshape(-1, dim))
    return rows


def vector_column(rows: list[np.ndarray]) -> pa.ChunkedArray:
    """[n_i, d] float16 arrays → a binary column (one value per row), in chunks below 2 GiB."""
    chunks = []
    start = 0
    while start < len(rows) or not chunks:
        end, size = start, 0
        while end < len(rows) and (end == start or size + rows[end].nbytes <= _MAX_CHUNK_BYTES):
            size += rows[end].nbytes
            end += 1
        piece = [np.ascontiguousarray(r, dtype=VECTOR_DTYPE).reshape(-1) for r in rows[start:end]]
        offsets = np.zeros(len(piece) + 1, dtype=np.int32)
        np.cumsum([p.nbytes for p in piece], out=offsets[1:])
        data = np.concatenate(piece) if piece else np.zeros(0, VECTOR_DTYPE)
        chunks.append(pa.Array.from_buffers(pa.binary(), len(piece), [None, pa.py_buffer(offsets), pa.py_buffer(data)]))
        start = end
    return pa.chunked_array(chunks, pa.binary())


# ---------------------------------------------------------------------------------------------------------
# Encoding rows (the work of the stage)
# ---------------------------------------------------------------------------------------------------------


def embed_lm_rows(encoder: FrozenEncoder, rows: list[np.ndarray], length: int, batch_size: int,
                  on_batch=None) -> list[np.ndarray]:
    """x of each lm row's valid tokens, [n_i, d] float16, in input order.

    Rows are encoded in batches of similar length (sorted within the call) and each batch is padded only to
    its longest row: the encoder masks pads as keys and T5's position bias is relative, so the valid outputs
    do not depend on how much padding follows, and short rows cost no full-length forward.
    """
    out: list[np.ndarray | None] = [None] * len(rows)
    order = np.argsort([len(r) for r in rows], kind="stable")
    for start in range(0, len(rows), batch_size):
        picked = order[start:start + batch_size]
        ids, valid = stack_lm([rows[i] for i in picked], length)
        width = int(valid.sum(1).max())
        x = encoder.encode_lm(ids[:, :width], valid[:, :width]).to("cpu", torch.float16).numpy()
        for j, i in enumerate(picked):
            out[i] = x[j, :len(rows[i])]
        if on_batch is not None:
            on_batch(int(valid.sum()))
    return out


def embed_seq2seq_rows(encoder: FrozenEncoder, sources: list[np.ndarray], targets: list[np.ndarray], length: int,
                       batch_size: int, on_batch=None) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(source, target_with_source, target_without_source) of each [source ; target] row, float16.

    Two encoder passes per row: with the condition (source embeddings come from this pass) and with it
    dropped (target queries may not attend to the source), as the §2 masks define them.
    """
    source_out, with_out, without_out = [], [], []
    for start in range(0, len(sources), batch_size):
        ids, source_mask, valid = stack_seq2seq(sources[start:start + batch_size], targets[start:start + batch_size],
                                                length)
        keep = torch.zeros(len(ids), dtype=torch.bool)
        with_source = encoder.encode_conditional(ids, source_mask, valid, keep).to("cpu", torch.float16).numpy()
        without = encoder.encode_conditional(ids, source_mask, valid, ~keep).to("cpu", torch.float16).numpy()
        for j, source in enumerate(sources[start:start + batch_size]):
            n = len(source)
            source_out.append(with_source[j, :n])
            with_out.append(with_source[j, n:])
            without_out.append(without[j, n:])
        if on_batch is not None:
            on_batch(sum(len(s) + len(t) for s, t in zip(sources[start:start + batch_size],
                                                          targets[start:start + batch_size], strict=True)))
    return source_out, with_out, without_out


def _embed_row_group(encoder: FrozenEncoder, task: str, group: pa.Table, length: int, batch_size: int,
                     on_batch, where: Path) -> pa.Table:
    columns = [token_rows(group.column(c)) for c in TOKEN_COLUMNS[task]]
    crc = pa.array(np.array([row_checksum(*row) for row in zip(*columns, strict=True)], dtype=np.uint32))
    try:
        if task == "lm":
            vectors = [embed_lm_rows(encoder, columns[0], length, batch_size, on_batch)]
        else:
            vectors = list(embed_seq2seq_rows(encoder, columns[0], columns[1], length, batch_size, on_batch))
    except ValueError as error:  # a row that breaks the §2 layout: the token shard does not fit its manifest
        raise ElfError(f"{where}: {error}") from None
    return pa.Table.from_arrays([crc, *map(vector_column, vectors)], schema=schema(task))


def embed_shard(encoder: FrozenEncoder, task: str, token_path: Path, out_path: Path, length: int, batch_size: int,
                on_batch=None) -> list[int]:
    """Embed one token shard into `out_path` (via a temp name, then rename), one row group per token row group.

    Returns the row-group sizes. Memory holds one row group's embeddings at a time.
    """
    source = open_parquet(token_path)
    sizes = []
    with atomic_file(out_path) as tmp:
        with pq.ParquetWriter(tmp, schema(task), compression=COMPRESSION, use_dictionary=["token_crc32"],
                              write_statistics=["token_crc32"]) as writer:
            for index in range(source.num_row_groups):
                group = source.read_row_group(index, columns=list(TOKEN_COLUMNS[task]))
                table = _embed_row_group(encoder, task, group, length, batch_size, on_batch, token_path)
                writer.write_table(table, row_group_size=max(table.num_rows, 1))
                sizes.append(table.num_rows)
        written = [pq.ParquetFile(tmp).metadata.row_group(i).num_rows for i in range(len(sizes))]
        if written != sizes or pq.ParquetFile(tmp).num_row_groups != len(sizes):
            raise RuntimeError(f"{out_path}: row groups {written} do not match the token shard's {sizes}")
    return sizes


# ---------------------------------------------------------------------------------------------------------
# The stage: validation first, then resumable per-shard work, manifest last
# ---------------------------------------------------------------------------------------------------------


def _sidecar_path(shard_path: Path) -> Path:
    return shard_path.with_suffix(".json")


def _token_splits(tokens_dir: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every split of the tokens directory, manifests checked and every token shard's sha256 verified."""
    splits = {}
    for split in SPLITS:
        if (tokens_dir / split).is_dir():
            splits[split] = (tokens_dir / split, verify_shards(tokens_dir / split, TOKENS_FORMAT))
    if "train" not in splits:
        raise ElfError(f"{tokens_dir / 'train' / MANIFEST}: tokens manifest not found (run the tokenize stage first)")
    for directory, manifest in splits.values():
        where = directory / MANIFEST
        for key in ("task", "max_length", "tokenizer_hash", "vocab_size"):
            if key not in manifest:
                raise ElfError(f"{where}: manifest lacks '{key}'")
        if manifest["task"] not in TOKEN_COLUMNS:
            raise ElfError(f"{where}: unknown task '{manifest['task']}'")
        first = splits["train"][1]
        for key in ("task", "max_length", "tokenizer_hash"):
            if manifest[key] != first[key]:
                raise ElfError(f"{where}: '{key}' differs from the train split's ({manifest[key]} vs {first[key]})")
    return splits


def _check_encoder_matches(encoder_dir: Path, manifest: dict[str, Any], manifest_path: Path) -> dict[str, Any]:
    """Compare encoder.json with a tokens manifest before loading any weights; errors name both files."""
    where = encoder_dir / ENCODER_JSON
    if not encoder_dir.is_dir():
        raise ElfError(f"{encoder_dir}: encoder directory not found (run the encoder stage first)")
    record = read_json(where, ENCODER_JSON)
    if record.get("tokenizer_hash") != manifest["tokenizer_hash"]:
        raise ElfError(f"{where}: encoder was built for tokenizer {str(record.get('tokenizer_hash'))[:12]}…, but "
                       f"{manifest_path} was tokenized with {manifest['tokenizer_hash'][:12]}… "
                       f"(re-run the encoder stage)")
    if not isinstance(record.get("vocab_size"), int) or record["vocab_size"] < manifest["vocab_size"]:
        raise ElfError(f"{where}: encoder accepts {record.get('vocab_size')} token ids but {manifest_path} has "
                       f"vocab_size {manifest['vocab_size']}")
    return record


def _kept_shard(out_path: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The sidecar of a finished shard whose inputs match `expected` and whose bytes still hash right."""
    sidecar = _sidecar_path(out_path)
    if not (out_path.is_file() and sidecar.is_file()):
        return None
    try:
        record = read_json(sidecar, "sidecar")
    except ElfError:
        return None
    if any(record.get(k) != v for k, v in expected.items()) or file_sha256(out_path) != record.get("sha256"):
        return None
    return record


def _clean_split_dir(directory: Path, keep: set[str]) -> None:
    """Remove everything in a split directory that is not listed in `keep` (stale shards, temp files)."""
    for path in directory.iterdir():
        if path.name in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _embed_split(encoder: FrozenEncoder, encoder_hash: str, split: str, token_dir: Path, manifest: dict[str, Any],
                 out_dir: Path, cache: bool, batch_size: int, progress: bool) -> dict[str, Any]:
    task, length = manifest["task"], manifest["max_length"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # the old manifest may describe shards about to change
    names = [s["file"] for s in manifest["shards"]]
    keep = {n for name in names for n in (name, _sidecar_path(Path(name)).name)} if cache else set()
    _clean_split_dir(out_dir, keep)
    record = {
        "format": FORMAT, "cached": cache, "dataset": manifest.get("dataset"), "split": split, "task": task,
        "dim": encoder.dim, "dtype": DTYPE, "encoder_content_hash": encoder_hash,
        "tokenizer_hash": manifest["tokenizer_hash"], "tokens_manifest_sha256": file_sha256(token_dir / MANIFEST),
        "max_length": length, "max_input_length": manifest.get("max_input_length"),
        "rows": manifest["rows"], "tokens": manifest.get("tokens"),
    }
    if not cache:
        record["note"] = "no embedding cache: training encodes the token shards online with this encoder"
        write_json_atomic(out_dir / MANIFEST, record)
        return record
    shards = []
    total = sum(s.get("tokens", 0) for s in manifest["shards"])
    with tqdm(total=total, desc=f"embed {manifest.get('dataset', '')}/{split}", unit="tok", unit_scale=True,
              mininterval=1.0, disable=not (progress and on_terminal())) as bar:
        for token_shard in manifest["shards"]:
            out_path = out_dir / token_shard["file"]
            expected = {"format": FORMAT, "file": token_shard["file"], "token_shard_sha256": token_shard["sha256"],
                        "encoder_content_hash": encoder_hash, "task": task, "dim": encoder.dim, "max_length": length}
            sidecar = _kept_shard(out_path, expected)
            if sidecar is None:
                _sidecar_path(out_path).unlink(missing_ok=True)  # a stale marker must not outlive its shard
                sizes = embed_shard(encoder, task, token_dir / token_shard["file"], out_path, length, batch_size,
                                    on_batch=bar.update)
                sidecar = {**expected, "sha256": file_sha256(out_path), "bytes": out_path.stat().st_size,
                           "rows": token_shard["rows"], "tokens": token_shard.get("tokens"), "row_groups": sizes}
                write_json_atomic(_sidecar_path(out_path), sidecar)
            else:
                bar.update(token_shard.get("tokens", 0))
            shards.append({k: sidecar[k] for k in ("file", "rows", "tokens", "sha256", "token_shard_sha256",
                                                     "bytes", "row_groups")})
    record.update(bytes=sum(s["bytes"] for s in shards), columns=schema(task).names,
                  layout="binary values hold row-major [n, dim] little-endian float16", shards=shards)
    write_json_atomic(out_dir / MANIFEST, record)
    return record


def embed_dataset(
    tokens_dir: Path, encoder_dir: Path, out_dir: Path, cache: bool, batch_size: int, device: str = "cpu",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Embed every split of `tokens_dir` (`data/tokens/<ds>`) into `out_dir` (`data/embeddings/<ds>`).

    All inputs are checked before anything is written: the tokens manifests and every token shard's
    sha256, the encoder against the tokenizer and vocabulary the tokens were made with, and the encoder's
    own files. Returns the manifest of each split.
    """
    tokens_dir, encoder_dir, out_dir = Path(tokens_dir), Path(encoder_dir), Path(out_dir)
    if batch_size <= 0:
        raise ElfError(f"embed.batch_size: must be > 0 (got {batch_size})")
    for name, other in (("tokens", tokens_dir), ("encoder", encoder_dir)):  # the stage deletes what it does not own
        a, b = out_dir.resolve(), other.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise ElfError(f"{out_dir}: the embeddings directory must be apart from the {name} directory {other}")
    splits = _token_splits(tokens_dir)
    for directory, manifest in splits.values():
        _check_encoder_matches(encoder_dir, manifest, directory / MANIFEST)
    train = splits["train"][1]
    record = read_json(encoder_dir / ENCODER_JSON, ENCODER_JSON)
    encoder = load_encoder(encoder_dir, expected_tokenizer_hash=train["tokenizer_hash"],
                           expected_vocab_size=train["vocab_size"]).to(device)
    encoder_hash = record["content_hash"]
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in SPLITS:
        if stale not in splits and (out_dir / stale).is_dir():
            shutil.rmtree(out_dir / stale)
    return {
        split: _embed_split(encoder, encoder_hash, split, directory, manifest, out_dir / split, cache, batch_size,
                            progress)
        for split, (directory, manifest) in splits.items()
    }

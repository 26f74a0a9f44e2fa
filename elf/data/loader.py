"""The training loader: token shards (+ cached embeddings, or the frozen encoder online) → batches of clean x.

A batch is a dict of tensors on `device` (B rows of length L):
  input_ids [B, L] long · valid_mask, source_mask, loss_mask [B, L] bool · cond_dropped [B] bool · x [B, L, d] float32.
x is the clean embedding of elf-method §2: lm: the encoder output on valid tokens, 0 at pads (see `layout`);
seq2seq: the source embeddings at source positions and, at target positions, the target embeddings
computed with the source, or without it for rows whose condition is dropped (`cond_dropped`, drawn with
probability `condition_dropout`). Zeroing a dropped source in z and x is the objective's job: x keeps it.

The two paths give the same tensors to float16 precision. The cache stores float16; the online path
keeps the encoder's float32 output as it is rather than rounding it through float16: rounding would not
make the paths bit-identical anyway (the embed stage and the loader batch rows differently, so float32
results differ in their last bits and can round to neighbouring float16 values), and it would throw away
precision in the path that scales to the paper's corpus. Tests compare the paths at float16 tolerance.

Order (deterministic, resumable, DDP-aware). The unit of random access is a (shard, row group) pair: the
embed stage writes its row groups aligned with the token shards' ones, so one unit is one read from each.
Per epoch e the units are permuted with RNG([seed, e]); rank r takes units[r::world_size], cut to the same
number of units per rank; every rank also stops the epoch after the same number of rows (the smallest
rank's), so DDP ranks stay in step epoch after epoch; with uneven row groups that drops a few rows of
each epoch, different ones every epoch (the tail of the last shuffled window). A rank reads its units in
windows of `shuffle_window` units, whose rows are concatenated and permuted with an RNG seeded by (seed,
epoch, rank, window); the condition-dropout draws of a window come from another RNG seeded the same way.
Memory is bounded by one window, or two with read-ahead (`prefetch`). Batches may span windows and epochs;
the iterator never ends.

The trainer uses the other distributed mode, `rows=(start, stop)`: every process follows the *global*
stream (rank 0 of 1, batch_size = the global batch) and keeps only its slice of each batch, cut before any
encoding. Every process reads all token rows (cheap) but encodes or assembles only its own; in exchange the
global batches are the same whatever the number of processes, so N processes compute exactly the update
of one (elf/train.py), and a checkpoint can be resumed with another number of processes.

State: the position of the next row, (epoch, window, offset within the window). Because both the shuffle
and the condition-dropout draws are functions of (seed, epoch, rank, window), the position is the whole
state: `load_state_dict` re-reads only the current window, re-derives its order and draws, and skips
`offset` rows, giving exactly the batches the original loader would have yielded next.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from elf.data.embed import FORMAT as EMBEDDINGS_FORMAT
from elf.data.embed import TOKEN_COLUMNS, VECTOR_COLUMNS, row_vectors, token_rows
from elf.data.layout import loss_mask, row_checksum, stack_lm, stack_seq2seq
from elf.data.shards import MANIFEST, open_parquet, read_manifest
from elf.data.tokens import FORMAT as TOKENS_FORMAT
from elf.encoders import ENCODER_JSON, FrozenEncoder
from elf.errors import ElfError
from elf.files import read_json
from elf.hashing import file_sha256

STATE_FORMAT = "elf-loader-state/1"
_SHUFFLE, _DROPOUT = 1, 2  # RNG stream tags: the window's row order and its condition-dropout draws


def encoder_content_hash(encoder_dir: str | Path) -> str:
    """The content hash recorded in an encoder directory (what an embeddings manifest was made with)."""
    record = read_json(Path(encoder_dir) / ENCODER_JSON, ENCODER_JSON)
    if not isinstance(record.get("content_hash"), str):
        raise ElfError(f"{Path(encoder_dir) / ENCODER_JSON}: missing key 'content_hash'")
    return record["content_hash"]


def batch_tokens(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Token counts of a batch for throughput logging: valid positions and loss positions."""
    return {"valid": int(batch["valid_mask"].sum()), "loss": int(batch["loss_mask"].sum())}


@dataclass(frozen=True)
class _Unit:
    """One (shard, row group) pair: the unit of random access."""

    shard: int
    row_group: int
    rows: int


@dataclass
class _Window:
    """The rows of one window, in shuffled order, with their condition-dropout draws."""

    epoch: int
    index: int
    tokens: list[tuple[np.ndarray, ...]]  # per row: (input_ids,) or (source_ids, target_ids)
    vectors: list[tuple[np.ndarray, ...]] | None  # per row, cache mode: the row's float16 vector columns
    dropped: np.ndarray  # [rows] bool


class TrainLoader:
    """An infinite, seeded, resumable iterator of training batches for one rank (see the module docstring).

    `tokens_dir` and `embeddings_dir` are split directories (`data/tokens/<ds>/train`,
    `data/embeddings/<ds>/train`). `embeddings_dir=None`, or one whose manifest says `"cached": false`,
    means online encoding with `encoder`. In cache mode `encoder` is optional and, when given, checked
    against the cache (dim; content hash when `encoder_hash` is given or the encoder carries `content_hash`).
    `prefetch` reads the next window in a background thread while the current one is consumed (two windows
    in memory). By default it is on for an accelerator `device`, where the host thread mostly waits on the
    device, and off on CPU, where the trainer and the reader compete for the same cores (measured: no gain).
    """

    def __init__(
        self,
        tokens_dir: str | Path,
        embeddings_dir: str | Path | None = None,
        encoder: FrozenEncoder | None = None,
        *,
        batch_size: int,
        seed: int,
        shuffle_window: int = 8,
        condition_dropout: float = 0.1,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        encoder_hash: str | None = None,
        prefetch: bool | None = None,
        rows: tuple[int, int] | None = None,
    ):
        if batch_size <= 0 or shuffle_window <= 0:
            raise ElfError(f"loader: batch_size and shuffle_window must be > 0 (got {batch_size}, {shuffle_window})")
        if not 0 <= condition_dropout <= 1:
            raise ElfError(f"loader: condition_dropout must be in [0, 1] (got {condition_dropout})")
        if not 0 <= rank < world_size:
            raise ElfError(f"loader: need 0 <= rank < world_size (got rank {rank}, world_size {world_size})")
        if rows is not None and not 0 <= rows[0] < rows[1] <= batch_size:
            raise ElfError(f"loader: rows must satisfy 0 <= start < stop <= batch_size {batch_size} (got {rows})")
        self.rows = rows
        self.tokens_dir = Path(tokens_dir)
        self.batch_size, self.seed, self.shuffle_window = batch_size, seed, shuffle_window
        self.condition_dropout, self.rank, self.world_size = condition_dropout, rank, world_size
        self.device = torch.device(device)
        self.encoder = encoder
        self.manifest = read_manifest(self.tokens_dir, TOKENS_FORMAT)
        self.task, self.length = self.manifest.get("task"), self.manifest.get("max_length")
        if self.task not in TOKEN_COLUMNS or not isinstance(self.length, int):
            raise ElfError(f"{self.tokens_dir / MANIFEST}: needs 'task' (lm or seq2seq) and 'max_length'")
        self.token_paths = [self.tokens_dir / s["file"] for s in self.manifest["shards"]]
        token_groups = [self._row_groups(p, s["rows"]) for p, s in zip(self.token_paths, self.manifest["shards"],
                                                                         strict=True)]
        self.embedding_paths: list[Path] | None = None
        self.cached = False
        if embeddings_dir is not None:
            self._check_embeddings(Path(embeddings_dir), token_groups, encoder, encoder_hash)
        if not self.cached:
            if encoder is None:
                raise ElfError(f"{self.tokens_dir}: online encoding needs an encoder (no embedding cache given)")
            self.dim = encoder.dim
        self.units = [_Unit(s, g, rows) for s, groups in enumerate(token_groups)
                      for g, rows in enumerate(groups) if rows > 0]
        if len(self.units) < world_size:
            raise ElfError(f"{self.tokens_dir / MANIFEST}: {len(self.units)} row groups cannot be shared by "
                           f"{world_size} ranks (tokenize with smaller batches or use fewer ranks)")
        self._plans: dict[int, tuple[list[_Unit], int]] = {}
        self.prefetch = self.device.type != "cpu" if prefetch is None else prefetch
        self._window: _Window | None = None
        self._pending: tuple[tuple[int, int], concurrent.futures.Future] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.epoch = self.window = self.offset = 0

    # -- construction checks ------------------------------------------------------------------------------

    @staticmethod
    def _row_groups(path: Path, rows: int) -> list[int]:
        """Row-group sizes from the footer (cheap); the row count must match the manifest."""
        metadata = open_parquet(path).metadata
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        if sum(sizes) != rows:
            raise ElfError(f"{path}: holds {sum(sizes)} rows but its manifest says {rows}")
        return sizes

    def _check_embeddings(self, directory: Path, token_groups: list[list[int]], encoder: FrozenEncoder | None,
                          encoder_hash: str | None) -> None:
        """The cache must have been made from exactly these token shards with this encoder."""
        where = directory / MANIFEST
        tokens_where = self.tokens_dir / MANIFEST
        manifest = read_json(where, "embeddings manifest")
        if manifest.get("format") != EMBEDDINGS_FORMAT:
            raise ElfError(f"{where}: format {manifest.get('format')!r} is not {EMBEDDINGS_FORMAT!r}")
        if manifest.get("tokens_manifest_sha256") != file_sha256(tokens_where):
            raise ElfError(f"{where}: made from other tokens than {tokens_where} (re-run the embed stage)")
        for key in ("task", "max_length", "rows"):
            if manifest.get(key) != self.manifest.get(key):
                raise ElfError(f"{where}: '{key}' is {manifest.get(key)!r} but {tokens_where} has "
                               f"{self.manifest.get(key)!r}")
        encoder_hash = encoder_hash or getattr(encoder, "content_hash", None)
        if encoder_hash is not None and manifest.get("encoder_content_hash") != encoder_hash:
            raise ElfError(f"{where}: made with encoder {str(manifest.get('encoder_content_hash'))[:12]}…, not the "
                           f"given encoder {encoder_hash[:12]}… (re-run the embed stage)")
        if encoder is not None and manifest.get("dim") != encoder.dim:
            raise ElfError(f"{where}: embeddings have dim {manifest.get('dim')} but the encoder has {encoder.dim}")
        if manifest.get("cached") is not True:
            return
        shards = manifest.get("shards")
        if not isinstance(shards, list) or len(shards) != len(self.manifest["shards"]):
            raise ElfError(f"{where}: lists {len(shards or [])} shards but {tokens_where} lists "
                           f"{len(self.manifest['shards'])}")
        for shard, token_shard, groups in zip(shards, self.manifest["shards"], token_groups, strict=True):
            path = directory / str(shard.get("file"))
            if shard.get("file") != token_shard["file"] or shard.get("token_shard_sha256") != token_shard["sha256"] \
                    or shard.get("rows") != token_shard["rows"]:
                raise ElfError(f"{path}: does not match token shard {self.tokens_dir / token_shard['file']} "
                               f"(re-run the embed stage)")
            if not path.is_file():
                raise ElfError(f"{path}: shard listed in the manifest is missing")
            if self._row_groups(path, shard["rows"]) != groups:
                raise ElfError(f"{path}: row groups do not match {self.tokens_dir / token_shard['file']}")
        if not isinstance(manifest.get("dim"), int) or manifest["dim"] <= 0:
            raise ElfError(f"{where}: 'dim' must be a positive integer (got {manifest.get('dim')!r})")
        self.cached = True
        self.dim = manifest["dim"]
        self.embedding_paths = [directory / s["file"] for s in shards]

    # -- order ----------------------------------------------------------------------------------------------

    def _plan(self, epoch: int) -> tuple[list[_Unit], int]:
        """This rank's units of an epoch and the number of rows every rank takes from it."""
        if epoch not in self._plans:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
            per_rank = len(self.units) // self.world_size
            ranks = [[self.units[i] for i in order[r::self.world_size][:per_rank]] for r in range(self.world_size)]
            budget = min(sum(u.rows for u in units) for units in ranks)
            if len(self._plans) >= 2:  # the current epoch and the next (read-ahead crosses epochs): O(units) memory
                self._plans.pop(min(self._plans))
            self._plans[epoch] = (ranks[self.rank], budget)
        return self._plans[epoch]

    def epoch_rows(self, epoch: int) -> int:
        """Rows this rank (and every other rank) yields in `epoch`."""
        return self._plan(epoch)[1]

    def _window_units(self, epoch: int, window: int) -> tuple[list[_Unit], int]:
        """The units of a window and how many of its rows are taken (0: the epoch is over)."""
        units, budget = self._plan(epoch)
        start = window * self.shuffle_window
        if start >= len(units):
            return [], 0
        before = sum(u.rows for u in units[:start])
        chosen = units[start:start + self.shuffle_window]
        return chosen, max(0, min(sum(u.rows for u in chosen), budget - before))

    def _rng(self, stream: int, epoch: int, window: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, epoch, self.rank, window])

    # -- reading --------------------------------------------------------------------------------------------

    def _read_unit(self, unit: _Unit) -> tuple[list[tuple[np.ndarray, ...]], list[tuple[np.ndarray, ...]] | None]:
        token_path = self.token_paths[unit.shard]
        columns = list(TOKEN_COLUMNS[self.task])
        table = open_parquet(token_path).read_row_group(unit.row_group, columns=columns)
        tokens = list(zip(*(token_rows(table.column(c)) for c in columns), strict=True))
        if not self.cached:
            return tokens, None
        path = self.embedding_paths[unit.shard]
        names = ["token_crc32", *VECTOR_COLUMNS[self.task]]
        table = pq.ParquetFile(path).read_row_group(unit.row_group, columns=names)
        where = f"{path}: row group {unit.row_group}"
        try:
            vectors = list(zip(*(row_vectors(table.column(c), self.dim) for c in names[1:]), strict=True))
        except ValueError as error:
            raise ElfError(f"{where}: {error}") from None
        crcs = table.column("token_crc32").to_numpy()
        for i, (row, vecs) in enumerate(zip(tokens, vectors, strict=True)):
            if row_checksum(*row) != crcs[i]:
                raise ElfError(f"{where}, row {i}: token_crc32 does not match {token_path} (the embeddings were "
                               f"made from other tokens; re-run the embed stage)")
            if self.task == "lm":
                lengths, expected = [len(vecs[0])], [len(row[0])]
            else:
                lengths, expected = [len(v) for v in vecs], [len(row[0]), *[self.length - len(row[0])] * 2]
            if lengths != expected:
                raise ElfError(f"{where}, row {i}: vectors cover {lengths} positions, expected {expected}")
        return tokens, vectors

    def _read_window(self, epoch: int, index: int, units: list[_Unit], take: int) -> _Window:
        """Read and shuffle one window. Reads files and derives RNGs only, so it is safe in the prefetch thread."""
        tokens: list[tuple[np.ndarray, ...]] = []
        vectors: list[tuple[np.ndarray, ...]] = []
        for unit in units:
            unit_tokens, unit_vectors = self._read_unit(unit)
            tokens += unit_tokens
            vectors += unit_vectors or []
        order = self._rng(_SHUFFLE, epoch, index).permutation(len(tokens))[:take]
        dropped = np.zeros(take, dtype=bool)
        if self.task == "seq2seq" and self.condition_dropout > 0:
            dropped = self._rng(_DROPOUT, epoch, index).random(take) < self.condition_dropout
        return _Window(epoch, index, [tokens[i] for i in order],
                       [vectors[i] for i in order] if self.cached else None, dropped)

    def _fetch(self, epoch: int, index: int) -> _Window | None:
        """Window (epoch, index) (None: the epoch is over); with `prefetch`, then start reading the next one.

        The read-ahead runs in a background thread while this window is consumed (Parquet reads release the
        GIL), so that on an accelerator a window boundary does not stall the trainer. Memory: two windows.
        """
        units, take = self._window_units(epoch, index)
        if take == 0:
            return None
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == (epoch, index):
            window = pending[1].result()
        else:
            window = self._read_window(epoch, index, units, take)
        if self.prefetch:
            following = (epoch, index + 1)
            next_units, next_take = self._window_units(*following)
            if next_take == 0:
                following = (epoch + 1, 0)
                next_units, next_take = self._window_units(*following)
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="elf-loader")
            self._pending = (following, self._executor.submit(self._read_window, *following, next_units, next_take))
        return window

    def _current_window(self) -> _Window:
        """The window holding the next row, advancing over exhausted windows and epochs."""
        while True:
            window = self._window
            if window is None or (window.epoch, window.index) != (self.epoch, self.window):
                self._window = None  # free the old window before holding the next
                window = self._window = self._fetch(self.epoch, self.window)
                if window is None:
                    self.epoch, self.window, self.offset = self.epoch + 1, 0, 0
                    continue
            if self.offset < len(window.tokens):
                return window
            self.window, self.offset = self.window + 1, 0

    # -- batches -------------------------------------------------------------------------------------------

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        tokens, vectors, dropped = [], [], []
        while len(tokens) < self.batch_size:
            window = self._current_window()
            end = min(len(window.tokens), self.offset + self.batch_size - len(tokens))
            tokens += window.tokens[self.offset:end]
            vectors += window.vectors[self.offset:end] if window.vectors is not None else []
            dropped.append(window.dropped[self.offset:end])
            self.offset = end
        dropped_rows = np.concatenate(dropped)
        if self.rows is not None:  # this process's slice of the global batch, cut before any encoding
            start, stop = self.rows
            tokens, dropped_rows = tokens[start:stop], dropped_rows[start:stop]
            vectors = vectors[start:stop] if vectors else vectors
        return self._batch(tokens, vectors, torch.from_numpy(dropped_rows))

    def _batch(self, tokens: list[tuple[np.ndarray, ...]], vectors: list[tuple[np.ndarray, ...]],
               dropped: torch.Tensor) -> dict[str, torch.Tensor]:
        length = self.length
        if self.task == "lm":
            input_ids, valid_mask = stack_lm([t[0] for t in tokens], length)
            source_mask = torch.zeros_like(valid_mask)
        else:
            input_ids, source_mask, valid_mask = stack_seq2seq([t[0] for t in tokens], [t[1] for t in tokens], length)
        if self.cached:
            x = self._cached_x(tokens, vectors, dropped, valid_mask)
        else:
            x = self._online_x(input_ids, source_mask, valid_mask, dropped)
        batch = {"input_ids": input_ids, "valid_mask": valid_mask, "source_mask": source_mask,
                 "loss_mask": loss_mask(self.task, source_mask, valid_mask), "cond_dropped": dropped}
        if self.device.type == "cuda":  # page-locked host memory: the copies below run asynchronously
            batch = {k: v.pin_memory() for k, v in batch.items()}
            x = x.pin_memory() if x.device.type == "cpu" else x  # online encoding already ran on the GPU
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        batch["x"] = x.to(self.device, non_blocking=True).float()
        return batch

    def _cached_x(self, tokens: list[tuple[np.ndarray, ...]], vectors: list[tuple[np.ndarray, ...]],
                  dropped: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
        """[B, L, d] float16 assembled from the cache (converted to float32 on the device: half the copy)."""
        x = np.zeros((len(tokens), self.length, self.dim), dtype=np.float16)
        if self.task == "lm":
            x[valid_mask.numpy()] = np.concatenate([v[0] for v in vectors])  # row-major: row by row, token by token
        else:  # every position has an embedding: source, then the chosen target variant (padding included)
            flags = dropped.tolist()
            x[:] = np.concatenate([p for v, d in zip(vectors, flags, strict=True)
                                   for p in (v[0], v[2] if d else v[1])]).reshape(x.shape)
        return torch.from_numpy(x)

    def _online_x(self, input_ids: torch.Tensor, source_mask: torch.Tensor, valid_mask: torch.Tensor,
                  dropped: torch.Tensor) -> torch.Tensor:
        """[B, L, d] float32 from the frozen encoder; lm rows are encoded only up to the longest row."""
        if self.task == "seq2seq":
            return self.encoder.encode_conditional(input_ids, source_mask, valid_mask, dropped)
        width = int(valid_mask.sum(1).max())
        x = self.encoder.encode_lm(input_ids[:, :width], valid_mask[:, :width])
        x = x.masked_fill(~valid_mask[:, :width, None].to(x.device), 0.0)
        return torch.nn.functional.pad(x, (0, 0, 0, self.length - width))

    # -- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The position of the next row (JSON-serialisable), plus the settings it is only valid under."""
        return {"format": STATE_FORMAT, "epoch": self.epoch, "window": self.window, "offset": self.offset,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "shuffle_window": self.shuffle_window, "condition_dropout": self.condition_dropout}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that wrote `state` was; refuses a state made under other settings."""
        if state.get("format") != STATE_FORMAT:
            raise ElfError(f"loader state: format {state.get('format')!r} is not {STATE_FORMAT!r}")
        for key in ("seed", "rank", "world_size", "shuffle_window", "condition_dropout"):
            if state.get(key) != getattr(self, key):
                raise ElfError(f"loader state: saved with {key} {state.get(key)!r}, this loader has "
                               f"{getattr(self, key)!r} (the data order would not continue)")
        for key in ("epoch", "window", "offset"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise ElfError(f"loader state: '{key}' must be an integer >= 0 (got {state.get(key)!r})")
        self.epoch, self.window, self.offset = state["epoch"], state["window"], state["offset"]
        self._window = self._pending = None

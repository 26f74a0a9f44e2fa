"""The row layout of elf-method §2, in one place: token shards → fixed-length rows and their masks.

Both the embed stage and the training loader lay rows out with these functions, so a cached embedding and
an online one are computed on exactly the same ids and masks.

- lm (§2, unconditional): the row's tokens (≤ L, ending in EOS) right-padded with pad (id 0) to L.
  `valid_mask` marks the real tokens; the encoder sees only them and the losses ignore pads.
- seq2seq (§2, conditional): [source ; target], no separator, truncated or padded to L *with EOS*.
  `valid_mask` marks source and target (its own EOS included): the encoder attends only to those keys, so
  a target's embeddings do not depend on how much EOS padding follows (authors' code). The padding still
  gets embeddings and is part of the loss (so the model learns to stop): the loss mask is every non-source
  position. `source_mask` marks the source.

Pads (a decision both data paths share): for lm rows the clean embedding x at pad positions is 0, in the
cached and in the online path alike. The encoder output at a pad query is meaningless (the query attends
to nothing real), the losses ignore pads, and storing zeros instead of that output keeps the cache small
(only valid tokens are stored) and the two paths equal.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from elf.vocab import EOS_ID, PAD_ID

TASKS = ("lm", "seq2seq")

Ids = Sequence[int] | np.ndarray


def row_checksum(*token_arrays: Ids) -> int:
    """crc32 of the arrays' little-endian int32 bytes, chained in order (seq2seq: source, then target).

    Stored next to each cached embedding row so that the loader can prove the embedding belongs to the
    token row it is paired with (a cheap check on every row, unlike a sha256 over whole shards).
    """
    crc = 0
    for ids in token_arrays:
        crc = zlib.crc32(np.asarray(ids, dtype="<i4").tobytes(), crc)
    return crc


def layout_lm(ids: Ids, length: int) -> tuple[np.ndarray, np.ndarray]:
    """One lm row → (input_ids [L] int64, valid_mask [L] bool), right-padded with pad (elf-method §2)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) > length:
        raise ValueError(f"row has {len(ids)} tokens, more than max_length {length}")
    input_ids = np.full(length, PAD_ID, dtype=np.int64)
    input_ids[: len(ids)] = ids
    valid_mask = np.zeros(length, dtype=bool)
    valid_mask[: len(ids)] = True
    return input_ids, valid_mask


def source_length(source_ids: Ids, length: int) -> int:
    """Positions the source occupies in a row of `length`: all of it (a source must leave room for a target)."""
    if len(source_ids) >= length:
        raise ValueError(f"source has {len(source_ids)} tokens, which leaves no target room in max_length {length}")
    return len(source_ids)


def layout_seq2seq(source_ids: Ids, target_ids: Ids, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One seq2seq row → (input_ids [L], source_mask [L], valid_mask [L]) (elf-method §2).

    [source ; target] with no separator; a too-long target is cut, a short one is padded with EOS.
    valid_mask: source and target positions (not the EOS padding).
    """
    start = source_length(source_ids, length)
    target = np.asarray(target_ids, dtype=np.int64)[: length - start]
    input_ids = np.full(length, EOS_ID, dtype=np.int64)
    input_ids[:start] = np.asarray(source_ids, dtype=np.int64)
    input_ids[start : start + len(target)] = target
    source_mask = np.zeros(length, dtype=bool)
    source_mask[:start] = True
    valid_mask = np.zeros(length, dtype=bool)
    valid_mask[: start + len(target)] = True
    return input_ids, source_mask, valid_mask


def stack_lm(rows: Sequence[Ids], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lm rows → (input_ids [B, L] long, valid_mask [B, L] bool): `layout_lm` of every row, stacked.

    Vectorised (one scatter instead of a Python loop): the loader lays out every training batch with it.
    """
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    if len(rows) and lengths.max() > length:
        raise ValueError(f"row has {lengths.max()} tokens, more than max_length {length}")
    valid_mask = np.arange(length) < lengths[:, None]
    input_ids = np.full((len(rows), length), PAD_ID, dtype=np.int64)
    if len(rows):
        input_ids[valid_mask] = np.concatenate(rows)
    return torch.from_numpy(input_ids), torch.from_numpy(valid_mask)


def stack_seq2seq(
    sources: Sequence[Ids], targets: Sequence[Ids], length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """seq2seq rows → (input_ids [B, L] long, source_mask [B, L] bool, valid_mask [B, L] bool), vectorised.

    valid_mask marks source and target; the EOS padding after the target is not valid (never an attention key).
    """
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
    starts = np.array([source_length(s, length) for s in sources], dtype=np.int64)
    ends = np.minimum(starts + np.fromiter(map(len, targets), dtype=np.int64, count=len(targets)), length)
    positions = np.arange(length)
    source_mask = positions < starts[:, None]
    filled = positions < ends[:, None]
    input_ids = np.full((len(sources), length), EOS_ID, dtype=np.int64)
    if len(sources):
        pieces = [p for s, t, start, end in zip(sources, targets, starts, ends, strict=True)
                  for p in (s, t[:end - start])]
        input_ids[filled] = np.concatenate(pieces)
    return torch.from_numpy(input_ids), torch.from_numpy(source_mask), torch.from_numpy(filled)


def loss_mask(task: str, source_mask: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count in the losses (elf-method §2): lm: valid tokens; seq2seq: every non-source position
    (the EOS padding included)."""
    if task == "lm":
        return valid_mask.clone()
    if task == "seq2seq":
        return ~source_mask
    raise ValueError(f"unknown task '{task}' (expected one of {TASKS})")

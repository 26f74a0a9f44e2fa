"""The scratch encoder: a small T5 trained here with span corruption (Raffel et al. 2020), encoder kept.

The paper's ablation of the frozen encoder (elf-method §2): the model is trained on the training tokens of
every dataset, its encoder is normalised per channel to zero mean / unit variance on the same data and
returned as a `FrozenEncoder` of kind ``scratch`` (saved and loaded like the others, `elf/encoders.py`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from elf.encoders import FrozenEncoder, Normalisation
from elf.errors import ElfError
from elf.vocab import EOS_ID, NUM_SENTINELS, PAD_ID

NORMALISATION_ROWS = 2048  # rows of training data used to estimate the per-channel mean / std
_MIN_STD = 1e-6



def _random_segmentation(total: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of `total` items into `segments` non-empty parts."""
    cuts = np.sort(rng.choice(np.arange(1, total), segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def span_corrupt(
    tokens: list[int], noise_density: float, mean_span: float, sentinels: list[int], rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """T5 span corruption of one row body (no EOS): (input, target), both ending in EOS.

    About `noise_density` of the tokens, in spans of mean length `mean_span`, are replaced in the input by
    one sentinel each; the target lists each sentinel followed by the span it hides.
    """
    length = len(tokens)
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = min(max(round(num_noise / mean_span), 1), num_noise, length - num_noise, len(sentinels))
    noise = _random_segmentation(num_noise, num_spans, rng)
    keep = _random_segmentation(length - num_noise, num_spans, rng)
    inputs: list[int] = []
    targets: list[int] = []
    start = 0
    for span, (kept, hidden) in enumerate(zip(keep, noise, strict=True)):
        inputs.extend(tokens[start:start + kept])
        start += kept
        inputs.append(sentinels[span])
        targets.append(sentinels[span])
        targets.extend(tokens[start:start + hidden])
        start += hidden
    return inputs + [EOS_ID], targets + [EOS_ID]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _row_bodies(rows: Iterable[list[int]], vocab_size: int, max_length: int) -> list[list[int]]:
    """Rows truncated to `max_length` (EOS included), without their final EOS; too-short rows dropped."""
    bodies = []
    for index, row in enumerate(rows):
        row = [int(t) for t in row]
        if row and (min(row) < 0 or max(row) >= vocab_size):
            raise ElfError(f"rows[{index}]: token ids must be in [0, {vocab_size}) "
                           f"(got {min(row)}..{max(row)})")
        body = row[:-1] if row and row[-1] == EOS_ID else row
        body = body[:max_length - 1]
        if len(body) >= 2:
            bodies.append(body)
    return bodies


def _per_channel_normalisation(
    backbone: nn.Module, bodies: list[list[int]], rng: np.random.Generator, batch_size: int = 64
) -> Normalisation:
    """Mean and std of each channel over the valid tokens of up to NORMALISATION_ROWS random training rows.

    Rows are drawn at random because the corpus is usually several datasets one after the other.
    """
    picked = np.sort(rng.choice(len(bodies), min(len(bodies), NORMALISATION_ROWS), replace=False))
    sample = [bodies[i] + [EOS_ID] for i in picked]
    total = torch.zeros(backbone.config.d_model, dtype=torch.float64)
    squares = torch.zeros_like(total)
    count = 0
    with torch.no_grad():
        for start in range(0, len(sample), batch_size):
            rows = sample[start:start + batch_size]
            ids = _pad(rows, PAD_ID)
            valid = _pad([[1] * len(r) for r in rows], 0).bool()
            hidden = backbone(input_ids=ids, attention_mask=valid).last_hidden_state[valid].double()
            total += hidden.sum(0)
            squares += (hidden * hidden).sum(0)
            count += hidden.shape[0]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(_MIN_STD)
    return {"kind": "per_channel", "mean": mean.float().tolist(), "std": std.float().tolist()}


def train_scratch_encoder(
    rows: Iterable[list[int]],
    vocab_size: int,
    d_model: int,
    num_layers: int,
    num_heads: int,
    d_ff: int,
    steps: int,
    batch_size: int,
    max_length: int,
    lr: float,
    seed: int,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
    log_fn: Callable[[int, float], None] | None = None,
    log_every: int = 10,
) -> tuple[FrozenEncoder, list[float]]:
    """Train a small T5 with span corruption on token rows and keep its encoder (elf-method §2 ablation).

    `rows` are token id lists ending in EOS (held in memory; pass a sample of a large corpus).
    Sentinels: `NUM_SENTINELS` new ids *above* `vocab_size` (the highest is sentinel 0, as in T5), so the
    embedding has vocab_size + 100 rows, every real id stays valid input and no real token is ever
    mistaken for a sentinel, whether or not the tokenizer carries its own `<extra_id_*>` tokens.
    Optimiser: AdamW, linear warm-up then cosine decay to lr/10, gradient norm clipped at 1; dropout 0.
    The global RNG is left untouched. Returns the encoder, normalised per channel on `rows`, and the
    loss of every step; `log_fn(step, mean loss)` is called every `log_every` steps and at the end.
    """
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

    sizes = {"d_model": d_model, "num_layers": num_layers, "num_heads": num_heads, "d_ff": d_ff,
             "steps": steps, "batch_size": batch_size, "vocab_size": vocab_size}
    for name, value in sizes.items():
        if value <= 0:
            raise ElfError(f"encoder.scratch.{name}: must be > 0 (got {value})")
    if d_model % num_heads:
        raise ElfError(f"encoder.scratch.num_heads: must divide d_model={d_model} (got {num_heads})")
    if log_every <= 0:
        raise ElfError(f"encoder.scratch.log_every: must be > 0 (got {log_every})")
    if max_length < 3:
        raise ElfError(f"encoder.scratch.max_length: must be >= 3 (got {max_length})")
    if not 0 < noise_density < 1 or mean_span < 1:
        raise ElfError(f"encoder.scratch: need 0 < noise_density < 1 and mean_span >= 1 "
                       f"(got {noise_density}, {mean_span})")
    bodies = _row_bodies(rows, vocab_size, max_length)
    if not bodies:
        raise ElfError("encoder.scratch: no training row has at least 2 tokens before its EOS")
    sentinels = [vocab_size + NUM_SENTINELS - 1 - k for k in range(NUM_SENTINELS)]
    config = T5Config(
        vocab_size=vocab_size + NUM_SENTINELS, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
        num_layers=num_layers, num_decoder_layers=num_layers, num_heads=num_heads, dropout_rate=0.0,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID,
    )
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
        model.train()
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        warmup = max(1, min(100, steps // 10))

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, steps - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor)
        order = rng.permutation(len(bodies))
        cursor = 0
        for step in range(steps):
            if cursor + batch_size > len(order):
                order, cursor = rng.permutation(len(bodies)), 0
            picked = order[cursor:cursor + batch_size]
            cursor += batch_size
            pairs = [span_corrupt(bodies[i], noise_density, mean_span, sentinels, rng) for i in picked]
            input_ids = _pad([p[0] for p in pairs], PAD_ID)
            labels = _pad([p[1] for p in pairs], -100)
            loss = model(input_ids=input_ids, attention_mask=input_ids.ne(PAD_ID), labels=labels).loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            scheduler.step()
            losses.append(loss.item())
            if log_fn is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
                window = losses[-(step % log_every + 1):]
                log_fn(step + 1, sum(window) / len(window))
        backbone = T5EncoderModel(copy.deepcopy(config))
        state = {k: v for k, v in model.state_dict().items() if k.startswith(("shared.", "encoder."))}
        backbone.load_state_dict(state, strict=True)
    backbone.eval()
    normalisation = _per_channel_normalisation(backbone, bodies, rng)
    info = {**sizes, "max_length": max_length, "lr": lr, "seed": seed,
            "noise_density": noise_density, "mean_span": mean_span, "rows": len(bodies),
            "first_loss": losses[0], "final_loss": losses[-1]}
    encoder = FrozenEncoder("scratch", backbone=backbone, vocab_size=vocab_size, num_sentinels=NUM_SENTINELS,
                            normalisation=normalisation, info=info)
    return encoder, losses

"""Training-loader throughput: tokens/s of the cached path and of the online path.

    python bench/loader_throughput.py [--docs 4000] [--repeats 3] [--prefetch] [--trainer-tokens-per-s 50000]

Data: demo OWT-like text tokenized at max_length 64 (the earlier demo setting), a scratch-sized T5 encoder
(d_model 128, 2 layers, 4 heads, d_ff 512; random weights) and the embedding cache the embed stage makes
with it. Each path yields --batches (online: --online-batches) batches of --batch-size rows after one
warm-up batch, --repeats times (best run reported: the cores are shared); tokens count the valid positions.
The online path is bound by the encoder forward, so the bench also times the bare forward on the same rows,
and the fraction of the online loader's time spent inside the forward (timed in the same run, so it does
not depend on the load of shared cores; 1 − that is the loader's own overhead).
With --trainer-tokens-per-s (the train step's throughput on the same machine) the bench also prints
loader / trainer: the cached loader should be ≥ 10× faster, so that it never starves the trainer. The
online path costs one encoder forward per batch, on top of the train step, wherever it runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from embed_throughput import demo_tokens, encoder_timer, t5_encoder_dir

from elf.data.embed import embed_dataset
from elf.data.loader import TrainLoader, batch_tokens, encoder_content_hash
from elf.encoders import load_encoder


def tokens_per_s(loader: TrainLoader, batches: int) -> tuple[float, float, list[dict[str, torch.Tensor]]]:
    """(valid tokens/s, row positions/s, the batches) over `batches` batches, after one warm-up batch."""
    next(loader)
    tokens = positions = 0
    seen = []
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
        tokens += batch_tokens(batch)["valid"]
        positions += batch["input_ids"].numel()
        seen.append({k: batch[k] for k in ("input_ids", "valid_mask")})  # not x: a trainer drops each batch
    seconds = time.perf_counter() - start
    return tokens / seconds, positions / seconds, seen


def bare_encoder_tokens_per_s(encoder, batches: list[dict[str, torch.Tensor]]) -> float:
    """The encoder forward alone on the same rows (trimmed to the longest row, as the online path does)."""
    tokens = 0
    start = time.perf_counter()
    for batch in batches:
        width = int(batch["valid_mask"].sum(1).max())
        encoder.encode_lm(batch["input_ids"][:, :width], batch["valid_mask"][:, :width])
        tokens += int(batch["valid_mask"].sum())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=300, help="per run of the cached path")
    parser.add_argument("--online-batches", type=int, default=100, help="per run of the online path")
    parser.add_argument("--repeats", type=int, default=3, help="runs per path; the best is reported")
    parser.add_argument("--shuffle-window", type=int, default=8)
    parser.add_argument("--prefetch", action="store_true", help="read ahead (the default on accelerators only)")
    parser.add_argument("--trainer-tokens-per-s", type=float, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokens_dir, tok_hash, vocab = demo_tokens(work, args.docs, args.max_length)
        encoder_dir = t5_encoder_dir(work, vocab, tok_hash, 128, 2, 4, 512)
        embed_dataset(tokens_dir, encoder_dir, work / "embeddings", cache=True, batch_size=64, progress=False)
        encoder = load_encoder(encoder_dir)
        common = {"batch_size": args.batch_size, "shuffle_window": args.shuffle_window,
                  "encoder_hash": encoder_content_hash(encoder_dir), "prefetch": args.prefetch}
        cached_runs, online_runs, in_encoder = [], [], []
        for seed in range(args.repeats):
            cached = TrainLoader(tokens_dir / "train", work / "embeddings/train", encoder, seed=seed, **common)
            cached_runs.append(tokens_per_s(cached, args.batches))
            online = TrainLoader(tokens_dir / "train", None, encoder, seed=seed, **common)
            with encoder_timer() as spent:
                start = time.perf_counter()
                online_runs.append(tokens_per_s(online, args.online_batches))
                in_encoder.append(spent[0] / (time.perf_counter() - start))
        cached_tokens, cached_positions, batches = max(cached_runs, key=lambda run: run[0])
        online_tokens, online_positions, _ = max(online_runs, key=lambda run: run[0])
        bare_tokens = bare_encoder_tokens_per_s(encoder, batches[:args.online_batches])
        figures = {
            "max_length": args.max_length, "batch_size": args.batch_size, "shuffle_window": args.shuffle_window,
            "prefetch": args.prefetch, "rows_per_epoch": cached.epoch_rows(0), "row_groups": len(cached.units),
            "encoder": "T5 d_model 128, 2 layers (scratch-sized)", "torch_threads": torch.get_num_threads(),
            "cached_tokens_per_s": round(cached_tokens), "cached_positions_per_s": round(cached_positions),
            "cached_tokens_per_s_all_runs": [round(run[0]) for run in cached_runs],
            "online_tokens_per_s": round(online_tokens), "online_positions_per_s": round(online_positions),
            "bare_encoder_tokens_per_s": round(bare_tokens),
            "online_time_in_encoder_forward": [round(f, 3) for f in in_encoder],
        }
        if args.trainer_tokens_per_s:
            figures["cached_vs_trainer"] = round(cached_tokens / args.trainer_tokens_per_s, 2)
            figures["online_vs_trainer"] = round(online_tokens / args.trainer_tokens_per_s, 2)
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""Tokenize-stage throughput against the bare tokenizer call, and peak memory at 1× and 10× the input.

    python bench/tokenize_throughput.py [--docs 20000] [--scale 10]

Throughput ratio = (time of bare `tokenizer(batch)` calls over the same texts) / (time of the whole stage:
Parquet read, tokenizer, packing, shard writes, checksums, manifest). Goal ≥ 0.8.
Memory growth = peak RSS of the stage on scale× the documents / peak RSS on 1×, each in a fresh process.
Goal ≤ 1.25 (the stage streams).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from elf.config import DatasetConfig, TokenizeConfig
from elf.data import demo
from elf.data.tokenizer import build_tokenizer, load_tokenizer
from elf.data.tokens import tokenize_dataset

DATASET = DatasetConfig(task="lm", source="demo", max_length=64,
                        demo={"generator": "lm", "train_size": 1, "validation_size": 1})
SETTINGS = TokenizeConfig(shard_rows=200_000, batch_size=1000)

CHILD = """
import resource, sys, time
from pathlib import Path
sys.path.insert(0, {bench!r})
from tokenize_throughput import DATASET, SETTINGS
from elf.data.tokens import tokenize_dataset
start = time.perf_counter()
tokenize_dataset("owt", DATASET, SETTINGS, Path({raw!r}), Path({tok!r}), Path({out!r}))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - start)
"""


def write_docs(path: Path, n: int, seed: int) -> list[str]:
    texts = list(demo.generate_lm(demo.build_grammar(42, max_sentences=5), seed, n))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), path)
    return texts


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_mb(work: Path, raw: Path, tok: Path) -> tuple[float, float]:
    code = CHILD.format(bench=str(Path(__file__).parent), raw=str(raw), tok=str(tok), out=str(work / "out-mem"))
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    rss, seconds = output.split()
    return float(rss), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = write_docs(work / "raw1/train.parquet", args.docs, seed=1)
        build_tokenizer("train", "", 2000, iter(texts), work / "tokenizer")
        tokenizer = load_tokenizer(work / "tokenizer")
        batches = [texts[i : i + SETTINGS.batch_size] for i in range(0, len(texts), SETTINGS.batch_size)]
        tokens = sum(len(ids) for b in batches for ids in tokenizer(b, add_special_tokens=False)["input_ids"])

        bare = best_of(args.repeats, lambda: [tokenizer(b, add_special_tokens=False) for b in batches])
        stage = best_of(args.repeats, lambda: tokenize_dataset(
            "owt", DATASET, SETTINGS, work / "raw1", work / "tokenizer", work / "out"))

        write_docs(work / f"raw{args.scale}/train.parquet", args.docs * args.scale, seed=2)
        rss_1, _ = peak_rss_mb(work, work / "raw1", work / "tokenizer")
        rss_n, seconds_n = peak_rss_mb(work, work / f"raw{args.scale}", work / "tokenizer")
        figures = {
            "documents": args.docs, "tokens": tokens,
            "bare_tokenizer_tokens_per_s": round(tokens / bare),
            "stage_tokens_per_s": round(tokens / stage),
            "throughput_ratio_stage_vs_bare": round(bare / stage, 3),
            "peak_rss_mb_1x": round(rss_1, 1),
            f"peak_rss_mb_{args.scale}x": round(rss_n, 1),
            "peak_rss_growth": round(rss_n / rss_1, 3),
            f"stage_seconds_{args.scale}x": round(seconds_n, 2),
        }
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

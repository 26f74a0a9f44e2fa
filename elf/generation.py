"""The sample stage: a trained model + the samplers of `params.yaml` → `samples/<dataset>.jsonl`.

One JSON row per sample: dataset, sampler name and settings, evaluation seed, index, generated text and the
number of network evaluations; for seq2seq also the source and the reference. No timings: a rerun writes the
same bytes (the speed goes to the log and the training's MLflow run). Evaluation (`elf/evaluate.py`) reads
only this file, so sampling and scoring stay decoupled.

Conditional rows use the training layout (elf-method §2): [source ; target region] of `max_length`
positions, the clean source kept in place; the text is what the model writes after the source, at most
max_length − max_input_length tokens (§7), cut at the first EOS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from elf.config import DatasetConfig, SampleConfig
from elf.data.shards import iter_column, iter_parquet_batches, read_manifest
from elf.data.tokens import FORMAT as TOKENS_FORMAT
from elf.data.tokens import is_blank
from elf.errors import ElfError
from elf.files import atomic_file
from elf.pretrained import ELFPipeline
from elf.sample import SamplerConfig, conditional_texts, ids_to_texts


def load_trained(model_dir: Path, dataset: str, device: torch.device, tokens_dir: Path | None = None) -> ELFPipeline:
    """The trained model of `dataset` from its self-contained directory; with `tokens_dir`, also checked to share
    the tokenizer those tokens were made with (conditional sources are read from them)."""
    pipeline = ELFPipeline.load(model_dir, device)
    if pipeline.info.get("dataset") != dataset:
        raise ElfError(f"{model_dir}: model was trained on dataset '{pipeline.info.get('dataset')}', not '{dataset}'")
    if tokens_dir is not None:
        manifest = read_manifest(tokens_dir, TOKENS_FORMAT)
        if manifest["tokenizer_hash"] != pipeline.info["tokenizer_hash"]:
            raise ElfError(f"{model_dir}: model was trained with another tokenizer than {tokens_dir} was made with")
    return pipeline


def conditional_inputs(tokens_dir: Path, raw_path: Path, limit: int) -> tuple[list, list, list[str], list[str]]:
    """The first `limit` (source ids, target ids, source text, reference text) of a seq2seq split.

    References are the raw targets (not the truncated token ids); raw rows the tokenize stage skipped as
    blank are skipped here by the same rule, so the two stay aligned.
    """
    sources = list(_take(iter_column(tokens_dir, "source_ids", expected_format=TOKENS_FORMAT), limit))
    targets = list(_take(iter_column(tokens_dir, "target_ids", expected_format=TOKENS_FORMAT), limit))
    texts: list[tuple[str, str]] = []
    for batch in iter_parquet_batches(raw_path, ["source", "target"], 4096):
        for source, target in zip(batch.column("source").to_pylist(), batch.column("target").to_pylist(),
                                  strict=True):
            if not (is_blank(source) or is_blank(target)):
                texts.append((source, target))
        if len(texts) >= len(sources):
            break
    if len(texts) < len(sources):
        raise ElfError(f"{raw_path}: fewer rows than {tokens_dir}; rerun the tokenize stage")
    texts = texts[: len(sources)]
    return sources, targets, [s for s, _ in texts], [t for _, t in texts]


def _take(rows: Iterator, limit: int) -> Iterator:
    for i, row in enumerate(rows):
        if i >= limit:
            return
        yield row


def sample_dataset(name: str, dataset: DatasetConfig, settings: SampleConfig, model_dir: Path, tokens_dir: Path,
                   raw_dir: Path, out_path: Path, device: torch.device | None = None) -> tuple[int, dict[str, float]]:
    """Run every sampler of `settings` for every evaluation seed; write the rows atomically. Returns their count
    and each sampler's speed in samples/s (mean over seeds; for the logs and MLflow, not the samples file)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = load_trained(model_dir, name, device, tokens_dir / "train")
    for key in ("task", "max_length", "max_input_length"):
        if pipeline.info.get(key) != getattr(dataset, key):
            raise ElfError(f"{model_dir}: model was trained with {key} {pipeline.info.get(key)}, params.yaml "
                           f"datasets.{name}.{key} is {getattr(dataset, key)} (retrain, or restore the setting)")
    tokenizer = pipeline.tokenizer
    samplers: dict[str, SamplerConfig] = settings.sampler_configs(name)
    rows: list[dict[str, Any]] = []
    speeds: dict[str, list[float]] = {}  # timings stay out of the DVC-tracked samples (they change every run)
    sources = None
    if dataset.task == "seq2seq":
        split = "test" if (tokens_dir / "test").is_dir() else "validation"
        sources, _, source_texts, references = conditional_inputs(
            tokens_dir / split, raw_dir / f"{split}.parquet", settings.num_samples)
    for sampler_name, cfg in samplers.items():
        cfg = pipeline.resolve_sampler(cfg)  # the samples file records the noise scale actually used
        for seed in settings.seeds:
            out, source_mask = pipeline.sample_ids(cfg, seed, settings.batch_size, num_samples=settings.num_samples,
                                                   sources=sources, progress=True)
            if dataset.task == "lm":
                texts = ids_to_texts(out.ids, tokenizer)
                extra: list[dict[str, str]] = [{} for _ in texts]
            else:
                texts = conditional_texts(out.ids, tokenizer, source_mask, dataset.max_length,
                                          dataset.max_input_length)
                extra = [{"source": s, "reference": r} for s, r in zip(source_texts, references, strict=True)]
            for index, (text, more) in enumerate(zip(texts, extra, strict=True)):
                rows.append({"dataset": name, "sampler": sampler_name, "settings": cfg.to_dict(), "seed": seed,
                             "index": index, "text": text, **more, "nfe": out.nfe})
            speeds.setdefault(sampler_name, []).append(len(texts) / max(out.seconds, 1e-9))
            print(f"sample {name}/{sampler_name} seed {seed}: {len(texts)} samples, {out.nfe} network evaluations "
                  f"each, {speeds[sampler_name][-1]:.1f} samples/s")
    with atomic_file(out_path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows), {sampler: sum(v) / len(v) for sampler, v in speeds.items()}

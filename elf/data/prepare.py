"""The prepare stage: one dataset's raw text → `data/raw/<dataset>/<split>.parquet`.

lm datasets get a `text` column; seq2seq datasets `source` and `target`. The text comes from the
built-in demo generators (offline, deterministic from the seed), the Hugging Face Hub, or local files,
as `params.yaml` says. For the demo lm corpus the grammar is saved as `grammar.json` beside the data:
it is the exact-likelihood oracle the evaluation stage scores generated text with.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from elf.config import DatasetConfig
from elf.data import demo, sources
from elf.data.tokens import is_blank
from elf.errors import ElfError
from elf.files import atomic_output_dir

GRAMMAR_FILE = "grammar.json"
_SPLIT_INDEX = {"train": 0, "validation": 1, "test": 2}


def split_seed(seed: int, name: str, split: str) -> int:
    """A seed per (dataset, split), so splits are disjoint draws and adding a dataset changes nothing else."""
    entropy = [seed, _SPLIT_INDEX[split], *name.encode()]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _demo_splits(name: str, dataset: DatasetConfig, seed: int, out_dir: Path) -> dict[str, Iterator[dict]]:
    spec = dataset.demo
    sizes = {"train": spec.train_size, "validation": spec.validation_size, "test": spec.test_size}
    sizes = {split: n for split, n in sizes.items() if n > 0}
    lexicon = demo.demo_lexicon(spec.words_per_class)
    sentences = {} if spec.max_sentences is None else {"max_sentences": spec.max_sentences}
    if spec.generator == "lm":
        grammar = demo.build_grammar(seed, lexicon=lexicon, **sentences)
        (out_dir / GRAMMAR_FILE).write_text(json.dumps(grammar.to_dict()) + "\n", encoding="utf-8")
        return {
            split: ({"text": t} for t in demo.generate_lm(grammar, split_seed(seed, name, split), n))
            for split, n in sizes.items()
        }
    if spec.generator == "summarization" and spec.max_sentences is not None:
        sentences["min_sentences"] = max(3, spec.max_sentences // 2)
    generate = demo.generate_translation if spec.generator == "translation" else demo.generate_summarization
    return {
        split: ({"source": s, "target": t} for s, t in generate(split_seed(seed, name, split), n, lexicon=lexicon,
                                                                **sentences))
        for split, n in sizes.items()
    }


def _hub_splits(dataset: DatasetConfig) -> dict[str, Iterator[dict]]:
    hub = dataset.hub
    out = {}
    for split, hub_split in hub.splits.items():
        limit = hub.limits.get(split)
        if split == "train" and hub.validation_holdout:
            # Hold out the *last* documents of the train split (OWT has no validation split of its own).
            total = sources.hub_num_rows(hub.path, hub.name, hub.revision, hub_split)
            keep = total - hub.validation_holdout
            out["train"] = sources.iter_hub_rows(hub.path, hub.name, hub.revision, hub_split, hub.fields,
                                                 limit=min(keep, limit or keep))
            val_limit = hub.limits.get("validation", hub.validation_holdout)
            out["validation"] = sources.iter_hub_rows(hub.path, hub.name, hub.revision, hub_split, hub.fields,
                                                      limit=min(val_limit, hub.validation_holdout), skip=keep)
        else:
            out[split] = sources.iter_hub_rows(hub.path, hub.name, hub.revision, hub_split, hub.fields,
                                               limit=limit)
    return out


def _origin(name: str, dataset: DatasetConfig, split: str) -> str:
    """Where a split's rows come from, for error messages: the user's file, the hub dataset, or the demo."""
    if dataset.source == "files":
        return dataset.files.splits[split]
    if dataset.source == "hub":
        return f"{dataset.hub.path} ({split} split)"
    return f"the demo generator of {name}"


def _counting_usable(rows: Iterator[dict], columns: list[str], usable: collections.Counter) -> Iterator[dict]:
    """Pass rows through, counting in `usable["rows"]` those with text in every column."""
    for row in rows:
        usable["rows"] += not any(is_blank(row[c]) for c in columns)
        yield row


def prepare_dataset(name: str, dataset: DatasetConfig, seed: int, out_dir: Path) -> dict[str, int]:
    """Write every split of one dataset atomically; returns rows per split.

    A split without one row that has text in every column is an error here, where the data is made, not
    several stages later (the output is then not written)."""
    counts = {}
    with atomic_output_dir(out_dir) as tmp:
        if dataset.source == "demo":
            splits = _demo_splits(name, dataset, seed, tmp)
        elif dataset.source == "hub":
            splits = _hub_splits(dataset)
        else:
            files = dataset.files
            splits = {split: sources.iter_file_rows(path, files.fields, files.format)
                      for split, path in files.splits.items()}
        columns = list(dataset.columns)
        for split, rows in splits.items():
            usable = collections.Counter()
            counts[split] = sources.write_rows_parquet(_counting_usable(rows, columns, usable),
                                                       tmp / f"{split}.parquet", columns)
            if not usable["rows"]:
                raise ElfError(f"{_origin(name, dataset, split)}: the {split} split of {name} has no row with text "
                               f"in every column ({', '.join(columns)}); {counts[split]} row(s) read")
    return counts

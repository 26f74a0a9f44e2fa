"""The trained judge: a small causal LM trained on a dataset's own training rows, for Gen PPL with no download.

Gen PPL (elf-method §9) needs a judge LM; the paper's is `gpt2-large`, which is out of reach offline, and which
knows nothing of a user's own text (or of the demo's small language). With `evaluate.judge: trained` the
`judge` stage trains a GPT-2-architecture model (transformers `GPT2LMHeadModel`, built from a config, no
weights downloaded) on the dataset's training token rows with the project's tokenizer, and the evaluate stage
loads it like any hub judge. It is a yardstick, not the paper's judge: figures are comparable between models
judged by the same judge only, and its own validation perplexity (`judge.json`) says how good a yardstick it is.

Training follows the §9 counting rule that scores with it: no BOS, the first token of a row unscored, every
non-EOS token and the row's first EOS predicted (rows are padded with EOS, which is also pad).

Outputs `data/judge/<ds>/`: `config.json`, `model.safetensors`, the tokenizer files and `judge.json`
(settings, rows, validation perplexity). Datasets that need no judge (seq2seq, or `evaluate.judge` other than
`trained`) get a `judge.json` saying so, so that DVC has an output to track.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from elf.config import TrainedJudgeSettings
from elf.data.embed import read_token_rows
from elf.data.shards import read_manifest
from elf.data.tokenizer import load_tokenizer, tokenizer_hash
from elf.data.tokens import FORMAT as TOKENS_FORMAT
from elf.errors import ElfError
from elf.files import atomic_output_dir, read_json, write_json_atomic
from elf.hashing import file_sha256
from elf.metrics import judge_nll

TRAINED = "trained"
"""The `evaluate.judge` value that selects this judge."""
JUDGE_JSON = "judge.json"


def judge_record(directory: Path) -> dict[str, Any]:
    """`judge.json` of a trained judge directory; a missing one names the stage to run."""
    if not (directory / JUDGE_JSON).is_file():
        raise ElfError(f"{directory}: no trained judge (run `elf judge {directory.name}`, or `dvc repro`)")
    record = read_json(directory / JUDGE_JSON, "judge record")
    if not record.get("trained"):
        raise ElfError(f"{directory}: no judge was trained ({record.get('reason')}); rerun `elf judge "
                       f"{directory.name}` after setting evaluate.judge: trained")
    return record


def _rows(tokens_dir: Path, limit: int, eos_id: int, length: int) -> torch.Tensor:
    """[N, length + 1] long: the first `limit` lm token rows, each followed by EOS padding (pad = EOS)."""
    rows = read_token_rows(tokens_dir, "lm", limit)
    out = torch.full((len(rows), length + 1), eos_id, dtype=torch.long)
    for i, (ids,) in enumerate(rows):
        out[i, :len(ids)] = torch.from_numpy(ids.astype(np.int64))
    return out


def _nll(model, ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ NLL, #scored tokens) of rows under the §9 counting rule (`elf.metrics.scored_positions`)."""
    nll, mask = judge_nll(model, ids, torch.ones_like(ids), eos_id)  # causal: the EOS padding comes last
    return (nll * mask).sum(), mask.sum()


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, eos_id: int, batch_size: int) -> float:
    """exp(Σ NLL / Σ scored tokens) of `rows` [N, W] (the §9 rule, as `elf.metrics.gen_ppl` scores)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        nll, n = _nll(model, rows[start:start + batch_size], eos_id)
        total, count = total + float(nll), count + int(n)
    return math.exp(total / max(count, 1))


def train_judge(name: str, task: str, max_length: int, tokens_dir: Path, tokenizer_dir: Path, out: Path,
                settings: TrainedJudgeSettings, seed: int, wanted: bool) -> dict[str, Any]:
    """Train the judge of dataset `name` on `tokens_dir/train` (validation perplexity on `tokens_dir/validation`)
    and save it to `out`; `wanted` is whether `evaluate.judge` is `trained`. Returns the judge record."""
    if not wanted or task != "lm":
        reason = "Gen PPL is for lm datasets" if task != "lm" else "evaluate.judge is not 'trained'"
        record = {"trained": False, "reason": reason}
        with atomic_output_dir(out) as tmp:
            write_json_atomic(tmp / JUDGE_JSON, record)
        return record
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_tokenizer(tokenizer_dir)
    if read_manifest(tokens_dir / "train", TOKENS_FORMAT)["tokenizer_hash"] != tokenizer_hash(tokenizer_dir):
        raise ElfError(f"{tokens_dir / 'train'}: tokenized with another tokenizer than {tokenizer_dir} "
                       "(rerun the tokenize stage)")
    eos_id = tokenizer.eos_token_id
    train_rows = _rows(tokens_dir / "train", settings.max_rows, eos_id, max_length)
    if not len(train_rows):
        raise ElfError(f"{tokens_dir / 'train'}: no rows to train the judge on")
    validation = (_rows(tokens_dir / "validation", settings.max_rows, eos_id, max_length)
                  if (tokens_dir / "validation" / "manifest.json").is_file() else None)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=max_length + 1, n_embd=settings.hidden,
                        n_layer=settings.layers, n_head=settings.heads, bos_token_id=eos_id, eos_token_id=eos_id,
                        pad_token_id=eos_id, resid_pdrop=settings.dropout, embd_pdrop=settings.dropout,
                        attn_pdrop=settings.dropout)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    warmup = max(1, settings.steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        return min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(step / settings.steps, 1.0)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order = np.random.default_rng(seed)
    model.train()
    for _ in range(settings.steps):
        batch = train_rows[torch.from_numpy(order.integers(0, len(train_rows), settings.batch_size))]
        nll, count = _nll(model, batch, eos_id)
        loss = nll / count.clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    record = {"trained": True, "dataset": name, "architecture": "GPT2LMHeadModel", "seed": seed,
              "settings": settings.model_dump(), "train_rows": len(train_rows),
              "parameters": sum(p.numel() for p in model.parameters()),
              "train_ppl": perplexity(model, train_rows[:1000], eos_id, settings.batch_size),
              "validation_ppl": (perplexity(model, validation, eos_id, settings.batch_size)
                                 if validation is not None and len(validation) else None),
              "validation_rows": 0 if validation is None else len(validation)}
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Gen PPL compares only under the same judge: the weights' hash names this one (the registry keys by it).
        record["weights_sha256"] = file_sha256(tmp / "model.safetensors")
        write_json_atomic(tmp / JUDGE_JSON, record)
    return record

"""Frozen encoders: token ids → one continuous vector per token (elf-method §2).

Three kinds, one class (`FrozenEncoder`) and one `encode` path that every stage uses:

- ``pretrained``: a T5 encoder by hub name or local path (the paper: `t5-small`), `last_hidden_state`,
  normalised by one scalar, x = h / 0.2.
- ``scratch``: a small T5 trained here with span corruption (`elf/scratch_encoder.py`), encoder kept,
  normalised per channel to zero mean / unit variance on the training data (the paper's choice for it).
- ``gaussian``: a frozen N(0, 1) token table from a seed (an ablation); no normalisation.

An encoder is saved as a self-contained directory (`save_encoder` / `load_encoder`): `encoder.json`
(kind, sizes, normalisation, tokenizer hash, per-file and content hashes) next to the weights, which are
a `save_pretrained` directory for the T5 kinds (so `T5EncoderModel.from_pretrained` reads it directly) or
`table.safetensors` for the Gaussian table. Later stages load only from there, never from the hub.

Attention masks (elf-method §2). `encode` takes either a [B, L] mask of valid tokens (pads are ignored as
keys) or a [B, L, L] mask where entry (i, j) says query i may attend to key j; `conditional_attention_mask`
builds the latter for [source ; target] rows, with or without the condition. T5 in transformers 5 passes
a 4-D mask through untouched (`masking_utils._preprocess_mask_arguments`) to the attention function,
where the *eager* kernel adds it to the scores and the *sdpa* kernel adds it to the position bias; a
boolean 4-D mask would be silently wrong under eager (True is added as +1), so the [B, L, L] mask is
turned into an additive float [B, 1, L, L] mask (0 = attend, dtype minimum = blocked), right for both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from elf.errors import ElfError
from elf.files import atomic_output_dir, read_json
from elf.hashing import directory_hash, file_sha256
from elf.runtime import autocast

KINDS = ("pretrained", "scratch", "gaussian")
FORMAT_VERSION = 1
ENCODER_JSON = "encoder.json"
TABLE_FILE = "table.safetensors"
T5_FILES = ("config.json", "model.safetensors")
PRETRAINED_SCALE = 0.2  # x = h / 0.2 for a pretrained T5 (elf-method §2)

Normalisation = dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# Masks (elf-method §2)
# ---------------------------------------------------------------------------------------------------------


def conditional_attention_mask(
    source_mask: torch.Tensor, valid_mask: torch.Tensor, drop_condition: torch.Tensor
) -> torch.Tensor:
    """[B, L, L] boolean mask (query i may attend to key j) for [source ; target] rows (elf-method §2).

    Source positions attend only to source positions, so source embeddings never depend on the target.
    Every other position — the target and the EOS padding after it — attends to the valid keys (source and
    target), so padding is never an attention key and a target's embeddings do not depend on how much
    padding follows; the padding positions still get embeddings (they are in the loss). For rows whose
    condition is dropped (input-CFG training) the non-source queries may not attend to the source either.
    This is the authors' mask (their `build_self_attn_cond_masks` plus the label-drop block).
    """
    source = source_mask.bool() & valid_mask.bool()
    drop = drop_condition.bool().view(-1, 1)
    source_to_source = source[:, :, None] & source[:, None, :]
    other_keys = valid_mask.bool() & ~(source & drop)  # [B, L]: keys a non-source query may see
    other_to_keys = ~source[:, :, None] & other_keys[:, None, :]
    return source_to_source | other_to_keys


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L, L] bool → [B, 1, L, L] additive float mask, read right by T5's eager and sdpa kernels."""
    eye = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    allowed = allowed | (eye & ~allowed.any(dim=-1, keepdim=True))  # never a fully masked query row
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


# ---------------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------------


class FrozenEncoder(nn.Module):
    """A frozen encoder with its normalisation; `encode` is the one path from ids to clean embeddings x.

    `vocab_size` counts the token ids the encoder accepts as input (the tokenizer's ids must be below it);
    a scratch encoder's span-corruption sentinels live above it and are never valid input.
    """

    def __init__(
        self,
        kind: str,
        *,
        vocab_size: int,
        normalisation: Normalisation,
        backbone: nn.Module | None = None,
        table: torch.Tensor | None = None,
        num_sentinels: int = 0,
        info: dict[str, Any] | None = None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown encoder kind '{kind}' (expected one of {KINDS})")
        if (kind == "gaussian") != (table is not None) or (kind == "gaussian") == (backbone is not None):
            raise ValueError("a gaussian encoder needs `table`; a T5 encoder needs `backbone`")
        self.kind = kind
        self.vocab_size = int(vocab_size)
        self.num_sentinels = int(num_sentinels)
        self.info = dict(info or {})
        self.backbone = backbone
        if table is not None:
            self.register_buffer("table", table.detach().float().contiguous())
            self.dim = int(table.shape[1])
            rows = int(table.shape[0])
        else:
            self.table = None
            self.dim = int(backbone.config.d_model)
            rows = int(backbone.config.vocab_size)
        if rows != self.vocab_size + self.num_sentinels:
            raise ValueError(f"weights have {rows} token rows, expected vocab_size + num_sentinels = "
                             f"{self.vocab_size + self.num_sentinels}")
        self.normalisation = check_normalisation(normalisation, self.dim, "normalisation")
        shift, scale = _shift_and_scale(self.normalisation, self.dim)
        self.register_buffer("norm_shift", shift, persistent=False)
        self.register_buffer("norm_scale", scale, persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Always stays in eval mode (no dropout), even inside a model that calls `.train()`."""
        return super().train(False)

    def normalise(self, hidden: torch.Tensor) -> torch.Tensor:
        """The single place where raw encoder outputs become x (scalar, per-channel or identity)."""
        return (hidden.float() - self.norm_shift) / self.norm_scale

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] ids → [B, L, d] float32 normalised embeddings.

        `attention_mask` is [B, L] (valid tokens; pads are ignored as keys) or [B, L, L] (query i may
        attend to key j); None means every position is valid. The Gaussian table ignores it (a lookup).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L] (got shape {tuple(input_ids.shape)})")
        if input_ids.numel():
            low, high = (int(v) for v in torch.aminmax(input_ids))
            if low < 0 or high >= self.vocab_size:
                raise ElfError(f"input_ids: token ids must be in [0, {self.vocab_size}) for this encoder "
                               f"(got {low}..{high}); were tokenizer and encoder built together?")
        device = self.norm_scale.device
        input_ids = input_ids.to(device)
        if self.table is not None:
            return self.normalise(self.table[input_ids])
        mask = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
            batch, length = input_ids.shape
            if attention_mask.shape == (batch, length):
                # An all-padding row would mask every key: let it see everything (its output is unused).
                mask = attention_mask.bool() | ~attention_mask.bool().any(dim=-1, keepdim=True)
            elif attention_mask.shape == (batch, length, length):
                mask = _additive_mask(attention_mask.bool(), self.backbone.dtype)
            else:
                raise ValueError(f"attention_mask must be [B, L] or [B, L, L] for input_ids "
                                 f"{tuple(input_ids.shape)} (got {tuple(attention_mask.shape)})")
        with autocast(device):  # bf16 on GPUs, as the authors encode; x itself is fp32 (`normalise`)
            hidden = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return self.normalise(hidden)

    def encode_lm(self, input_ids: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
        """Unconditional rows: the encoder sees only valid tokens (elf-method §2)."""
        return self.encode(input_ids, valid_mask)

    def encode_conditional(
        self,
        input_ids: torch.Tensor,
        source_mask: torch.Tensor,
        valid_mask: torch.Tensor,
        drop_condition: torch.Tensor,
    ) -> torch.Tensor:
        """[source ; target] rows with the §2 mask; zeroing dropped sources in z/x is the trainer's job."""
        return self.encode(input_ids, conditional_attention_mask(source_mask, valid_mask, drop_condition))


# ---------------------------------------------------------------------------------------------------------
# Normalisation records
# ---------------------------------------------------------------------------------------------------------


def check_normalisation(record: Any, dim: int, where: str) -> Normalisation:
    """Validate a normalisation record; errors name `where` (a file or a parameter)."""
    if not isinstance(record, dict) or record.get("kind") not in ("scalar", "per_channel", "none"):
        raise ElfError(f"{where}: normalisation must have kind scalar, per_channel or none "
                       f"(got {record!r:.80})")
    kind = record["kind"]
    if kind == "scalar":
        scale = record.get("scale")
        if not isinstance(scale, int | float) or isinstance(scale, bool) or not scale > 0:
            raise ElfError(f"{where}: scalar normalisation needs a positive 'scale' (got {scale!r})")
        return {"kind": "scalar", "scale": float(scale)}
    if kind == "per_channel":
        values = {}
        for key in ("mean", "std"):
            vector = record.get(key)
            if (not isinstance(vector, list) or len(vector) != dim
                    or not all(isinstance(v, int | float) and math.isfinite(v) for v in vector)):
                raise ElfError(f"{where}: per_channel normalisation needs '{key}' as {dim} finite numbers")
            values[key] = [float(v) for v in vector]
        if min(values["std"]) <= 0:
            raise ElfError(f"{where}: per_channel 'std' must be positive")
        return {"kind": "per_channel", **values}
    return {"kind": "none"}


def _shift_and_scale(record: Normalisation, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if record["kind"] == "scalar":
        return torch.zeros(dim), torch.full((dim,), record["scale"])
    if record["kind"] == "per_channel":
        return torch.tensor(record["mean"]).float(), torch.tensor(record["std"]).float()
    return torch.zeros(dim), torch.ones(dim)


# ---------------------------------------------------------------------------------------------------------
# Constructors: pretrained, gaussian
# ---------------------------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return (text[:200] + "…" if len(text) > 200 else text) or type(error).__name__


def _load_t5_encoder(path: str | Path, **kwargs: Any) -> nn.Module:
    """`T5EncoderModel` explicitly: AutoModel would build a full T5 with a random decoder."""
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                          trust_remote_code=False, **kwargs)


def load_pretrained_encoder(name_or_path: str, vocab_size: int | None = None) -> FrozenEncoder:
    """A pretrained T5 encoder (hub name or local directory) with x = h / 0.2 (elf-method §2).

    `vocab_size` (= len(tokenizer)), when given, is checked against the embedding table so that every
    token id can be encoded (t5-small: 32,128 rows for a 32,100-token tokenizer).
    """
    try:
        backbone = _load_t5_encoder(name_or_path)
    except Exception as error:  # hub, network, format: all mean "this model cannot be used"
        raise ElfError(f"encoder.pretrained: cannot load T5 encoder '{name_or_path}' "
                       f"({_one_line(error)})") from None
    rows = int(backbone.config.vocab_size)
    if vocab_size is not None and vocab_size > rows:
        raise ElfError(f"encoder.pretrained: '{name_or_path}' embeds {rows} token ids but the tokenizer has "
                       f"{vocab_size}")
    return FrozenEncoder("pretrained", backbone=backbone, vocab_size=rows,
                         normalisation={"kind": "scalar", "scale": PRETRAINED_SCALE},
                         info={"source": str(name_or_path)})


def gaussian_encoder(vocab_size: int, dim: int, seed: int) -> FrozenEncoder:
    """A frozen N(0, 1) table of `vocab_size` × `dim` (an ablation, elf-method §2): same seed, same table."""
    if vocab_size <= 0 or dim <= 0:
        raise ElfError(f"encoder.gaussian: vocab_size and dim must be > 0 (got {vocab_size}, {dim})")
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab_size, dim, generator=generator)
    return FrozenEncoder("gaussian", table=table, vocab_size=vocab_size, normalisation={"kind": "none"},
                         info={"seed": seed})


# ---------------------------------------------------------------------------------------------------------
# Save / load: a self-contained directory
# ---------------------------------------------------------------------------------------------------------


def save_encoder(encoder: FrozenEncoder, out_dir: str | Path, tokenizer_hash: str) -> Path:
    """Write `out_dir` (weights + encoder.json) under a temporary sibling, then rename it into place.

    A failure at any point leaves `out_dir` as it was (absent or the previous encoder) and no temporary
    directory behind.
    """
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir) as tmp:
        if encoder.kind == "gaussian":
            from safetensors.torch import save_file

            save_file({"table": encoder.table.detach().cpu().contiguous()}, str(tmp / TABLE_FILE))
        else:
            encoder.backbone.save_pretrained(tmp)
        files = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        record = {
            "format_version": FORMAT_VERSION,
            "kind": encoder.kind,
            "dim": encoder.dim,
            "vocab_size": encoder.vocab_size,
            "num_sentinels": encoder.num_sentinels,
            "normalisation": encoder.normalisation,
            "tokenizer_hash": tokenizer_hash,
            "content_hash": directory_hash(tmp),
            "files": files,
            "info": encoder.info,
        }
        (tmp / ENCODER_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out_dir


def _check_record(record: dict[str, Any], where: Path) -> None:
    expected = {"format_version": int, "kind": str, "dim": int, "vocab_size": int, "num_sentinels": int,
                "normalisation": dict, "tokenizer_hash": str, "content_hash": str, "files": dict}
    for key, kind in expected.items():
        if key not in record:
            raise ElfError(f"{where}: missing key '{key}'")
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            raise ElfError(f"{where}: '{key}' must be {kind.__name__} (got {record[key]!r:.60})")
    if record["format_version"] != FORMAT_VERSION:
        raise ElfError(f"{where}: format_version {record['format_version']} is not supported "
                       f"(expected {FORMAT_VERSION}); re-run the encoder stage")
    if record["kind"] not in KINDS:
        raise ElfError(f"{where}: unknown kind '{record['kind']}' (expected one of {', '.join(KINDS)})")
    if record["dim"] <= 0 or record["vocab_size"] <= 0 or record["num_sentinels"] < 0:
        raise ElfError(f"{where}: dim and vocab_size must be > 0 and num_sentinels >= 0")
    needed = (TABLE_FILE,) if record["kind"] == "gaussian" else T5_FILES
    for name in needed:
        if name not in record["files"]:
            raise ElfError(f"{where}: 'files' does not list {name}")


def _verify_files(directory: Path, record: dict[str, Any], where: Path) -> None:
    """Every listed file exists and matches its hash; nothing unlisted was added (content_hash)."""
    for name, digest in record["files"].items():
        path = directory / name
        if not path.is_file():
            raise ElfError(f"{path}: weight file listed in {ENCODER_JSON} is missing")
        if file_sha256(path) != digest:
            raise ElfError(f"{path}: file is corrupt (sha256 does not match {where})")
    if directory_hash(directory, exclude=(ENCODER_JSON,)) != record["content_hash"]:
        listed = set(record["files"]) | {ENCODER_JSON}
        extra = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                       if p.is_file() and p.relative_to(directory).as_posix() not in listed)
        raise ElfError(f"{where}: content_hash does not match the directory (files not listed: "
                       f"{', '.join(extra) or 'none'})")


def load_encoder(
    directory: str | Path, expected_tokenizer_hash: str | None = None, expected_vocab_size: int | None = None
) -> FrozenEncoder:
    """Load an encoder saved by `save_encoder`, checking every file against `encoder.json`.

    `expected_tokenizer_hash` (the tokenizer directory's hash) and `expected_vocab_size` (len(tokenizer))
    catch an encoder built for another tokenizer.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ElfError(f"{directory}: encoder directory not found (run the encoder stage first)")
    where = directory / ENCODER_JSON
    record = read_json(where, ENCODER_JSON)
    _check_record(record, where)
    if expected_tokenizer_hash is not None and record["tokenizer_hash"] != expected_tokenizer_hash:
        raise ElfError(f"{where}: encoder was built for tokenizer {record['tokenizer_hash'][:12]}…, "
                       f"not {expected_tokenizer_hash[:12]}… (re-run the encoder stage)")
    if expected_vocab_size is not None and expected_vocab_size > record["vocab_size"]:
        raise ElfError(f"{where}: encoder accepts {record['vocab_size']} token ids but the tokenizer has "
                       f"{expected_vocab_size}")
    _verify_files(directory, record, where)
    normalisation = check_normalisation(record["normalisation"], record["dim"], str(where))
    info = record.get("info")
    common = {"vocab_size": record["vocab_size"], "num_sentinels": record["num_sentinels"],
              "normalisation": normalisation, "info": info if isinstance(info, dict) else {}}
    if record["kind"] == "gaussian":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = directory / TABLE_FILE
        try:
            table = load_file(str(path))["table"]
        except (SafetensorError, KeyError, OSError) as error:
            raise ElfError(f"{path}: not a readable table ({_one_line(error)})") from None
        if tuple(table.shape) != (record["vocab_size"] + record["num_sentinels"], record["dim"]):
            raise ElfError(f"{path}: table shape {tuple(table.shape)} does not match {where} "
                           f"(vocab_size {record['vocab_size']}, dim {record['dim']})")
        return FrozenEncoder("gaussian", table=table, **common)
    try:
        backbone = _load_t5_encoder(directory, local_files_only=True)
    except Exception as error:  # a listed file that hashes right but does not load
        raise ElfError(f"{directory / T5_FILES[1]}: not a loadable T5 encoder ({_one_line(error)})") from None
    rows, dim = int(backbone.config.vocab_size), int(backbone.config.d_model)
    if rows != record["vocab_size"] + record["num_sentinels"] or dim != record["dim"]:
        raise ElfError(f"{directory / T5_FILES[0]}: vocab_size {rows} / d_model {dim} do not match {where} "
                       f"(vocab_size {record['vocab_size']} + {record['num_sentinels']} sentinels, "
                       f"dim {record['dim']})")
    return FrozenEncoder(record["kind"], backbone=backbone, **common)

"""A trained ELF model as one self-contained directory that loads anywhere: `ELFPipeline`.

A model directory (what the train stage writes to `models/<dataset>/model/`, and `save_pretrained` writes):

    config.json          model_type "elf", the network's config, dataset, task, lengths, training step,
                         the tokenizer and encoder hashes, the weights' sha256
    model.safetensors    the EMA weights
    tokenizer/           the tokenizer (a `save_pretrained` directory)
    encoder/             the frozen encoder (`elf/encoders.py`'s self-contained directory)
    README.md            the model card

`ELFPipeline.from_pretrained(path_or_hub_id)` loads one (a hub id through huggingface_hub's snapshot
download) and `.generate(...)` samples text; `save_pretrained` and `push_to_hub` come from huggingface_hub's
`ModelHubMixin`. Named after diffusers' pipelines: network, encoder, tokenizer and sampler in one object.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelHubMixin

from elf.data.tokenizer import load_tokenizer, tokenizer_hash
from elf.data.tokens import truncate_source
from elf.encoders import ENCODER_JSON, FrozenEncoder, load_encoder
from elf.errors import ElfError
from elf.files import read_json
from elf.model import ELF, load_model, save_model
from elf.sample import (
    HEADLINE_SAMPLERS,
    Generation,
    SamplerConfig,
    as_trained,
    conditional_texts,
    generate,
    ids_to_texts,
)

TOKENIZER_SUBDIR = "tokenizer"
ENCODER_SUBDIR = "encoder"


class ELFPipeline(ModelHubMixin, library_name="elf", tags=["text-generation", "diffusion", "flow-matching"]):
    """A trained network with its frozen encoder and tokenizer: everything sampling needs.

    Use `ELFPipeline.from_pretrained(directory_or_hub_id, device=...)`; the constructor is for code that
    already holds the parts (the train stage). `tokenizer_dir` / `encoder_dir` are where those parts are
    saved: `save_pretrained` copies them byte for byte, so their hashes in config.json stay true.
    """

    def __init__(self, network: ELF, encoder: FrozenEncoder, tokenizer: Any, info: dict[str, Any],
                 tokenizer_dir: Path, encoder_dir: Path):
        self.network, self.encoder, self.tokenizer, self.info = network.eval(), encoder, tokenizer, info
        self.tokenizer_dir, self.encoder_dir = Path(tokenizer_dir), Path(encoder_dir)

    @property
    def task(self) -> str:
        return self.info["task"]

    @property
    def family(self) -> str:
        """"elf", or the baseline family (elf/families) of the network: "mdlm" or "ar"."""
        return self.info.get("family", "elf")

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> ELFPipeline:
        """Load a local model directory, checking that its parts belong together (errors name the file)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ElfError(f"{directory}: model directory not found")
        network, info = load_model(directory, device)
        tokenizer_dir, encoder_dir = directory / TOKENIZER_SUBDIR, directory / ENCODER_SUBDIR
        tok_hash = tokenizer_hash(tokenizer_dir) if tokenizer_dir.is_dir() else None
        if tok_hash is None or not (encoder_dir / ENCODER_JSON).is_file():
            raise ElfError(f"{directory}: no {TOKENIZER_SUBDIR}/ or {ENCODER_SUBDIR}/ beside the weights (a model "
                           "saved by an older version: rerun its train stage, which resumes from the last checkpoint)")
        if info.get("tokenizer_hash") != tok_hash:
            raise ElfError(f"{tokenizer_dir}: not the tokenizer the model was trained with")
        encoder = load_encoder(encoder_dir, expected_tokenizer_hash=tok_hash).to(device)
        if info.get("encoder_content_hash") != read_json(encoder_dir / ENCODER_JSON, "encoder record")["content_hash"]:
            raise ElfError(f"{encoder_dir}: not the encoder the model was trained with")
        return cls(network, encoder, load_tokenizer(tokenizer_dir), info, tokenizer_dir, encoder_dir)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         device: str | torch.device = "cpu") -> ELFPipeline:
        directory = Path(model_id)
        if not directory.is_dir():
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir, token=token,
                                               force_download=force_download, local_files_only=local_files_only))
        return cls.load(directory, device)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_model(self.network, save_directory, self.info)
        for source, name in ((self.tokenizer_dir, TOKENIZER_SUBDIR), (self.encoder_dir, ENCODER_SUBDIR)):
            shutil.copytree(source, Path(save_directory) / name, dirs_exist_ok=True)

    def sampler(self, **changes: Any) -> SamplerConfig:
        """The default sampler of this model (ELF: the paper's headline setting for its task, elf-method §7;
        MDLM: one step per position; AR: ancestral), with `changes` (None = keep)."""
        if self.family == "elf":
            default = HEADLINE_SAMPLERS[self.task]
        else:
            default = SamplerConfig(kind=self.family, steps=self.info["max_length"])
        return self.resolve_sampler(dataclasses.replace(default, **{k: v for k, v in changes.items() if v is not None}))

    def resolve_sampler(self, cfg: SamplerConfig) -> SamplerConfig:
        """`cfg` with the settings that must match training (noise scale, x̂ → v floor) taken from this model's
        objective where `cfg` leaves them at None (`elf.sample.as_trained`)."""
        return as_trained(cfg, self.info.get("objective"))

    @torch.no_grad()
    def generate(self, num_samples: int = 1, *, source: str | list[str] | None = None, seed: int = 0,
                 batch_size: int = 64, progress: bool = False, **sampler: Any) -> list[str]:
        """Sample texts. lm models: `num_samples` texts. seq2seq models: one text per source (`source` a list),
        or `num_samples` for one source string. `sampler`: kind, steps, gamma, guidance, cfg_scale, grid
        (defaults: `self.sampler()`). Raises ElfError for a source given to an lm model or missing for seq2seq."""
        cfg = self.sampler(**sampler)
        if self.task == "lm":
            if source is not None:
                raise ElfError(f"the {self.info['dataset']} model is unconditional: a source does not apply")
            out, _ = self.sample_ids(cfg, seed, batch_size, num_samples=num_samples, progress=progress)
            return ids_to_texts(out.ids, self.tokenizer)
        if not source:
            raise ElfError(f"the {self.info['dataset']} model is conditional: it needs a source text")
        texts = [source] * num_samples if isinstance(source, str) else list(source)
        ids = [truncate_source(self.tokenizer(text, add_special_tokens=False)["input_ids"],
                               self.info["max_input_length"]) for text in texts]
        out, mask = self.sample_ids(cfg, seed, batch_size, sources=ids, progress=progress)
        return conditional_texts(out.ids, self.tokenizer, mask, self.info["max_length"],
                                 self.info["max_input_length"])

    @torch.no_grad()
    def sample_ids(self, cfg: SamplerConfig, seed: int, batch_size: int, num_samples: int | None = None,
                   sources: list[list[int]] | None = None,
                   progress: bool = False) -> tuple[Generation, torch.Tensor | None]:
        """Token ids of samples [N, max_length] with the sampler `cfg`, whatever the model's family, and the
        source mask [N, max_length] of conditional rows (None for lm). `sources`: source token ids, one list
        per row (seq2seq); lm models draw `num_samples` rows."""
        cfg = self.resolve_sampler(cfg)
        if cfg.family != self.family:
            raise ElfError(f"sampler kind {cfg.kind!r} samples {cfg.family} models; this model is {self.family} "
                           f"(trained with train.family: {self.family})")
        length = self.info["max_length"]
        if self.family == "elf":
            if sources is None:
                return generate(self.network, self.encoder.dim, length, batch_size, cfg, seed, self.device,
                                num_samples=num_samples, progress=progress), None
            x_source, mask = self.encode_sources(sources)
            return generate(self.network, self.encoder.dim, length, batch_size, cfg, seed, self.device,
                            source=x_source, source_mask=mask, progress=progress), mask
        from elf.data.layout import stack_seq2seq
        from elf.families.generate import generate_tokens

        if sources is None:
            return generate_tokens(self.network, length, batch_size, cfg, seed, self.device, num_samples), None
        source_ids, mask, _ = stack_seq2seq(sources, [[] for _ in sources], length)
        return generate_tokens(self.network, length, batch_size, cfg, seed, self.device,
                               source_ids=source_ids, source_mask=mask), mask

    @torch.no_grad()
    def encode_sources(self, sources: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean source embeddings in place (the source attends only to itself, elf-method §2), zeros elsewhere:
        ([N, L, d] on the CPU, source mask [N, L])."""
        from elf.data.layout import stack_seq2seq

        input_ids, source_mask, valid_mask = stack_seq2seq(sources, [[] for _ in sources], self.info["max_length"])
        drop = torch.zeros(len(sources), dtype=torch.bool)
        x = self.encoder.encode_conditional(input_ids, source_mask, valid_mask, drop).cpu()
        return x * source_mask[..., None], source_mask

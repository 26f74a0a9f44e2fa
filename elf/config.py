"""Typed configuration: `params.yaml` → validated, immutable config objects.

Every value a stage reads comes from `params.yaml`, so DVC tracks it. Validation happens at load:
an unknown key, a wrong type or an impossible value is an `ElfError` whose one line names the key,
e.g. ``params.yaml: datasets.owt.max_length: must be > 0 (got -5)``. Nothing is silently ignored.

Presets (`elf/presets/<name>.yaml`) are overlays merged into `params.yaml` by `elf config apply <name>`;
the result is validated before it is written, and comments in `params.yaml` survive the edit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml.representer import RoundTripRepresenter

from elf.errors import ElfError
from elf.files import atomic_file
from elf.vocab import NUM_SENTINELS, NUM_SPECIAL_TOKENS

INPUT_DIR = Path("data/input")  # users' own files, one folder per dataset (datasets.<ds>.files)

Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")
PRESETS_DIR = Path(__file__).parent / "presets"
_DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors, types are not coerced, objects are immutable, and no
    float may be inf or NaN (YAML spells them `.inf` / `.nan`; none is a meaningful setting here)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DemoSource(_Strict):
    """Built-in offline generators (elf/data/demo.py); sizes are numbers of documents / pairs."""

    generator: Literal["lm", "translation", "summarization"]
    train_size: int = Field(gt=0)
    validation_size: int = Field(gt=0)
    test_size: int = Field(default=0, ge=0)
    # Sentences per document (lm, summarization) or per pair (translation); None: the generator's default
    # (6, 2, 8). Summarisation needs >= 3 (the event and two mentions of the main person).
    max_sentences: int | None = Field(default=None, gt=0)
    words_per_class: int | None = Field(default=None, gt=0)  # first N words of each word class; None: all 190

    @model_validator(mode="after")
    def _check(self) -> DemoSource:
        if self.generator == "summarization" and self.max_sentences is not None and self.max_sentences < 3:
            raise ValueError(f"max_sentences must be >= 3 for summarization (got {self.max_sentences})")
        if self.words_per_class is not None and self.words_per_class < 2 and self.generator == "summarization":
            raise ValueError("words_per_class must be >= 2 for summarization (two names at least)")
        return self


class HubSource(_Strict):
    """A real dataset through `datasets.load_dataset(path, name, revision=...)` (Parquet-backed repos)."""

    path: str = Field(min_length=1)
    name: str | None = None
    revision: str | None = None
    fields: dict[str, str]
    splits: dict[Split, str]
    limits: dict[Split, int] = Field(default_factory=dict)
    validation_holdout: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> HubSource:
        if "train" not in self.splits:
            raise ValueError("splits must include train")
        for split, limit in self.limits.items():
            if limit <= 0:
                raise ValueError(f"limits.{split} must be > 0 (got {limit})")
        if self.validation_holdout and "validation" in self.splits:
            raise ValueError("set either validation_holdout or splits.validation, not both")
        return self


class FilesSource(_Strict):
    """Local jsonl / parquet / txt files, one per split, with a column mapping."""

    splits: dict[Split, str]
    format: Literal["jsonl", "parquet", "txt"] | None = None
    fields: dict[str, str]

    @model_validator(mode="after")
    def _check(self) -> FilesSource:
        if "train" not in self.splits:
            raise ValueError("splits must include train")
        return self


class DatasetConfig(_Strict):
    """One dataset: its task, where its raw text comes from, and its sequence layout (elf-method §2)."""

    task: Literal["lm", "seq2seq"]
    source: Literal["demo", "hub", "files"]
    max_length: int = Field(gt=1)
    max_input_length: int | None = None
    demo: DemoSource | None = None
    hub: HubSource | None = None
    files: FilesSource | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        return ("text",) if self.task == "lm" else ("source", "target")

    @model_validator(mode="after")
    def _check(self) -> DatasetConfig:
        section = getattr(self, self.source)
        if section is None:
            raise ValueError(f"source is '{self.source}' but there is no '{self.source}:' section")
        if self.task == "seq2seq":
            if self.max_input_length is None:
                raise ValueError("max_input_length is required for task seq2seq")
            if not 0 < self.max_input_length < self.max_length:
                raise ValueError(
                    f"max_input_length must be in (0, max_length={self.max_length}) (got {self.max_input_length})"
                )
        elif self.max_input_length is not None:
            raise ValueError("max_input_length only applies to task seq2seq")
        for kind in ("hub", "files"):
            source = getattr(self, kind)
            if source is not None and set(source.fields) != set(self.columns):
                raise ValueError(
                    f"{kind}.fields must map exactly {list(self.columns)} for task {self.task} "
                    f"(got {sorted(source.fields)})"
                )
        if self.demo is not None:
            expected = "lm" if self.task == "lm" else ("translation", "summarization")
            if (self.task == "lm") != (self.demo.generator == "lm"):
                raise ValueError(f"demo.generator '{self.demo.generator}' does not fit task {self.task} "
                                 f"(use {expected})")
        return self


class TokenizerConfig(_Strict):
    """`train`: a tokenizer trained on the raw training text (`algorithm`); `pretrained`: copied."""

    kind: Literal["train", "pretrained"]
    algorithm: Literal["bpe", "unigram"] = "bpe"  # for kind train; see elf/data/tokenizer.py
    pretrained: str = "t5-small"
    vocab_size: int = 2000  # len(tokenizer): pieces + specials + sentinels (an upper bound)
    max_texts_per_dataset: int = Field(default=20_000, gt=0)

    @model_validator(mode="after")
    def _check(self) -> TokenizerConfig:
        if self.vocab_size <= NUM_SPECIAL_TOKENS + NUM_SENTINELS:
            raise ValueError(
                f"vocab_size must exceed the {NUM_SPECIAL_TOKENS} special tokens and {NUM_SENTINELS} "
                f"sentinels (got {self.vocab_size})"
            )
        return self


class TokenizeConfig(_Strict):
    """Streaming tokenization into few, large Parquet shards.

    `packing` (lm rows, elf-method §2): `paragraphs` fills rows across document boundaries, paragraph by
    paragraph (the paper; rows ≈ 85–100% full); `documents` gives each document its own rows (short rows).
    """

    shard_rows: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    workers: int = Field(default=0, ge=0)
    packing: Literal["paragraphs", "documents"] = "paragraphs"


class ScratchEncoderConfig(_Strict):
    """A small T5 trained here with span corruption; only its encoder is kept (elf-method §2)."""

    d_model: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    d_ff: int = Field(gt=0)
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    max_length: int = Field(gt=2)
    lr: float = Field(gt=0)
    max_rows_per_dataset: int = Field(default=20_000, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ScratchEncoderConfig:
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide d_model ({self.d_model})")
        return self


class EncoderConfig(_Strict):
    """The frozen encoder: `pretrained` T5 (the paper: t5-small), `scratch` (demo default) or `gaussian`."""

    kind: Literal["pretrained", "scratch", "gaussian"]
    pretrained: str = "t5-small"
    scratch: ScratchEncoderConfig | None = None
    gaussian_dim: int = Field(default=128, gt=0)

    @model_validator(mode="after")
    def _check(self) -> EncoderConfig:
        if self.kind == "scratch" and self.scratch is None:
            raise ValueError("kind is 'scratch' but there is no 'scratch:' section")
        return self


class EmbedConfig(_Strict):
    """The embedding cache: per dataset on/off (off = training encodes online)."""

    cache: dict[str, bool]
    batch_size: int = Field(gt=0)


class ObjectiveSettings(_Strict):
    """The training objective's constants (elf-method §3, §4, §6); defaults are the paper's."""

    time_mean: float = -1.5
    time_std: float = Field(default=0.8, gt=0)
    noise_scale: float = Field(default=2.0, gt=0)
    min_denom: float = Field(default=0.05, gt=0, le=1)
    decode_prob: float = Field(default=0.2, ge=0, le=1)
    decode_noise_scale: float = Field(default=5.0, gt=0)  # §4: 5 for OWT, 1 for WMT14 / XSum
    decode_keep_mean: float = 0.8
    decode_keep_std: float = Field(default=0.8, gt=0)
    self_cond_prob: float = Field(default=0.5, ge=0, le=1)
    guidance_low: float = Field(default=1.5, gt=1)
    guidance_high: float = Field(default=6.0, gt=1)
    condition_dropout: float = Field(default=0.1, ge=0, lt=1)


class ValidationSettings(_Strict):
    """The held-out loss during training (elf/validation.py): fixed rows, fixed t values, fixed noise."""

    every: int = Field(default=0, ge=0)  # steps between checks (0: off); the last step is always checked
    rows: int = Field(default=256, gt=0)  # the first rows of the validation split (fewer if it has fewer)
    t_values: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> ValidationSettings:
        if any(not 0.0 < t < 1.0 for t in self.t_values) or len(set(self.t_values)) < len(self.t_values):
            raise ValueError(f"t_values must be distinct and lie in (0, 1) (got {self.t_values})")
        return self


class ModelSettings(_Strict):
    """Changes to the preset's network shape (elf-method §5); a field left out (None) keeps the preset's value.

    Typed so that a misspelt or impossible shape fails at load (`elf config check`), not at train time.
    The shape rules themselves live in `elf.model.ModelConfig` and are applied to preset + changes here.
    """

    depth: int | None = Field(default=None, gt=0)
    hidden: int | None = Field(default=None, gt=0)
    heads: int | None = Field(default=None, gt=0)
    bottleneck: int | None = Field(default=None, gt=0)
    decode_hidden: int | None = Field(default=None, gt=0)
    mlp_hidden: int | None = Field(default=None, gt=0)
    num_prefix_each: int | None = Field(default=None, gt=0)
    rope_theta: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    freq_dim: int | None = Field(default=None, gt=0)
    max_period: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    norm_eps: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    attention_fp32: bool | None = None
    time_conditioning: bool | None = None  # family mdlm only: time tokens (default) or none (exact sampler cache)

    def overrides(self) -> dict[str, int | float | bool]:
        """The fields set here, as keyword arguments of `elf.model.build_model`."""
        return self.model_dump(exclude_none=True)


class TrainSettings(_Strict):
    """One training run (elf-method §8). `train.defaults` holds these; `train.datasets.<ds>` overrides them."""

    # elf | mdlm | ar: the model family (elf/families). The baselines share the preset's backbone, the data,
    # optimiser, checkpoints and evaluation; objective settings apply to ELF only.
    family: Literal["elf", "mdlm", "ar"] = "elf"
    preset: str = "tiny"
    model: ModelSettings = Field(default_factory=ModelSettings)  # changes to the preset's shape ({} = as is)
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)  # global batch, whatever the number of processes
    micro_batch_size: int | None = Field(default=None, gt=0)  # per process; None = batch / world (no accumulation)
    # Processes on this machine: > 1 makes `elf train` launch `torchrun --standalone` (one per GPU); "auto" is
    # one per visible GPU. The result does not depend on it (world-size-invariant batches and noise).
    nproc_per_node: int | Literal["auto"] = 1
    compile: bool | Literal["auto"] = "auto"  # torch.compile the network (elf/step.py); auto: on CUDA only
    optimizer: Literal["muon", "adamw"] = "muon"
    base_lr: float = Field(default=0.001, gt=0)  # lr = base_lr × batch_size / 256 (§8)
    lr: float | None = Field(default=None, gt=0)  # set to override the batch scaling
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    ema_decay: float = Field(default=0.9999, ge=0, lt=1)
    checkpoint_every: int = Field(gt=0)
    keep_checkpoints: int = Field(default=2, gt=0)
    log_every: int = Field(default=10, gt=0)
    shuffle_window: int = Field(default=4, gt=0)  # row groups mixed in the shuffle buffer
    objective: ObjectiveSettings = Field(default_factory=ObjectiveSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        from elf.model import PRESETS, check_shape

        if self.preset not in PRESETS:
            raise ValueError(f"preset '{self.preset}' is not one of {', '.join(PRESETS)}")
        try:
            check_shape({**PRESETS[self.preset], **self.model.overrides()})
        except ValueError as error:
            raise ValueError(f"model: {error}") from None
        if self.nproc_per_node != "auto" and self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1 or 'auto' (got {self.nproc_per_node})")
        if self.objective.guidance_high <= self.objective.guidance_low:
            raise ValueError("objective.guidance_high must exceed objective.guidance_low")
        return self


def _deep_update(base: dict, overlay: dict) -> dict:
    """`base` with `overlay` merged in: a non-empty mapping merges key by key, anything else (an empty
    mapping `{}` included, which means "empty", not "unchanged") replaces the value."""
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = _deep_update(base[key], value) if value and isinstance(value, dict) and isinstance(
            base.get(key), dict) else value
    return merged


class TrainConfig(_Strict):
    defaults: dict[str, Any]
    datasets: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def for_dataset(self, name: str) -> TrainSettings:
        """The defaults with the dataset's overrides applied, validated (errors name the merged key)."""
        override = self.datasets.get(name, {})
        try:
            return TrainSettings.model_validate(_deep_update(self.defaults, override))
        except ValidationError as error:
            # Name the section the bad key came from: the dataset's override, else the defaults.
            node, loc = override, error.errors()[0]["loc"]
            for part in loc:
                node = node.get(part) if isinstance(node, dict) else None
            if not loc:  # a rule over several keys of the merged settings
                raise ElfError(_format_error(f"params.yaml: train (for dataset {name})", error)) from None
            section = f"train.datasets.{name}" if node is not None else "train.defaults"
            raise ElfError(_format_error("params.yaml", error, key_prefix=section)) from None


class SampleConfig(_Strict):
    """Sampling for evaluation (elf-method §7): every sampler listed for a dataset is run and evaluated."""

    num_samples: int = Field(gt=0)  # lm: samples per sampler and seed; seq2seq: test rows (at most)
    batch_size: int = Field(gt=0)
    seeds: list[int] = Field(min_length=1)  # evaluation seeds: metrics are reported as mean ± SE over them
    samplers: dict[str, list[dict[str, Any]]]

    @model_validator(mode="after")
    def _check(self) -> SampleConfig:
        from elf.sample import SamplerConfig

        for dataset, specs in self.samplers.items():
            names = []
            for i, spec in enumerate(specs):
                where = f"samplers.{dataset}[{i}]"
                if "name" not in spec:
                    raise ValueError(f"{where}: every sampler needs a name")
                names.append(spec["name"])
                try:
                    SamplerConfig.from_dict({k: v for k, v in spec.items() if k != "name"})
                except ElfError as error:
                    raise ValueError(f"{where}: {error}") from None
            if len(set(names)) != len(names):
                raise ValueError(f"samplers.{dataset}: sampler names must be unique (got {names})")
        return self

    def sampler_configs(self, dataset: str):
        from elf.sample import SamplerConfig

        return {spec["name"]: SamplerConfig.from_dict({k: v for k, v in spec.items() if k != "name"})
                for spec in self.samplers[dataset]}


class TrainedJudgeSettings(_Strict):
    """The judge trained on a dataset's own rows when `evaluate.judge` is `trained` (elf/judge.py)."""

    layers: int = Field(default=2, gt=0)
    hidden: int = Field(default=128, gt=0)
    heads: int = Field(default=4, gt=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    steps: int = Field(default=600, gt=0)
    batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=0.003, gt=0, allow_inf_nan=False)
    max_rows: int = Field(default=200_000, gt=0)  # training rows read (the first ones of the split)

    @model_validator(mode="after")
    def _check(self) -> TrainedJudgeSettings:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        return self


class EvaluateConfig(_Strict):
    """Metrics (elf-method §9) and the model registry."""

    # Causal LM for Gen PPL: `trained` (a small one trained here on the dataset, elf/judge.py), a hub name or
    # path (paper: gpt2-large), or None (skip; lm models are then ranked by the demo oracle only).
    judge: str | None = None
    trained_judge: TrainedJudgeSettings = Field(default_factory=TrainedJudgeSettings)
    judge_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    judge_batch_size: int = Field(default=8, gt=0)
    primary_metric: dict[str, str] = Field(default_factory=dict)  # per dataset; default: PPL (lm) or bleu
    register_model: bool = True  # register the model as elf-<dataset> (alias candidate; champion if it is better)
    # A model is ranked by its primary metric only when its coverage and diversity figures reach this share of
    # the same figures on reference text of the same length (elf/selection.py); otherwise it never becomes champion.
    selection_ratio: float = Field(default=0.5, gt=0, le=1)


class CompareConfig(_Strict):
    """`elf compare` (elf/compare.py): ELF, MDLM and AR trained to the same training FLOPs on the same data and
    scored alike. Not a DVC stage: it trains three models per dataset (tens of minutes on a CPU)."""

    # The datasets of params.yaml to compare on, each with changes to its settings for the comparison (e.g.
    # owt: {max_length: 128}: rows long enough for step counts to mean something). Data lives in compare/data/.
    datasets: dict[str, dict[str, Any]]
    # Changes to train.datasets.<ds> for ELF's training; its training FLOPs are the budget of the other families.
    train: dict[str, dict[str, Any]] = Field(default_factory=dict)
    families: list[Literal["elf", "mdlm", "ar"]] = Field(default_factory=lambda: ["elf", "mdlm", "ar"], min_length=1)
    elf_steps: list[int] = Field(default_factory=lambda: [8, 16, 32, 64], min_length=1)  # ELF sampler steps
    mdlm_steps: list[int] = Field(default_factory=lambda: [16, 32, 64, 128], min_length=1)  # capped at the row
    num_samples: int = Field(default=64, gt=0)  # lm: samples per sampler and seed; seq2seq: test rows
    batch_size: int = Field(default=64, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> CompareConfig:
        for name, steps in (("elf_steps", self.elf_steps), ("mdlm_steps", self.mdlm_steps)):
            if any(s < 1 for s in steps):
                raise ValueError(f"{name} must be positive step counts (got {steps})")
        if len(set(self.families)) != len(self.families):
            raise ValueError(f"families must be distinct (got {self.families})")
        return self


class Config(_Strict):
    seed: int
    threads: int | None = Field(default=None, gt=0)  # torch CPU threads per process; None: elf.runtime.default_threads
    datasets: dict[str, DatasetConfig]
    tokenizer: TokenizerConfig
    tokenize: TokenizeConfig
    encoder: EncoderConfig
    embed: EmbedConfig
    train: TrainConfig
    sample: SampleConfig
    evaluate: EvaluateConfig
    compare: CompareConfig | None = None  # `elf compare` (elf/compare.py); not part of `dvc repro`

    @model_validator(mode="after")
    def _check(self) -> Config:
        if not self.datasets:
            raise ValueError("at least one dataset is required")
        for name, dataset in self.datasets.items():
            if not _DATASET_NAME.match(name):
                raise ValueError(f"dataset name '{name}' must match {_DATASET_NAME.pattern}")
            # DVC tracks data/input/<dataset>/ as prepare@<dataset>'s input (dvc.yaml): a file elsewhere could
            # change without DVC noticing, and stale data would be used.
            folder = INPUT_DIR / name
            for split, path in (dataset.files.splits.items() if dataset.source == "files" else ()):
                if Path(path).is_absolute() or not Path(os.path.normpath(path)).is_relative_to(folder):
                    raise ValueError(f"datasets.{name}.files.splits.{split}: {path} is not under {folder}/ (DVC "
                                     f"tracks that folder as the input of prepare@{name}; move or link the file there)")
        unknown = set(self.embed.cache) ^ set(self.datasets)
        if unknown:
            raise ValueError(f"embed.cache must name every dataset exactly once (check: {sorted(unknown)})")
        # Each dataset's stages depend on its own sections only (dvc.yaml), so each must exist, `{}` at least.
        unknown = set(self.train.datasets) ^ set(self.datasets)
        if unknown:
            raise ValueError(f"train.datasets must name every dataset exactly once, {{}} for no changes to the "
                             f"defaults (check: {sorted(unknown)})")
        unknown = set(self.sample.samplers) ^ set(self.datasets)
        if unknown:
            raise ValueError(f"sample.samplers must list every dataset exactly once (check: {sorted(unknown)})")
        if self.compare is not None:
            for name in set(self.compare.datasets) | set(self.compare.train):
                if name not in self.datasets:
                    raise ValueError(f"compare: dataset '{name}' is not one of datasets ({', '.join(self.datasets)})")
            for name in self.compare.datasets:
                self.compare_dataset(name)
                self.compare_train(name)
        for name in self.datasets:  # every dataset's merged training settings must be valid at load
            family = self.train.for_dataset(name).family
            for sampler_name, sampler in self.sample.sampler_configs(name).items():
                if sampler.family != family:  # e.g. an ODE sampler listed for an MDLM model
                    raise ValueError(f"sample.samplers.{name}: sampler {sampler_name} (kind {sampler.kind}) samples "
                                     f"{sampler.family} models, but train.datasets.{name}.family is {family}")
        return self

    def compare_dataset(self, name: str) -> DatasetConfig:
        """datasets.<name> with compare.datasets.<name> merged in (errors name the compare key)."""
        merged = _deep_update(self.datasets[name].model_dump(exclude_none=True), self.compare.datasets[name])
        try:
            return DatasetConfig.model_validate(merged)
        except ValidationError as error:
            raise ValueError(_format_error("", error, key_prefix=f"compare.datasets.{name}").lstrip(": ")) from None

    def compare_train(self, name: str) -> TrainSettings:
        """ELF's training settings in the comparison: train.defaults, train.datasets.<name>, then
        compare.train.<name>, with family elf."""
        override = _deep_update(self.train.datasets.get(name, {}), self.compare.train.get(name, {}))
        return TrainConfig(defaults=self.train.defaults, datasets={name: {**override, "family": "elf"}}).for_dataset(
            name)

    def dataset(self, name: str) -> DatasetConfig:
        """The named dataset, or a one-line error listing the known ones."""
        if name not in self.datasets:
            raise ElfError(f"unknown dataset '{name}' (params.yaml defines: {', '.join(self.datasets)})")
        return self.datasets[name]


def _format_error(source: str, error: ValidationError, key_prefix: str = "") -> str:
    first = error.errors()[0]
    where = ".".join(([key_prefix] if key_prefix else []) + [str(part) for part in first["loc"]])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    elif "input" in first and not isinstance(first["input"], dict | list):  # the bad value, never a section
        got = repr(first["input"])
        message += f" (got {got if len(got) <= 80 else got[:77] + '...'})"
    return f"{source}: {where}: {message}" if where else f"{source}: {message}"


def config_from_dict(data: Any, source: str = "params.yaml") -> Config:
    """Validate a plain dict; errors name `source` and the dotted key."""
    if not isinstance(data, dict):
        raise ElfError(f"{source}: expected a mapping at the top level")
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ElfError(_format_error(source, error)) from None


def parse_yaml(text: str, source: str) -> Any:
    """YAML 1.2, the dialect DVC reads and writes params.yaml in (PyYAML's 1.1 reads DVC's `1e-05` as a string).
    A duplicate key is an error, not "the last one wins". Errors are one line naming `source` and the line."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        return YAML(typ="safe", pure=True).load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(error.problem or error.context or "").split())
        raise ElfError(f"{source}: invalid YAML{where}: {problem}") from None
    except YAMLError as error:
        raise ElfError(f"{source}: invalid YAML ({' '.join(str(error).split())})") from None


def read_yaml(path: str | Path) -> Any:
    """A YAML 1.2 file (`parse_yaml`); a missing file is a one-line error naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ElfError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise ElfError(f"{path}: not UTF-8 text") from None
    return parse_yaml(text, str(path))


def load_config(path: str | Path = "params.yaml") -> Config:
    """Load and validate `params.yaml` (the only place stage settings come from)."""
    return config_from_dict(read_yaml(path), source=str(path))


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _merge_in_place(base: Any, overlay: Any) -> None:
    """Merge the preset `overlay` into the round-trip YAML mapping `base` in place.

    The rule of `_deep_update`: a non-empty mapping merges key by key, anything else replaces (`{}` empties).
    Lists replace element by element, and a mapping is refilled rather than swapped, so the containers keep
    their YAML style and comments: applying one preset and then the other gives back the file byte for byte.
    """
    for key, value in overlay.items():
        current = base.get(key)
        if isinstance(value, dict) and isinstance(current, dict) and value and current:
            _merge_in_place(current, value)
        elif isinstance(value, dict) and isinstance(current, dict) and not value:
            current.clear()
        elif isinstance(value, list) and isinstance(current, list):
            _replace_list(current, value)
        else:
            base[key] = value


def _replace_list(current: list, value: list) -> None:
    del current[len(value):]
    for i, item in enumerate(value):
        if i >= len(current):
            current.append(item)
        elif isinstance(item, dict) and isinstance(current[i], dict):
            current[i].clear()
            current[i].update(item)
        else:
            current[i] = item


def _null_as_null(representer, _):
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


class _NullAsNull(RoundTripRepresenter):
    """Writes None as `null`, as params.yaml spells it (ruamel's default writes nothing). A subclass, so that
    other YAML writers in the process keep ruamel's behaviour."""


_NullAsNull.add_representer(type(None), _null_as_null)


def params_yaml():
    """The comment-preserving YAML 1.2 reader/writer of params.yaml (DVC's dialect), in the file's own layout;
    every edit of params.yaml (presets, the flows' overrides) goes through it."""
    from ruamel.yaml import YAML

    round_trip = YAML()
    round_trip.Representer = _NullAsNull
    round_trip.preserve_quotes = True
    round_trip.indent(mapping=2, sequence=4, offset=2)
    round_trip.width = 4096  # never fold a flow mapping onto two lines
    return round_trip


def apply_preset(name: str, params_path: str | Path = "params.yaml") -> Config:
    """Overlay `elf/presets/<name>.yaml` onto `params_path`, validate, then replace the file atomically."""

    if name not in available_presets():
        raise ElfError(f"unknown preset '{name}' (available: {', '.join(available_presets())})")
    params_path = Path(params_path)
    round_trip = params_yaml()
    with open(PRESETS_DIR / f"{name}.yaml", encoding="utf-8") as handle:
        overlay = round_trip.load(handle)  # round-trip objects: the preset's own styles travel with its values
    try:
        with open(params_path, encoding="utf-8") as handle:
            document = round_trip.load(handle)
    except FileNotFoundError:
        raise ElfError(f"{params_path}: file not found") from None
    _merge_in_place(document, overlay)
    return write_params(document, params_path, source=f"{params_path} with preset {name}")


def write_params(document: Any, params_path: str | Path, source: str) -> Config:
    """Write a round-trip `params_yaml()` document to `params_path` if it validates; return its Config.

    The file is replaced atomically and only after validation, so a bad value is a one-line ElfError and
    leaves `params_path` as it was."""
    with atomic_file(params_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            params_yaml().dump(document, handle)
        return config_from_dict(read_yaml(tmp), source=source)

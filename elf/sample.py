"""Sampling (elf-method.md §7): time grids, the ODE and "SDE-inspired" samplers, input-CFG, decode to text.

The samplers see the network only as a `Denoiser`, a callable (z, x̂_prev, t, w) → x̂. That keeps the §7
math apart from the model, and lets the tests check it against denoisers whose exact answer is known
(Gaussian data). `model_denoiser` adapts a trained ELF; which weights it carries (EMA, §7/§8) is the caller's
choice of model.

Conventions as in `elf.flow`: t = 0 is noise, t = 1 is data, s = 2 the noise scale, x̂ → v through
max(1 − t, 0.05). Conditional rows carry a boolean `source_mask` [B, L]: those positions hold the clean
source embeddings in every state (§2, §6) and are never noised.

Randomness: every draw comes from the `torch.Generator` the caller passes, on that generator's device, in
a fixed order — the prior first, then the T − 1 grid draws (logit-normal grid), then one ε' per SDE step —
so a seed reproduces a batch exactly.

Typical use (unconditional OWT headline setting, §7 table):
    cfg = SamplerConfig(kind="sde", steps=32, gamma=1.5, guidance=3.0)
    result = generate(ema_model, encoder_dim=512, length=1024, batch=32, cfg=cfg, seed=0, device="cuda",
                      num_samples=1000)
    texts = ids_to_texts(result.ids, tokenizer)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import Tensor

from elf.errors import ElfError
from elf.families import SAMPLER_FAMILY
from elf.runtime import autocast, on_terminal
from elf.vocab import EOS_ID, PAD_ID

#: x̂ = denoiser(z [B, L, d], x̂_prev [B, L, d], t [B], w [B]): the clean-embedding prediction, [B, L, d] fp32.
Denoiser = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

SAMPLER_KINDS = tuple(SAMPLER_FAMILY)  # ode, sde (ELF) and the baselines' mdlm, ar, ar_greedy (elf/families)
GRID_KINDS = ("logit_normal", "uniform")


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SamplerConfig:
    """Every sampling setting (§7), kept apart from the training settings. Defaults: the OWT headline row."""

    kind: str = "sde"  # "ode" (Euler) or "sde" (noise re-injection with gamma); baselines: see SAMPLER_FAMILY
    steps: int = 32  # T denoising steps
    gamma: float = 1.5  # SDE re-injection strength γ; 0 makes the SDE the ODE
    guidance: float = 3.0  # SC-CFG scale w, fed through the guidance tokens (§6); trained on [0.5, 5]
    cfg_scale: float = 1.0  # input-CFG ω on the source of conditional tasks (§6); 1 = off (one pass per step)
    grid: str = "logit_normal"  # "logit_normal" (the paper's) or "uniform" (the worse alternative)
    grid_mean: float = -1.5  # logit-normal grid: sigmoid(N(mean, std²)) draws
    grid_std: float = 0.8
    # s of the prior and of the SDE re-injection (§2) and the x̂ → v floor (§3): must be the values the model was
    # trained with. None = the model's (`ELFPipeline.resolve_sampler` reads them from its config; a bare network
    # without a config gets the paper's 2 and 0.05).
    noise_scale: float | None = None
    min_denom: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SAMPLER_KINDS:
            raise ElfError(f"sampler.kind: unknown sampler {self.kind!r} (known: {', '.join(SAMPLER_KINDS)})")
        if self.grid not in GRID_KINDS:
            raise ElfError(f"sampler.grid: unknown time grid {self.grid!r} (known: {', '.join(GRID_KINDS)})")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ElfError(f"sampler.steps: must be an integer >= 1, got {self.steps!r}")
        for name in ("gamma", "guidance", "cfg_scale", "grid_mean", "grid_std", "noise_scale", "min_denom"):
            value = getattr(self, name)
            if value is None and name in AS_TRAINED:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ElfError(f"sampler.{name}: must be a finite number, got {value!r}")
        for name, low in (("gamma", 0.0), ("cfg_scale", 0.0), ("grid_std", 0.0)):
            if not getattr(self, name) >= low:
                raise ElfError(f"sampler.{name}: must be >= {low:g}, got {getattr(self, name)!r}")
        for name in ("noise_scale", "min_denom", "guidance"):  # w is trained on [0.5, 5] (§6); 0 or less is no scale
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ElfError(f"sampler.{name}: must be > 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def family(self) -> str:
        return SAMPLER_FAMILY[self.kind]

    @classmethod
    def from_dict(cls, data: dict) -> SamplerConfig:
        """From a params/config dict; a misspelt key is an error, never silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ElfError(f"sampler: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def network_evaluations(self, conditional: bool = False) -> int:
        """§7: T denoising passes (×2 with input-CFG on a conditional task) + 1 decode pass."""
        return self.steps * (2 if self.uses_input_cfg(conditional) else 1) + 1

    def uses_input_cfg(self, conditional: bool) -> bool:
        """Input-CFG needs a source, and at ω = 1 it *is* the conditional pass, so that pass alone is run."""
        return conditional and self.cfg_scale != 1.0


AS_TRAINED = {"noise_scale": 2.0, "min_denom": 0.05}
"""Sampler settings that must equal the objective's (elf.flow.ObjectiveConfig), with the paper's values: what a
`SamplerConfig` field left at None means for a network whose training config is unknown."""


def as_trained(cfg: SamplerConfig, objective: dict | None) -> SamplerConfig:
    """`cfg` with each `AS_TRAINED` field left at None set to the training objective's value (`objective`: the
    model config's `objective` mapping; None or a missing key: the paper's value)."""
    objective = objective or {}
    return replace(cfg, **{name: objective.get(name, default) for name, default in AS_TRAINED.items()
                           if getattr(cfg, name) is None})


HEADLINE_SAMPLERS = {
    "lm": SamplerConfig(kind="sde", steps=32, gamma=1.5, guidance=3.0),
    "seq2seq": SamplerConfig(kind="ode", steps=64, guidance=1.0, cfg_scale=2.0),
}
"""The paper's headline setting per task (elf-method §7): what a model samples with unless told otherwise."""


# ---------------------------------------------------------------------------------------------------------
# §7 Time grids: T + 1 increasing times from 0 (noise) to 1 (data)
# ---------------------------------------------------------------------------------------------------------


def logit_normal_grid(steps: int, generator: torch.Generator, mean: float = -1.5, std: float = 0.8) -> Tensor:
    """§7: T − 1 sorted draws of sigmoid(N(mean, std²)) between the endpoints 0 and 1 (small steps near noise).

    Random per batch, hence the generator: a seed fixes the grid.
    """
    if steps < 1:
        raise ElfError(f"sampler.steps: must be >= 1, got {steps}")
    device = generator.device
    inner = torch.sigmoid(mean + std * torch.randn(steps - 1, generator=generator, device=device))
    ends = torch.tensor([0.0], device=device), torch.tensor([1.0], device=device)
    return torch.cat([ends[0], inner.sort().values, ends[1]])


def uniform_grid(steps: int, device: torch.device | str = "cpu") -> Tensor:
    """The uniform alternative: t_i = i / T."""
    if steps < 1:
        raise ElfError(f"sampler.steps: must be >= 1, got {steps}")
    return torch.linspace(0.0, 1.0, steps + 1, device=device)


def time_grid(cfg: SamplerConfig, generator: torch.Generator) -> Tensor:
    if cfg.grid == "uniform":
        return uniform_grid(cfg.steps, generator.device)
    return logit_normal_grid(cfg.steps, generator, cfg.grid_mean, cfg.grid_std)


# ---------------------------------------------------------------------------------------------------------
# The network as a denoiser
# ---------------------------------------------------------------------------------------------------------


def model_denoiser(model: torch.nn.Module) -> Denoiser:
    """An ELF network in denoise mode (decode_mask False, no logits, no grad) as a `Denoiser`."""

    @torch.no_grad()
    def denoise(z: Tensor, x_prev: Tensor, t: Tensor, w: Tensor) -> Tensor:
        denoise_rows = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        x_hat, _ = model(z, x_prev, t, w, denoise_rows, return_logits=False)
        return x_hat.float()

    return denoise


# ---------------------------------------------------------------------------------------------------------
# §6/§7 The sampler
# ---------------------------------------------------------------------------------------------------------


def _check_source(shape: tuple[int, int, int], source: Tensor | None, source_mask: Tensor | None) -> None:
    if (source is None) != (source_mask is None):
        raise ElfError("sampler: source and source_mask must be given together")
    if source is not None and (tuple(source.shape) != tuple(shape) or tuple(source_mask.shape) != tuple(shape[:2])):
        raise ElfError(
            f"sampler: source {tuple(source.shape)} / source_mask {tuple(source_mask.shape)} "
            f"do not match the sample shape {tuple(shape)}"
        )


def _predict(denoiser: Denoiser, z: Tensor, x_prev: Tensor, t: float | Tensor, cfg: SamplerConfig,
             source_mask: Tensor | None) -> Tensor:
    """x̂ for one step: one pass, or with input-CFG (§6) x̂_u + ω(x̂_c − x̂_u).

    The conditional pass sees z and x̂_prev with the clean source in place (authors' code; the trainer feeds
    self-conditioning that way). The unconditional pass sees the source positions of z and of x̂_prev zeroed,
    as in the condition-dropped training rows.
    """
    b = z.shape[0]
    t_rows = torch.as_tensor(t, dtype=torch.float32, device=z.device).expand(b)
    w_rows = torch.full((b,), float(cfg.guidance), device=z.device)
    x_cond = denoiser(z, x_prev, t_rows, w_rows)
    if not cfg.uses_input_cfg(source_mask is not None):
        return x_cond
    hide = source_mask[..., None]
    x_uncond = denoiser(z.masked_fill(hide, 0.0), x_prev.masked_fill(hide, 0.0), t_rows, w_rows)
    return x_uncond + cfg.cfg_scale * (x_cond - x_uncond)


def sample_embeddings(
    denoiser: Denoiser,
    shape: tuple[int, int, int],
    cfg: SamplerConfig,
    generator: torch.Generator,
    source: Tensor | None = None,
    source_mask: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Integrate from the prior (t = 0) to data (t = 1); returns (z_final [B, L, d], network evaluations).

    §7, step t → t' of the grid (the last interval is always the ODE step):
      ODE: x̂ = net([z, x̂_prev], t, w); v = (x̂ − z)/max(1 − t, 0.05); z ← z + (t' − t)·v.
      SDE: α = clip(1 − γ(t' − t), 0, 1); t_b = α·t; z_b = α·z + (1 − α)·s·ε' (source restored);
           x̂ = net([z_b, x̂_prev], t_b, w); v = (x̂ − z_b)/max(1 − t_b, 0.05); z ← z_b + (t' − t_b)·v.
    Then x̂_prev ← x̂ (the guided x̂ when input-CFG is on). Conditional rows: the clean source is restored
    in z and in x̂_prev after every step, and x̂_prev starts as [clean source ; 0] (authors' code).
    The evaluation count includes the decode pass the caller runs next (`decode_tokens`).
    """
    _check_source(shape, source, source_mask)
    device = generator.device
    cfg = as_trained(cfg, None)  # still None (a bare network, no config to read): the paper's value
    s = cfg.noise_scale
    if source is not None:
        source = source.to(device=device, dtype=torch.float32)
        source_mask = source_mask.to(device=device, dtype=torch.bool)
        keep_source = source_mask[..., None]

    def restore(z: Tensor) -> Tensor:
        return z if source is None else torch.where(keep_source, source, z)

    z = restore(s * torch.randn(shape, generator=generator, device=device))  # §7 prior z₀ = s·N(0, I)
    x_prev = restore(torch.zeros(shape, device=device))
    grid = time_grid(cfg, generator).tolist()
    for i in range(cfg.steps):
        t, t_next = grid[i], grid[i + 1]
        if cfg.kind == "sde" and i < cfg.steps - 1:
            alpha = min(max(1.0 - cfg.gamma * (t_next - t), 0.0), 1.0)
            t_b = alpha * t
            noise = torch.randn(shape, generator=generator, device=device)
            z_b = restore(alpha * z + (1.0 - alpha) * s * noise)
        else:
            t_b, z_b = t, z
        x_hat = _predict(denoiser, z_b, x_prev, t_b, cfg, source_mask)
        v = (x_hat - z_b) / max(1.0 - t_b, cfg.min_denom)  # §3 x-prediction → velocity
        z = restore(z_b + (t_next - t_b) * v)
        x_prev = restore(x_hat)
    return z, cfg.network_evaluations(conditional=source is not None)


# ---------------------------------------------------------------------------------------------------------
# §4/§7 Decode pass and text
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def decode_tokens(model: torch.nn.Module, z: Tensor, guidance: float, source_mask: Tensor | None = None) -> Tensor:
    """§4: one decode pass at t = 1 (decode mode, self-conditioning zeros), argmax → ids [B, L] (long).

    `guidance` is the sampler's SC-CFG scale w, fed to the guidance tokens as in the authors' code (decode
    rows are trained with random w). The self-conditioning input is 0 everywhere, source positions included,
    as in the authors' decode pass and decode training rows. Source positions (conditional rows) are set to
    PAD_ID: they were given, not generated, and PAD is dropped on decoding.
    """
    b = z.shape[0]
    ones = torch.ones(b, device=z.device)
    w = torch.full((b,), float(guidance), device=z.device)
    _, logits = model(z, torch.zeros_like(z), ones, w, torch.ones(b, dtype=torch.bool, device=z.device),
                      return_logits=True)
    ids = logits.argmax(dim=-1)
    if source_mask is not None:
        ids = ids.masked_fill(source_mask.to(device=ids.device, dtype=torch.bool), PAD_ID)
    return ids


def ids_to_texts(ids: Tensor | Sequence[Sequence[int]], tokenizer, start: int | Sequence[int] | Tensor = 0,
                 max_tokens: int | None = None, eos_id: int = EOS_ID) -> list[str]:
    """Generated text of each row: at most `max_tokens` ids from `start` (per row: after the source), cut at the
    first EOS (§4), decoded with skip_special_tokens.

    Conditional tasks cap the output at max_length − max_input_length tokens after the source (§7; 64 for
    WMT14 and XSum, as the authors' code does), whatever the source's length.
    """
    rows = ids.tolist() if isinstance(ids, Tensor) else [list(row) for row in ids]
    starts = start.tolist() if isinstance(start, Tensor) else start
    starts = [starts] * len(rows) if isinstance(starts, int) else list(starts)
    if len(starts) != len(rows):
        raise ElfError(f"ids_to_texts: {len(starts)} start positions for {len(rows)} rows")
    texts = []
    for row, first in zip(rows, starts, strict=True):
        generated = row[int(first):][:max_tokens]
        if eos_id in generated:
            generated = generated[: generated.index(eos_id)]
        texts.append(tokenizer.decode(generated, skip_special_tokens=True))
    return texts


def conditional_texts(ids: Tensor, tokenizer, source_mask: Tensor, max_length: int, max_input_length: int) -> list[str]:
    """§7, conditional tasks: each row's text is the first max_length − max_input_length tokens after its source
    (64 for WMT14 and XSum, as the authors' code does), cut at the first EOS. ids [N, L], source_mask [N, L]."""
    return ids_to_texts(ids, tokenizer, start=source_starts(source_mask), max_tokens=max_length - max_input_length)


def source_starts(source_mask: Tensor) -> Tensor:
    """Where each row's generated region begins: the source is a prefix (elf.data.layout), so its length."""
    return source_mask.to(torch.bool).sum(dim=1)


# ---------------------------------------------------------------------------------------------------------
# Convenience: many samples in batches
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    ids: Tensor  # [N, L] long on the CPU (source positions PAD_ID)
    nfe: int  # network evaluations per sample, decode pass included
    seconds: float  # wall time of sampling and decoding


def generate(
    model: torch.nn.Module,
    encoder_dim: int,
    length: int,
    batch: int,
    cfg: SamplerConfig,
    seed: int,
    device: torch.device | str,
    num_samples: int | None = None,
    source: Tensor | None = None,
    source_mask: Tensor | None = None,
    progress: bool = True,
) -> Generation:
    """Sample `num_samples` rows of `length` tokens in batches of `batch` and decode them to ids.

    num_samples defaults to len(source) for a conditional task (source [N, L, d], source_mask [N, L]) and to
    `batch` otherwise. One generator seeded with `seed` serves all batches in order, so a result is
    reproducible for the same (seed, batch, device); a different batch size gives different samples.
    """
    from tqdm.auto import tqdm

    if cfg.family != "elf":
        raise ElfError(f"generate: sampler kind {cfg.kind!r} samples {cfg.family} models (elf.families.generate)")
    if encoder_dim != model.cfg.embed_dim:
        raise ElfError(f"generate: encoder_dim {encoder_dim} does not match the model's embed_dim "
                       f"{model.cfg.embed_dim}")
    if batch < 1:
        raise ElfError(f"sampler.batch_size: must be >= 1, got {batch}")
    if num_samples is None:
        num_samples = len(source) if source is not None else batch
    _check_source((num_samples, length, encoder_dim), source, source_mask)
    generator = torch.Generator(device).manual_seed(seed)
    denoiser = model_denoiser(model)
    outputs, nfe = [], cfg.network_evaluations(conditional=source is not None)
    began = time.perf_counter()
    with tqdm(total=num_samples, desc=f"sampling ({cfg.kind}, {cfg.steps} steps)", unit="sample",
              disable=not (progress and on_terminal())) as bar:
        for first in range(0, num_samples, batch):
            rows = slice(first, min(first + batch, num_samples))
            src = None if source is None else source[rows].to(device)
            mask = None if source_mask is None else source_mask[rows].to(device)
            n = rows.stop - rows.start
            with autocast(device):  # bf16 on GPUs (§8: the model keeps its projections and heads in fp32)
                z, _ = sample_embeddings(denoiser, (n, length, encoder_dim), cfg, generator, src, mask)
                if not bool(torch.isfinite(z).all()):  # would decode to arbitrary ids, silently
                    raise ElfError(f"sampling ({cfg.kind}, {cfg.steps} steps): the model produced non-finite "
                                   "embeddings (a diverged or corrupt model?)")
                outputs.append(decode_tokens(model, z, cfg.guidance, mask).cpu())
            bar.update(n)
    return Generation(torch.cat(outputs), nfe, time.perf_counter() - began)

"""The flow-matching math of ELF (elf-method.md §3, §4, §6), one function per equation, and the training loss.

Conventions: t = 0 is noise, t = 1 is data; x [B, L, d] are the normalised clean embeddings, ε ~ N(0, I) and
s the noise scale (2). Per-sequence scalars (t, w, m) are [B] tensors and broadcast over [L, d].

Randomness: `draw_noise` takes a `torch.Generator` and draws on that generator's device, in a fixed order
that does not depend on the data; `draw_noise_per_row` (what training uses) gives every row its own
counter-based stream keyed by a seed (elf/rng.py), so a row's draws depend on its seed alone. Either way a run is
reproducible draw for draw and resumable exactly. The results are moved to the data's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from elf import rng

# ---------------------------------------------------------------------------------------------------------
# Random draws
# ---------------------------------------------------------------------------------------------------------


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device)


def _rand(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device)


def _per_row(value: Tensor, like: Tensor) -> Tensor:
    """[B] → [B, 1, ..., 1] to broadcast a per-sequence scalar over the token and channel axes of `like`."""
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def logit_normal(normal: Tensor, mean: float, std: float) -> Tensor:
    """sigmoid(mean + std·n) of standard normals n: the logit-normal draws of §3 (t) and §4 (p)."""
    return torch.sigmoid(mean + std * normal)


def log_uniform_guidance(uniform: Tensor, low: float = 1.5, high: float = 6.0) -> Tensor:
    """§6: log(1 + w) ~ Uniform[log low, log high] from uniforms on (0, 1): w ∈ [0.5, 5], median √(1.5·6) − 1 = 2."""
    log_low, log_high = math.log(low), math.log(high)
    return torch.exp(log_low + (log_high - log_low) * uniform) - 1.0


def sample_time(n: int, generator: torch.Generator, mean: float = -1.5, std: float = 0.8) -> Tensor:
    """§3: t = sigmoid(u), u ~ N(mean, std²), one t per sequence (median sigmoid(−1.5) ≈ 0.18: mostly noisy)."""
    return logit_normal(_randn((n,), generator), mean, std)


def sample_guidance_scale(n: int, generator: torch.Generator, low: float = 1.5, high: float = 6.0) -> Tensor:
    """§6: the SC-CFG scale w per sequence (`log_uniform_guidance`)."""
    return log_uniform_guidance(_rand((n,), generator), low, high)


def sample_decode_keep(
    shape: tuple[int, ...], generator: torch.Generator, mean: float = 0.8, std: float = 0.8
) -> Tensor:
    """§4: the per-token signal fraction p = sigmoid(N(mean, std²)) of the decode corruption (mean ≈ 0.67)."""
    return logit_normal(_randn(shape, generator), mean, std)


def sample_condition_dropped(n: int, generator: torch.Generator, prob: float = 0.1) -> Tensor:
    """§2: which rows drop their condition (for input-CFG). Drawn upstream of the encoder, which must see it."""
    return _rand((n,), generator) < prob


# ---------------------------------------------------------------------------------------------------------
# §3 Flow matching: path, velocity, x-prediction → velocity
# ---------------------------------------------------------------------------------------------------------


def noise_path(x: Tensor, eps: Tensor, t: Tensor, noise_scale: float = 2.0) -> Tensor:
    """§3: z_t = t·x + (1 − t)·s·ε."""
    t = _per_row(t, x)
    return t * x + (1.0 - t) * noise_scale * eps


def velocity_target(x: Tensor, eps: Tensor, noise_scale: float = 2.0) -> Tensor:
    """§3: v = dz_t/dt = x − s·ε."""
    return x - noise_scale * eps


def x_to_v(x_hat: Tensor, z: Tensor, t: Tensor, min_denom: float = 0.05) -> Tensor:
    """§3: v̂ = (x̂ − z_t) / max(1 − t, 0.05) — the network predicts x, the loss and the sampler use v."""
    return (x_hat - z) / _per_row(torch.clamp(1.0 - t, min=min_denom), z)


# ---------------------------------------------------------------------------------------------------------
# §4 Decode-mode input
# ---------------------------------------------------------------------------------------------------------


def decode_corruption(x: Tensor, eps: Tensor, keep: Tensor, noise_scale: float = 5.0) -> Tensor:
    """§4: z̃ = p·x + (1 − p)·s_dec·ε with p = `keep` per token ([B, L]); s_dec 5 for OWT, 1 for WMT/XSum."""
    p = keep[..., None]
    return p * x + (1.0 - p) * noise_scale * eps


# ---------------------------------------------------------------------------------------------------------
# §6 Self-conditioning CFG target
# ---------------------------------------------------------------------------------------------------------


def sc_cfg_target(v_true: Tensor, v_a: Tensor, v_b: Tensor, m: Tensor, w: Tensor) -> Tensor:
    """§6: v_target = v_true + m·(1 − 1/w)·(v_B − v_A), with m ∈ {0, 1} and w per row (stop-gradient)."""
    scale = m.to(v_true.dtype) * (1.0 - 1.0 / w)
    return v_true + _per_row(scale, v_true) * (v_b - v_a)


# ---------------------------------------------------------------------------------------------------------
# The training objective (§3 + §4 + §6)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ObjectiveConfig:
    """Every constant of the training objective; defaults are the paper's (OWT: decode_noise_scale 5)."""

    time_mean: float = -1.5  # §3 logit-normal time
    time_std: float = 0.8
    noise_scale: float = 2.0  # §2/§3 s
    min_denom: float = 0.05  # §3 max(1 − t, 0.05)
    decode_prob: float = 0.2  # §4 share of decode rows
    decode_noise_scale: float = 5.0  # §4 s_dec: 5 for OWT, 1 for WMT14/XSum
    decode_keep_mean: float = 0.8  # §4 p = sigmoid(N(0.8, 0.8²)) per token
    decode_keep_std: float = 0.8
    self_cond_prob: float = 0.5  # §6 m ~ Bernoulli(0.5)
    guidance_low: float = 1.5  # §6 log(1 + w) ~ U[log 1.5, log 6]
    guidance_high: float = 6.0
    condition_dropout: float = 0.1  # §2 input-CFG; applied upstream (see `sample_condition_dropped`)


Model = Callable[..., tuple[Tensor, Tensor | None]]
NOISE_KEYS = ("is_decode", "t", "m", "w", "eps", "keep")


def draw_noise(n: int, length: int, dim: int, cfg: ObjectiveConfig, generator: torch.Generator) -> dict[str, Tensor]:
    """Every random quantity of one training step for n rows, drawn in a fixed order from `generator`."""
    g = generator
    return {
        "is_decode": _rand((n,), g) < cfg.decode_prob,  # §4 decode row or §3 denoise row
        "t": sample_time(n, g, cfg.time_mean, cfg.time_std),
        "m": _rand((n,), g) < cfg.self_cond_prob,  # §6 self-conditioning coin
        "w": sample_guidance_scale(n, g, cfg.guidance_low, cfg.guidance_high),
        "eps": _randn((n, length, dim), g),
        "keep": sample_decode_keep((n, length), g, cfg.decode_keep_mean, cfg.decode_keep_std),
    }


def draw_noise_per_row(seeds: list[int], length: int, dim: int, cfg: ObjectiveConfig,
                       device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The draws of `draw_noise`, each row from its own counter-based stream (elf/rng.py) keyed by its seed,
    which the trainer derives from (step, row of the global batch); all rows in one batched call on `device`.

    A row's noise then depends only on its seed, not on which rank or micro-batch it lands in: training with
    any world size or gradient accumulation sees the same draws, and a resumed step repeats them exactly.
    """
    def stream(index: int) -> Tensor:
        return rng.stream_keys(seeds, index, device)

    coins = rng.uniform(stream(0), 3)  # decode row?, self-conditioning?, guidance scale
    n = len(seeds)
    return {
        "is_decode": coins[:, 0] < cfg.decode_prob,  # §4 decode row or §3 denoise row
        "t": logit_normal(rng.normal(stream(1), 1)[:, 0], cfg.time_mean, cfg.time_std),
        "m": coins[:, 1] < cfg.self_cond_prob,  # §6 self-conditioning coin
        "w": log_uniform_guidance(coins[:, 2], cfg.guidance_low, cfg.guidance_high),
        "eps": rng.normal(stream(2), length * dim).view(n, length, dim),
        "keep": logit_normal(rng.normal(stream(3), length), cfg.decode_keep_mean, cfg.decode_keep_std),
    }


def elf_loss(
    model: Model,
    x: Tensor,
    loss_mask: Tensor,
    source_mask: Tensor,
    cond_dropped: Tensor,
    tokens: Tensor,
    cfg: ObjectiveConfig,
    generator: torch.Generator | None = None,
    draws: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The whole ELF training loss for one batch.

    x [B, L, d] clean embeddings; loss_mask [B, L] bool (LM: non-pad; conditional: every non-source position);
    source_mask [B, L] bool (all False for unconditional); cond_dropped [B] bool; tokens [B, L] target ids.

    Each row is a decode row (prob. 0.2) or a denoise row. Denoise rows follow §3/§6: t, ε, z_t, the
    self-conditioning coin m and the guidance scale w; no-grad pass A ([z, 0]) and pass B ([z, x̂_A]) give the
    SC-CFG target; the gradient pass sees [z, m·x̂_A] (source positions of c: the clean source, see below).
    Decode rows follow §4: t = 1, decode mode, c = 0 and the per-token corrupted input. Both kinds share one
    gradient forward. Loss = (Σ CE over decode-row loss
    tokens + Σ channel-mean squared velocity error over denoise-row loss tokens) / #loss tokens in the batch.

    Conditional rows (§2, §5, §6): the clean source stays in place in z and in the decode input, never
    noised, and out of the loss; the self-conditioning input of denoise rows holds the clean source at the
    source positions in passes A, B and the gradient pass (authors' code; the sampler does the same); rows
    with `cond_dropped` have their source set to 0 in x, z and c.

    Choices made here (same math as the paper's batched version, less compute):
    - Passes A and B run only on the rows that use them (denoise rows with m = 1): for m = 0 the target is
      v_true and c holds no x̂_A (only the clean source, if any), so their A/B results would be multiplied
      by 0. They are always called (possibly on 0 rows) so wrappers that expect one call sequence per rank
      see the same calls.
    - Decode rows reuse the row's ε (a row is never both kinds, so the draws stay independent) and get the
      row's sampled w as guidance input, so the decode head learns to ignore w whatever the sampler passes.
    The random draws come from `draws` (see `draw_noise_per_row`) or, when None, from `generator`.
    Returns (loss, stats); stats are detached 0-dim tensors (mse, ce, acc per token; counts), so logging them
    costs no device sync until read.
    """
    x = x.float()  # cached embeddings may be fp16; the flow math runs in fp32
    b, length, d = x.shape
    device = x.device
    source_mask = source_mask.to(torch.bool)
    cond_dropped = cond_dropped.to(torch.bool)
    loss_mask = loss_mask.to(torch.bool) & ~source_mask

    if draws is None:
        draws = draw_noise(b, length, d, cfg, generator)
    is_decode, t, m, w, eps, keep = (draws[k].to(device) for k in NOISE_KEYS)

    # §2 condition dropout: the dropped rows' source embeddings are 0 everywhere (x, z, c).
    dropped_source = source_mask & cond_dropped[:, None]
    x = x.masked_fill(dropped_source[..., None], 0.0)
    source = source_mask[..., None]

    # §3 denoise input and target velocity; §4 decode input. Source positions hold the clean source.
    z_t = torch.where(source, x, noise_path(x, eps, t, cfg.noise_scale))
    z_dec = torch.where(source, x, decode_corruption(x, eps, keep, cfg.decode_noise_scale))
    v_target = velocity_target(x, eps, cfg.noise_scale)

    # §5/§6 self-conditioning input c: the clean source at source positions (0 where the condition is
    # dropped, as x is there), else 0 (pass A, m = 0) or x̂_A (pass B, m = 1).
    self_cond = torch.where(source, x, torch.zeros_like(x))

    # §6 self-conditioning CFG: passes A and B (no grad) on the denoise rows with m = 1.
    sc_rows = (~is_decode & m).nonzero().squeeze(1)
    with torch.no_grad():
        z_sc, t_sc, w_sc, source_sc = z_t[sc_rows], t[sc_rows], w[sc_rows], source[sc_rows]
        no_decode = torch.zeros(len(sc_rows), dtype=torch.bool, device=device)
        x_hat_a, _ = model(z_sc, self_cond[sc_rows], t_sc, w_sc, no_decode, return_logits=False)
        x_hat_a = x_hat_a.float()
        c_sc = torch.where(source_sc, x[sc_rows], x_hat_a)
        x_hat_b, _ = model(z_sc, c_sc, t_sc, w_sc, no_decode, return_logits=False)
        v_a = x_to_v(x_hat_a, z_sc, t_sc, cfg.min_denom)
        v_b = x_to_v(x_hat_b.float(), z_sc, t_sc, cfg.min_denom)
        v_target[sc_rows] = sc_cfg_target(v_target[sc_rows], v_a, v_b, m[sc_rows], w_sc)
        self_cond[sc_rows] = c_sc

    # One gradient forward for both kinds of rows. Decode rows get c = 0 everywhere (§4, authors' code).
    row_decode = is_decode[:, None, None]
    self_cond = self_cond.masked_fill(row_decode, 0.0)
    z_in = torch.where(row_decode, z_dec, z_t)
    t_in = torch.where(is_decode, torch.ones_like(t), t)
    # return_logits=True even with no decode row: the decode head then stays in the graph (0 gradient), so
    # DDP needs no find_unused_parameters.
    x_hat, logits = model(z_in, self_cond, t_in, w, is_decode, return_logits=True)

    # §3 denoise loss: channel-mean squared velocity error, summed over denoise-row loss tokens.
    denoise_tokens = loss_mask & ~is_decode[:, None]
    v_hat = x_to_v(x_hat.float(), z_t, t, cfg.min_denom)
    sq_err = (v_hat - v_target).pow(2).mean(dim=-1)
    mse_sum = sq_err[denoise_tokens].sum()

    # §4 decode loss: token cross-entropy, summed over decode-row loss tokens.
    decode_tokens = loss_mask[is_decode]
    selected = logits[decode_tokens].float()
    targets = tokens[is_decode][decode_tokens]
    ce_sum = F.cross_entropy(selected, targets, reduction="sum")  # 0 (still in the graph) with no decode rows
    correct = (selected.argmax(-1) == targets).sum()

    n_loss = loss_mask.sum()
    loss = (ce_sum + mse_sum) / n_loss.clamp(min=1)

    n_denoise, n_decode = denoise_tokens.sum(), decode_tokens.sum()
    stats = {
        "mse": (mse_sum / n_denoise.clamp(min=1)).detach(),
        "ce": (ce_sum / n_decode.clamp(min=1)).detach(),
        "acc": (correct / n_decode.clamp(min=1)).detach(),
        "denoise_tokens": n_denoise,
        "decode_tokens": n_decode,
        "loss_tokens": n_loss,
        "denoise_rows": (~is_decode).sum(),
        "decode_rows": is_decode.sum(),
        "self_cond_rows": torch.tensor(len(sc_rows), device=device),
    }
    return loss, stats

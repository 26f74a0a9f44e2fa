"""MDLM: masked (absorbing-state) discrete diffusion (Sahoo et al. 2024, "Simple and Effective Masked Diffusion
Language Models"), the discrete baseline of the comparison (`train.*.family: mdlm`).

Forward process (log-linear schedule): α_t = 1 − t, t ∈ [0, 1]; each token of x is independently replaced by
[MASK] with probability 1 − α_t = t. t = 1 is all mask, t = 0 is data (the reverse of ELF's convention, as in
the MDLM paper). Source positions of a conditional row are never masked.

SUBS parameterisation (MDLM §3.2): the network's distribution x_θ(z_t) puts zero mass on [MASK] (the head has
no [MASK] row: its logit is −∞) and copies every unmasked token of z_t (carry-over).

Loss, the continuous-time ELBO (MDLM eq. 10) with the log-linear schedule:
    L = E_t [ −α'_t / (1 − α_t) · Σ_{masked ℓ} −log x_θ(z_t)_ℓ[x_ℓ] ] = E_t [ (1/t) · Σ_{masked ℓ} CE_ℓ ]
normalised, as the trainer does for ELF, by the number of loss tokens; t ~ U[ε, 1] per row (ε = 1e-3).

Sampler (MDLM §4.1, ancestral "DDPM" updates) with T steps on the grid t_i = 1 − i·(1 − ε)/T: from t to s < t,
a masked position becomes token v with probability x_θ(z_t)[v]·(t − s)/t and stays masked with s/t; an
unmasked one never changes. The categorical is sampled in float64 with the Gumbel-max trick (as the Duo code
does: float32 Gumbel noise biases low-probability tokens). Caching (MDLM §4.1): for a network without time input
(`time_conditioning: false`), a step that unmasks nothing leaves the network's input unchanged, so the next step
reuses the last x_θ instead of calling the network (exact; at most one call per unmasking step, ≤ L + 1 in all).
A time-conditioned network is called every step, as MDLM's code does. A final step fills any position still
masked with its argmax (MDLM's `noise_removal`). Network evaluations are counted as the calls actually made.
"""

from __future__ import annotations

import torch
from torch import Tensor

from elf import rng

TIME_EPS = 1e-3
"""The smallest t drawn in training and the last time of the sampling grid (MDLM's `sampling_eps`)."""


def draw_mask_per_row(seeds: list[int], length: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Per-row counter-based draws (elf/rng.py), as ELF's `draw_noise_per_row`: t [B] ~ U[ε, 1] and uniforms
    u [B, L] (position ℓ is masked iff u_ℓ < t)."""
    t = TIME_EPS + (1.0 - TIME_EPS) * rng.uniform(rng.stream_keys(seeds, 0, device), 1)[:, 0]
    return {"t": t, "u": rng.uniform(rng.stream_keys(seeds, 1, device), length)}


def mask_tokens(ids: Tensor, t: Tensor, u: Tensor, source_mask: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """z_t and the masked positions: ids [B, L], t [B], u [B, L] uniforms, source_mask [B, L] (never masked)."""
    masked = (u < t[:, None]) & ~source_mask
    return torch.where(masked, torch.full_like(ids, mask_id), ids), masked


def subs_log_probs(logits: Tensor, z_t: Tensor, mask_id: int) -> Tensor:
    """SUBS (MDLM §3.2): log x_θ(z_t) over the V + 1 classes [tokens ; MASK], [B, L, V + 1] fp32.

    logits [B, L, V]: the network's output; the [MASK] class gets logit −∞ (zero mass); an unmasked position
    of z_t gets log prob 0 on its own token and −∞ elsewhere (carry-over).
    """
    logits = logits.float()
    full = torch.cat([logits, torch.full_like(logits[..., :1], float("-inf"))], dim=-1)
    log_probs = full.log_softmax(-1)
    unmasked = (z_t != mask_id)[..., None]
    carry = torch.full_like(log_probs, float("-inf")).scatter(-1, z_t[..., None], 0.0)
    return torch.where(unmasked, carry, log_probs)


def elbo_weight(t: Tensor) -> Tensor:
    """−α'_t / (1 − α_t) of the log-linear schedule α_t = 1 − t: 1 / t (MDLM eq. 10)."""
    return 1.0 / t


def mdlm_row_terms(network, ids: Tensor, loss_mask: Tensor, source_mask: Tensor, t: Tensor, u: Tensor,
                   mask_id: int) -> dict[str, Tensor]:
    """Per row [B] of one corruption (t [B], u [B, L]): `elbo` = (1/t)·Σ CE over the masked loss tokens, `nll` =
    that Σ CE unweighted, `correct` = masked loss tokens predicted right, `masked` = their count, `tokens` = the
    row's loss tokens (lm: real tokens; seq2seq: every target position, EOS padding included, as ELF).

    Every non-source position is corrupted (pads too: the sampler starts from an all-mask row); only masked loss
    tokens are scored (SUBS gives the others zero loss). The training loss and the validation loss share this.
    """
    loss_mask = loss_mask & ~source_mask
    z_t, masked = mask_tokens(ids, t, u, source_mask, mask_id)
    log_probs = subs_log_probs(network(z_t, t), z_t, mask_id)
    scored = loss_mask & masked
    nll = torch.where(scored, -log_probs.gather(-1, ids[..., None])[..., 0], torch.zeros_like(t[:, None]))
    return {"elbo": elbo_weight(t) * nll.sum(1), "nll": nll.sum(1),
            "correct": ((log_probs.argmax(-1) == ids) & scored).sum(1), "masked": scored.sum(1),
            "tokens": loss_mask.sum(1)}


def mdlm_loss(network, ids: Tensor, loss_mask: Tensor, source_mask: Tensor, draws: dict[str, Tensor],
              mask_id: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The MDLM ELBO per loss token of this batch (module docstring) and the trainer's statistics.

    ids [B, L] clean tokens; loss_mask, source_mask [B, L]; draws from `draw_mask_per_row`. Returns (loss,
    stats) with the keys ELF's loss returns (mse 0: there is no denoising regression).
    """
    terms = mdlm_row_terms(network, ids, loss_mask, source_mask, draws["t"], draws["u"], mask_id)
    n, n_masked = terms["tokens"].sum(), terms["masked"].sum()
    zero = torch.zeros((), device=ids.device)
    per_masked = n_masked.clamp(min=1)
    return terms["elbo"].sum() / n.clamp(min=1), {
        "loss_tokens": n, "mse": zero, "denoise_tokens": zero.long(), "decode_tokens": n_masked,
        "ce": terms["nll"].detach().sum() / per_masked, "acc": terms["correct"].sum() / per_masked}


def sample_categorical(probs: Tensor, generator: torch.Generator) -> Tensor:
    """argmax(p / Gumbel) in float64 (Duo's `_sample_categorical`): one draw per row of probs [..., K]."""
    u = torch.rand(probs.shape, generator=generator, device=generator.device, dtype=torch.float64)
    gumbel = 1e-10 - (u + 1e-10).log()
    return (probs.double().to(u.device) / gumbel).argmax(-1)


@torch.no_grad()
def mdlm_sample(network, shape: tuple[int, int], steps: int, generator: torch.Generator,
                source_ids: Tensor | None = None, source_mask: Tensor | None = None) -> tuple[Tensor, int]:
    """Ancestral sampling with `steps` updates (module docstring) → (ids [B, L] long, network evaluations).

    source_ids / source_mask [B, L] (conditional rows): those positions hold the source from the start and are
    never changed. Draws come from `generator`, in step order, so a seed reproduces a batch.
    """
    from elf.runtime import autocast

    device = generator.device
    mask_id = network.cfg.mask_id
    caching = not network.cfg.num_prefix  # exact only when the network does not see t (module docstring)
    z = torch.full(shape, mask_id, dtype=torch.long, device=device)
    if source_ids is not None:
        z = torch.where(source_mask.to(device), source_ids.to(device), z)
    grid = torch.linspace(1.0, TIME_EPS, steps + 1).tolist()
    probs, calls = None, 0

    def predict(t: float) -> Tensor:
        with autocast(device):
            logits = network(z, torch.full((shape[0],), t, device=device))
        return subs_log_probs(logits, z, mask_id).double().exp()

    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        if probs is None:
            probs, calls = predict(t), calls + 1
        q = probs * ((t - s) / t)
        q[..., mask_id] = s / t
        proposal = sample_categorical(q, generator)
        update = torch.where(z == mask_id, proposal, z)  # carry-over: unmasked tokens never change
        if not (caching and torch.equal(update, z)):
            probs = None  # something changed: the next step needs a fresh prediction
        z = update
    still = z == mask_id
    if bool(still.any()):  # MDLM's noise removal: the last masks take their most likely token
        if probs is None:
            probs, calls = predict(grid[-1]), calls + 1
        z = torch.where(still, probs[..., :mask_id].argmax(-1), z)
    return z, calls

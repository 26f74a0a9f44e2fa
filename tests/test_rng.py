"""Counter-based per-row random streams (elf/rng.py) and the training draws built on them."""

import math

import torch

from elf import rng
from elf.flow import ObjectiveConfig, draw_noise_per_row


def test_normals_have_the_moments_and_tails_of_a_standard_normal():
    z = rng.normal(rng.stream_keys(list(range(64)), 0), 50_001)
    assert z.shape == (64, 50_001) and z.dtype == torch.float32
    assert abs(z.mean().item()) < 3e-3 and abs(z.std().item() - 1.0) < 3e-3
    assert abs((z.abs() > 3).float().mean().item() - 0.0027) < 3e-4  # two-sided 3σ tail
    assert abs((z ** 4).mean().item() - 3.0) < 0.05  # kurtosis


def test_uniforms_fill_the_open_unit_interval_evenly():
    u = rng.uniform(rng.stream_keys(list(range(16)), 5), 100_000)
    assert 0.0 < u.min().item() and u.max().item() < 1.0
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    assert (counts / u.numel() - 0.05).abs().max().item() < 2e-3


def test_rows_and_streams_are_uncorrelated():
    keys = rng.stream_keys(list(range(100, 110)), 0)  # consecutive seeds, as the trainer makes them
    z = rng.normal(keys, 20_000)
    corr = torch.corrcoef(z) - torch.eye(10)
    assert corr.abs().max().item() < 0.04  # 1/√20000 ≈ 0.007 is one SE: 0.04 is ≈ 5.7 SE
    other = rng.normal(rng.stream_keys(list(range(100, 110)), 1), 20_000)
    assert (z * other).mean(dim=1).abs().max().item() < 0.04


def test_a_rows_draws_do_not_depend_on_the_rest_of_the_batch():
    """What makes DDP and gradient accumulation see the draws of one process."""
    cfg = ObjectiveConfig()
    whole = draw_noise_per_row([11, 12, 13, 14], 5, 3, cfg)
    halves = [draw_noise_per_row(seeds, 5, 3, cfg) for seeds in ([11, 12], [13, 14])]
    for key, value in whole.items():
        assert torch.equal(value, torch.cat([h[key] for h in halves])), key
    assert torch.equal(draw_noise_per_row([11], 5, 3, cfg)["eps"], whole["eps"][:1])
    assert not torch.equal(draw_noise_per_row([15], 5, 3, cfg)["eps"], whole["eps"][:1])


def test_training_draws_follow_the_method_distributions():
    cfg = ObjectiveConfig()
    draws = draw_noise_per_row(list(range(20_000)), 4, 2, cfg)
    assert abs(draws["is_decode"].float().mean().item() - 0.2) < 0.01  # §4
    assert abs(draws["m"].float().mean().item() - 0.5) < 0.015  # §6
    assert abs(draws["t"].median().item() - 1 / (1 + math.exp(1.5))) < 0.01  # §3: sigmoid(−1.5) ≈ 0.18
    assert abs(draws["w"].median().item() - 2.0) < 0.05 and 0.5 <= draws["w"].min() < draws["w"].max() <= 5.0
    assert abs(draws["keep"].mean().item() - 0.67) < 0.01  # §4
    assert abs(draws["eps"].std().item() - 1.0) < 0.01

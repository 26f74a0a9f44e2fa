"""Flow-matching math and the training objective (elf-method.md §3, §4, §6)."""

import math

import pytest
import torch

from elf.flow import (
    ObjectiveConfig,
    decode_corruption,
    elf_loss,
    noise_path,
    sample_condition_dropped,
    sample_decode_keep,
    sample_guidance_scale,
    sample_time,
    sc_cfg_target,
    velocity_target,
    x_to_v,
)
from elf.model import ELF, ModelConfig
from elf.optim import build_optimizer

B, L, D, V = 6, 8, 16, 10


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------- §3, §4, §6 equations


def test_noise_path_runs_from_scaled_noise_to_data_with_velocity_x_minus_s_eps():
    x, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.allclose(noise_path(x, eps, torch.zeros(2)), 2.0 * eps)
    assert torch.allclose(noise_path(x, eps, torch.ones(2)), x)
    t, h = torch.tensor([0.3, 0.7]), 1e-3
    finite_diff = (noise_path(x, eps, t + h) - noise_path(x, eps, t)) / h
    assert torch.allclose(finite_diff, velocity_target(x, eps, 2.0), atol=1e-2)


def test_x_to_v_against_hand_computed_numbers():
    x_hat, z = torch.full((2, 1, 1), 3.0), torch.full((2, 1, 1), 1.0)
    v = x_to_v(x_hat, z, torch.tensor([0.5, 0.99]))
    assert v.flatten().tolist() == pytest.approx([4.0, 40.0])  # (3 − 1)/0.5 and (3 − 1)/max(0.01, 0.05)


def test_sc_cfg_target_against_hand_computed_numbers():
    one = torch.ones(3, 1, 1)
    target = sc_cfg_target(1 * one, 2 * one, 5 * one, torch.tensor([1, 0, 1]), torch.tensor([2.0, 2.0, 0.5]))
    # 1 + (1 − 1/2)·(5 − 2) = 2.5;  m = 0 → 1;  w = 0.5: 1 + (1 − 2)·3 = −2
    assert target.flatten().tolist() == pytest.approx([2.5, 1.0, -2.0])


def test_time_is_logit_normal_with_median_near_0_18():
    t = sample_time(200_000, gen())
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(1.5)), abs=0.005)
    assert 0 < t.min() and t.max() < 1


def test_guidance_scale_is_log_uniform_on_0_5_to_5_with_median_2():
    w = sample_guidance_scale(200_000, gen())
    assert w.min().item() >= 0.5 and w.max().item() <= 5.0
    assert w.min().item() == pytest.approx(0.5, abs=0.01) and w.max().item() == pytest.approx(5.0, abs=0.01)
    assert w.median().item() == pytest.approx(2.0, abs=0.02)
    assert torch.log1p(w).mean().item() == pytest.approx((math.log(1.5) + math.log(6)) / 2, abs=0.01)


def test_decode_keep_fraction_is_drawn_per_token_with_mean_0_67():
    p = sample_decode_keep((400, 500), gen())
    assert p.mean().item() == pytest.approx(0.67, abs=0.01)
    assert p.std(dim=1).min().item() > 0.1  # varies along every row, not one value per sequence
    x, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    keep = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.4, 0.6]])
    out = decode_corruption(x, eps, keep, noise_scale=5.0)
    assert torch.allclose(out[0, 0], x[0, 0]) and torch.allclose(out[0, 1], 5 * eps[0, 1])
    assert torch.allclose(out[1, 2], 0.6 * x[1, 2] + 0.4 * 5 * eps[1, 2])


def test_condition_dropout_rate():
    assert sample_condition_dropped(100_000, gen()).float().mean().item() == pytest.approx(0.1, abs=0.005)


# ------------------------------------------------------------------------------------------- elf_loss


def batch(conditional: bool = False, seed: int = 0):
    g = gen(seed)
    tokens = torch.randint(0, V, (B, L), generator=g)
    x = torch.randn(B, L, D, generator=g)
    source = torch.zeros(B, L, dtype=torch.bool)
    dropped = torch.zeros(B, dtype=torch.bool)
    if conditional:
        source[:, :3] = True
        dropped[[1, 3]] = True
    return x, ~source, source, dropped, tokens


def small_model(seed: int = 0) -> ELF:
    torch.manual_seed(seed)
    model = ELF(ModelConfig(embed_dim=D, vocab_size=V, hidden=32, depth=1, heads=2, bottleneck=8))
    with torch.no_grad():  # a non-zero x̂ head so x̂ depends on the input
        model.x_head.linear.weight.normal_(std=0.1)
    return model


class Recorder(torch.nn.Module):
    """Wraps a model; records every call's inputs, optionally overrides the gradient pass's outputs."""

    def __init__(self, model, edit=None):
        super().__init__()
        self.model, self.edit, self.calls = model, edit, []

    def forward(self, z, c, t, w, decode, return_logits=None):
        self.calls.append({"z": z.clone(), "c": c.clone(), "t": t.clone(), "w": w.clone(), "decode": decode})
        x_hat, logits = self.model(z, c, t, w, decode, return_logits=return_logits)
        gradient_pass = return_logits is not False
        return self.edit(x_hat, logits, decode) if self.edit and gradient_pass else (x_hat, logits)


def test_loss_is_deterministic_given_the_generator():
    model, args = small_model(), batch(conditional=True)
    loss_a, stats_a = elf_loss(model, *args, ObjectiveConfig(), gen(7))
    loss_b, stats_b = elf_loss(model, *args, ObjectiveConfig(), gen(7))
    loss_c, _ = elf_loss(model, *args, ObjectiveConfig(), gen(8))
    assert loss_a.item() == loss_b.item() and loss_a.item() != loss_c.item()
    assert {k: v.item() for k, v in stats_a.items()} == {k: v.item() for k, v in stats_b.items()}


def test_source_positions_are_clean_in_every_model_input_and_zero_when_dropped():
    x, loss_mask, source, dropped, tokens = batch(conditional=True)
    x[:, :3] = torch.randn(3, D)  # the same source in every row, to find it in sub-batches
    model = Recorder(small_model())
    cfg = ObjectiveConfig(decode_prob=0.5, self_cond_prob=0.5)
    elf_loss(model, x, loss_mask, source, dropped, tokens, cfg, gen(7))  # seed 7: rows 1, 4, 5 decode
    assert len(model.calls) == 3  # pass A, pass B, gradient pass
    for call in model.calls:
        for row in call["z"][:, :3]:
            assert torch.equal(row, x[0, :3]) or torch.equal(row, torch.zeros(3, D))
    grad_pass = model.calls[-1]
    assert grad_pass["decode"].any() and not grad_pass["decode"].all()
    for i in range(B):
        expected = torch.zeros(3, D) if dropped[i] else x[i, :3]
        assert torch.equal(grad_pass["z"][i, :3], expected)
        if dropped[i]:
            assert torch.equal(grad_pass["c"][i, :3], torch.zeros(3, D))
    assert grad_pass["c"][3, 3:].abs().sum() > 0  # row 3: dropped, self-conditioned on x̂_A
    # Decode rows: t = 1, c = 0.
    dec = grad_pass["decode"]
    assert torch.equal(grad_pass["t"][dec], torch.ones(int(dec.sum())))
    assert torch.equal(grad_pass["c"][dec], torch.zeros_like(grad_pass["c"][dec]))


def test_self_conditioning_input_holds_the_clean_source_in_every_pass():
    """Authors' code: c = [clean source ; 0] in pass A, [clean source ; x̂_A] in pass B and the gradient pass
    (m = 1), [clean source ; 0] for m = 0; zeros at a dropped source; decode rows c = 0 everywhere."""
    x, loss_mask, source, dropped, tokens = batch(conditional=True)
    model = Recorder(small_model())
    cfg = ObjectiveConfig(decode_prob=0.5, self_cond_prob=0.5)
    elf_loss(model, x, loss_mask, source, dropped, tokens, cfg, gen(7))
    pass_a, pass_b, grad_pass = model.calls
    # Rows of the A/B sub-batch, found by their z in the gradient pass.
    sc_rows = [next(i for i in range(B) if torch.equal(grad_pass["z"][i], z)) for z in pass_a["z"]]
    assert sc_rows and len(sc_rows) < int((~grad_pass["decode"]).sum())  # some m = 1 and some m = 0 rows
    for j, i in enumerate(sc_rows):
        clean = torch.zeros(3, D) if dropped[i] else x[i, :3]
        assert torch.equal(pass_a["c"][j, :3], clean) and torch.equal(pass_a["c"][j, 3:], torch.zeros(L - 3, D))
        assert torch.equal(pass_b["c"][j, :3], clean) and pass_b["c"][j, 3:].abs().sum() > 0
        assert torch.equal(grad_pass["c"][i], pass_b["c"][j])
    for i in range(B):
        if grad_pass["decode"][i]:
            assert torch.equal(grad_pass["c"][i], torch.zeros(L, D))
        elif i not in sc_rows:  # m = 0
            clean = torch.zeros(3, D) if dropped[i] else x[i, :3]
            assert torch.equal(grad_pass["c"][i, :3], clean)
            assert torch.equal(grad_pass["c"][i, 3:], torch.zeros(L - 3, D))


def test_source_positions_do_not_enter_the_loss():
    args = batch(conditional=True)

    def garbage_at_source(x_hat, logits, decode):
        x_hat = x_hat.clone()
        x_hat[:, :3] += 100.0
        if logits is not None:
            logits = logits.clone()
            logits[:, :3] = torch.randn_like(logits[:, :3]) * 100
        return x_hat, logits

    model = small_model()
    cfg = ObjectiveConfig(decode_prob=0.5)
    plain, _ = elf_loss(model, *args, cfg, gen(5))
    edited, _ = elf_loss(Recorder(model, garbage_at_source), *args, cfg, gen(5))
    assert plain.item() == pytest.approx(edited.item(), rel=1e-6)


def test_changing_the_source_of_a_dropped_row_changes_nothing_and_gets_no_gradient():
    x, loss_mask, source, dropped, tokens = batch(conditional=True)
    model, cfg = small_model(), ObjectiveConfig(decode_prob=0.5)
    x = x.requires_grad_()
    loss, _ = elf_loss(model, x, loss_mask, source, dropped, tokens, cfg, gen(2))
    loss.backward()
    assert torch.equal(x.grad[dropped][:, :3], torch.zeros(2, 3, D))
    assert x.grad[~dropped][:, :3].abs().sum() > 0  # a kept source is context for the target
    changed = x.detach().clone()
    changed[1, :3] += 5.0
    loss_changed, _ = elf_loss(model, changed, loss_mask, source, dropped, tokens, cfg, gen(2))
    assert loss_changed.item() == loss.item()


def test_all_decode_rows_with_uniform_logits_give_log_v():
    def uniform(x_hat, logits, decode):
        return x_hat, torch.zeros_like(logits)

    x, loss_mask, source, dropped, tokens = batch()
    loss_mask[:, -2:] = False  # pads
    loss, stats = elf_loss(
        Recorder(small_model(), uniform), x, loss_mask, source, dropped, tokens, ObjectiveConfig(decode_prob=1.0), gen()
    )
    assert loss.item() == pytest.approx(math.log(V), rel=1e-5)
    assert stats["decode_tokens"].item() == stats["loss_tokens"].item() == B * (L - 2)
    assert stats["denoise_rows"].item() == 0


def test_denoise_loss_matches_the_sc_cfg_equations():
    """With a linear stand-in model x̂ = a·z + b·c, recompute §3/§6 from the recorded gradient-pass inputs."""
    a, b = 0.5, 0.25

    def linear_model(z, c, t, w, decode, return_logits=None):
        calls.append((z, c, t, w))
        return a * z + b * c, torch.zeros(int(decode.sum()), z.shape[1], V)

    calls = []
    x, loss_mask, source, dropped, tokens = batch()
    cfg = ObjectiveConfig(decode_prob=0.0, self_cond_prob=1.0)
    loss, _ = elf_loss(linear_model, x, loss_mask, source, dropped, tokens, cfg, gen(4))
    z, c, t, w = calls[-1]
    tt = t[:, None, None]
    eps = (z - tt * x) / ((1 - tt) * 2.0)
    x_hat_a = a * z
    assert torch.allclose(c, x_hat_a)  # m = 1 everywhere: the gradient pass sees [z, x̂_A]
    v_a = (x_hat_a - z) / (1 - tt).clamp(min=0.05)
    v_b = (a * z + b * x_hat_a - z) / (1 - tt).clamp(min=0.05)
    target = (x - 2.0 * eps) + (1 - 1 / w)[:, None, None] * (v_b - v_a)
    v_hat = (a * z + b * c - z) / (1 - tt).clamp(min=0.05)
    expected = (v_hat - target).pow(2).mean(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_no_self_conditioning_runs_no_extra_passes_on_rows_with_m_0():
    calls = []

    def zero_model(z, c, t, w, decode, return_logits=None):
        calls.append(len(z))
        return torch.zeros_like(z), torch.zeros(int(decode.sum()), z.shape[1], V)

    elf_loss(zero_model, *batch(), ObjectiveConfig(decode_prob=0.0, self_cond_prob=0.0), gen())
    assert calls == [0, 0, B]


def test_tiny_model_overfits_a_fixed_set_of_embeddings():
    """MSE and CE fall, and decoding the clean embeddings gives back every token (< 60 s on CPU)."""
    torch.manual_seed(0)
    vocab, n, length, dim = 8, 4, 8, 16
    table = torch.randn(vocab, dim)
    tokens = torch.randint(0, vocab, (n, length))
    x = table[tokens]
    model = ELF(ModelConfig(embed_dim=dim, vocab_size=vocab, hidden=64, depth=2, heads=4, bottleneck=8))
    optimizer = build_optimizer(model, "adamw", lr=3e-3)  # Muon's bf16 Newton–Schulz is slow on CPU
    cfg = ObjectiveConfig(decode_prob=0.5, decode_noise_scale=1.0)
    loss_mask, source = torch.ones(n, length, dtype=torch.bool), torch.zeros(n, length, dtype=torch.bool)
    g, history = gen(0), []
    for _ in range(300):
        loss, stats = elf_loss(model, x, loss_mask, source, torch.zeros(n, dtype=torch.bool), tokens, cfg, g)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append((stats["mse"].item(), stats["ce"].item(), stats["decode_tokens"].item()))
    with torch.no_grad():
        _, logits = model(x, torch.zeros_like(x), torch.ones(n), torch.full((n,), 2.0), torch.ones(n, dtype=bool))

    def mean(rows, i):
        values = [r[i] for r in rows if (i == 0 and r[2] < n * length) or (i == 1 and r[2] > 0)]
        return sum(values) / len(values)

    first, last = history[:50], history[-50:]
    assert mean(last, 0) < 0.8 * mean(first, 0)
    assert mean(last, 1) < 0.5 * mean(first, 1)
    assert (logits.argmax(-1) == tokens).float().mean().item() == 1.0


@pytest.mark.parametrize("decode_prob", [0.0, 1.0])
def test_every_parameter_gets_a_gradient_even_when_one_row_kind_is_missing(decode_prob):
    """DDP without find_unused_parameters needs every parameter in the graph on every step."""
    model = small_model()
    loss, _ = elf_loss(model, *batch(), ObjectiveConfig(decode_prob=decode_prob), gen())
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []

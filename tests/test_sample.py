"""Samplers (elf-method.md §7) against analytic denoisers, input-CFG (§6), decode pass and text cut (§4)."""

import pytest
import torch

from elf.data.demo import build_grammar, generate_lm
from elf.data.tokenizer import train_unigram_tokenizer
from elf.errors import ElfError
from elf.model import build_model
from elf.sample import (
    SamplerConfig,
    conditional_texts,
    decode_tokens,
    generate,
    ids_to_texts,
    logit_normal_grid,
    model_denoiser,
    sample_embeddings,
    source_starts,
    uniform_grid,
)
from elf.vocab import EOS_ID, PAD_ID

S = 2.0  # §2 noise scale


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_denoiser(mu: torch.Tensor, sigma: torch.Tensor):
    """The exact x-predictor E[x | z_t] for data x ~ N(μ, σ²) per channel and z_t = t·x + (1 − t)·s·ε.

    Cov(x, z_t) = t·σ², Var(z_t) = t²σ² + (1 − t)²s², so E[x | z] = μ + t·σ² / Var(z_t) · (z − t·μ).
    """

    def denoise(z, x_prev, t, w):
        t = t[:, None, None]
        gain = t * sigma**2 / (t**2 * sigma**2 + (1 - t) ** 2 * S**2)
        return mu + gain * (z - t * mu)

    return denoise


class Recorder:
    """Wraps a denoiser and keeps every call's inputs, to check what the sampler feeds the network."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, []

    def __call__(self, z, x_prev, t, w):
        out = self.denoiser(z, x_prev, t, w)
        self.calls.append({"z": z.clone(), "x_prev": x_prev.clone(), "t": t.clone(), "w": w.clone(), "out": out})
        return out


def conditional_inputs(b=4, length=6, d=3, n_source=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(b, length, d, generator=g)
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[:, :n_source] = True
    return source, mask


# ---------------------------------------------------------------------------------------------------------
# Time grids
# ---------------------------------------------------------------------------------------------------------


def test_logit_normal_grid_is_sorted_seeded_and_spans_zero_to_one():
    grid = logit_normal_grid(16, torch.Generator().manual_seed(0))
    assert grid.shape == (17,) and grid[0] == 0.0 and grid[-1] == 1.0
    assert torch.all(grid[1:] >= grid[:-1])
    assert torch.equal(grid, logit_normal_grid(16, torch.Generator().manual_seed(0)))
    assert not torch.equal(grid, logit_normal_grid(16, torch.Generator().manual_seed(1)))
    # Small steps near noise: the inner times are sigmoid(N(−1.5, 0.8²)), median ≈ 0.18.
    assert 0.05 < grid[1:-1].median() < 0.4
    assert torch.equal(logit_normal_grid(1, torch.Generator().manual_seed(0)), torch.tensor([0.0, 1.0]))


def test_uniform_grid():
    assert torch.allclose(uniform_grid(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


# ---------------------------------------------------------------------------------------------------------
# ODE / SDE
# ---------------------------------------------------------------------------------------------------------


def test_ode_with_exact_denoiser_reproduces_gaussian_data_mean_and_variance():
    mu = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    sigma = torch.tensor([0.3, 0.6, 1.0, 1.5])
    # min_denom below 1 − t of every step: the exact ODE. (The default clamp max(1 − t, 0.05) slows the last
    # 5% of a fine grid, leaving ≈ e⁻¹ of the remaining noise and a −2% bias of the mean: see the next test.)
    cfg = SamplerConfig(kind="ode", steps=200, grid="uniform", min_denom=1e-3)
    z, _ = sample_embeddings(gaussian_denoiser(mu, sigma), (128, 64, 4), cfg, torch.Generator().manual_seed(0))
    flat = z.reshape(-1, 4)
    assert torch.all((flat.mean(0) - mu).abs() < 0.03 * sigma), flat.mean(0)
    assert torch.all((flat.std(0) / sigma - 1).abs() < 0.03), flat.std(0)


def test_velocity_denominator_is_clamped_near_data():
    recorder = Recorder(lambda z, c, t, w: torch.zeros_like(z))
    z, _ = sample_embeddings(recorder, (2, 3, 2), SamplerConfig(kind="ode", steps=100, grid="uniform"),
                             torch.Generator().manual_seed(0))
    last = recorder.calls[-1]
    assert last["t"][0].item() == pytest.approx(0.99)
    # v = (x̂ − z)/max(1 − 0.99, 0.05) = −z/0.05, then z ← z + 0.01·v = 0.8·z
    assert torch.allclose(z, 0.8 * last["z"], atol=1e-6)


def test_sde_with_zero_gamma_is_exactly_the_ode():
    denoiser = gaussian_denoiser(torch.tensor(0.7), torch.tensor(0.5))
    ode = SamplerConfig(kind="ode", steps=8)
    sde = SamplerConfig(kind="sde", steps=8, gamma=0.0)
    z_ode, _ = sample_embeddings(denoiser, (4, 5, 3), ode, torch.Generator().manual_seed(3))
    z_sde, _ = sample_embeddings(denoiser, (4, 5, 3), sde, torch.Generator().manual_seed(3))
    assert torch.equal(z_ode, z_sde)
    z_noisy, _ = sample_embeddings(denoiser, (4, 5, 3), SamplerConfig(kind="sde", steps=8, gamma=1.5),
                                   torch.Generator().manual_seed(3))
    assert not torch.equal(z_ode, z_noisy)


def test_sde_steps_back_in_time_and_the_last_interval_is_an_ode_step():
    recorder = Recorder(gaussian_denoiser(torch.tensor(0.0), torch.tensor(1.0)))
    cfg = SamplerConfig(kind="sde", steps=4, gamma=1.5, grid="uniform", guidance=2.5)
    sample_embeddings(recorder, (2, 3, 2), cfg, torch.Generator().manual_seed(0))
    alpha = 1 - 1.5 * 0.25  # α = clip(1 − γh, 0, 1) with h = 1/4
    called_t = [call["t"][0].item() for call in recorder.calls]
    assert called_t == pytest.approx([alpha * 0.0, alpha * 0.25, alpha * 0.5, 0.75])
    assert all(torch.all(call["w"] == 2.5) for call in recorder.calls)


def test_sde_with_one_step_is_the_ode():
    denoiser = gaussian_denoiser(torch.tensor(0.2), torch.tensor(0.8))
    z_ode, _ = sample_embeddings(denoiser, (2, 3, 2), SamplerConfig(kind="ode", steps=1),
                                 torch.Generator().manual_seed(1))
    z_sde, _ = sample_embeddings(denoiser, (2, 3, 2), SamplerConfig(kind="sde", steps=1, gamma=2.0),
                                 torch.Generator().manual_seed(1))
    assert torch.equal(z_ode, z_sde)


def test_self_conditioning_input_is_the_previous_prediction():
    recorder = Recorder(gaussian_denoiser(torch.tensor(1.0), torch.tensor(0.5)))
    sample_embeddings(recorder, (2, 3, 2), SamplerConfig(kind="ode", steps=3), torch.Generator().manual_seed(0))
    assert torch.all(recorder.calls[0]["x_prev"] == 0)  # x̂_prev = 0 at the start
    for before, after in zip(recorder.calls, recorder.calls[1:], strict=False):
        assert torch.equal(after["x_prev"], before["out"])


def test_prior_has_the_noise_scale():
    recorder = Recorder(lambda z, c, t, w: z)
    sample_embeddings(recorder, (64, 32, 8), SamplerConfig(kind="ode", steps=1), torch.Generator().manual_seed(0))
    assert recorder.calls[0]["z"].std().item() == pytest.approx(S, rel=0.03)


# ---------------------------------------------------------------------------------------------------------
# Conditional tasks: clean source, input-CFG (§6)
# ---------------------------------------------------------------------------------------------------------


def source_reader(z, x_prev, t, w):
    """x̂ = 0.5·z + z at position 0 (a source position): the conditional and unconditional passes differ."""
    return 0.5 * z + z[:, :1]


@pytest.mark.parametrize("omega", [1.0, 2.0, 3.5])
def test_input_cfg_combines_the_conditional_and_unconditional_passes(omega):
    source, mask = conditional_inputs()
    cfg = SamplerConfig(kind="ode", steps=1, grid="uniform", cfg_scale=omega)
    recorder = Recorder(source_reader)
    z, nfe = sample_embeddings(recorder, source.shape, cfg, torch.Generator().manual_seed(0), source, mask)
    z0 = torch.where(mask[..., None], source, S * torch.randn(source.shape, generator=torch.Generator().manual_seed(0)))
    # One step from t = 0 to 1 lands on x̂: x̂_u = 0.5·z₀ (source zeroed), x̂_c = 0.5·z₀ + src₀.
    expected = 0.5 * z0 + omega * source[:, :1]
    assert torch.allclose(z[~mask], expected[~mask], atol=1e-6)
    # ω = 1 is the conditional pass alone: one network call per step.
    assert len(recorder.calls) == (1 if omega == 1.0 else 2)
    assert nfe == len(recorder.calls) + 1


def test_unconditional_pass_zeros_the_source_in_z_and_self_conditioning():
    source, mask = conditional_inputs()
    recorder = Recorder(source_reader)
    cfg = SamplerConfig(kind="sde", steps=3, gamma=2.0, cfg_scale=2.0)
    sample_embeddings(recorder, source.shape, cfg, torch.Generator().manual_seed(0), source, mask)
    conditional, unconditional = recorder.calls[0::2], recorder.calls[1::2]
    for cond, uncond in zip(conditional, unconditional, strict=True):
        assert torch.equal(cond["z"][mask], source[mask])  # the clean source, never noised (SDE included)
        assert torch.all(uncond["z"][mask] == 0) and torch.all(uncond["x_prev"][mask] == 0)
        assert torch.equal(uncond["z"][~mask], cond["z"][~mask]) and torch.equal(cond["t"], uncond["t"])
    # Self-conditioning of the conditional pass holds the clean source at the source positions (authors' code),
    # from the first step on.
    for cond in conditional:
        assert torch.equal(cond["x_prev"][mask], source[mask])
    assert torch.all(conditional[0]["x_prev"][~mask] == 0) and not torch.all(conditional[1]["x_prev"][~mask] == 0)


@pytest.mark.parametrize("kind", ["ode", "sde"])
def test_source_positions_are_exactly_the_clean_source_after_sampling(kind):
    source, mask = conditional_inputs()
    cfg = SamplerConfig(kind=kind, steps=6, gamma=2.0, cfg_scale=2.0)
    z, _ = sample_embeddings(source_reader, source.shape, cfg, torch.Generator().manual_seed(0), source, mask)
    assert torch.equal(z[mask], source[mask])
    assert not torch.allclose(z[~mask], source[~mask])


def test_network_evaluation_counts():
    source, mask = conditional_inputs()
    for cfg, conditional, expected in [
        (SamplerConfig(kind="sde", steps=5), False, 6),
        (SamplerConfig(kind="ode", steps=5, cfg_scale=2.0), True, 11),
        (SamplerConfig(kind="ode", steps=5, cfg_scale=2.0), False, 6),  # no source: no input-CFG
    ]:
        recorder = Recorder(source_reader)
        args = (source, mask) if conditional else ()
        _, nfe = sample_embeddings(recorder, source.shape, cfg, torch.Generator().manual_seed(0), *args)
        assert nfe == expected == len(recorder.calls) + 1


def test_source_without_mask_or_of_the_wrong_shape_is_an_error():
    source, mask = conditional_inputs()
    with pytest.raises(ElfError, match="together"):
        sample_embeddings(source_reader, source.shape, SamplerConfig(), torch.Generator(), source, None)
    with pytest.raises(ElfError, match="do not match"):
        sample_embeddings(source_reader, (1, 2, 3), SamplerConfig(), torch.Generator(), source, mask)


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "match"), [
    ({"kind": "euler"}, "sampler.kind.*euler"),
    ({"steps": 0}, "sampler.steps"),
    ({"steps": 2.5}, "sampler.steps"),
    ({"grid": "cosine"}, "sampler.grid"),
    ({"gamma": -1.0}, "sampler.gamma"),
])
def test_bad_sampler_settings_name_the_field(fields, match):
    with pytest.raises(ElfError, match=match):
        SamplerConfig(**fields)


def test_misspelt_sampler_key_is_an_error():
    assert SamplerConfig.from_dict({"kind": "ode", "steps": 64}).steps == 64
    with pytest.raises(ElfError, match="gama"):
        SamplerConfig.from_dict({"gama": 1.0})


# ---------------------------------------------------------------------------------------------------------
# The real network: denoiser adapter, decode pass, text
# ---------------------------------------------------------------------------------------------------------

D, V = 16, 40


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = build_model("tiny", embed_dim=D, vocab_size=V, depth=1, hidden=32, heads=2).eval()
    torch.nn.init.normal_(model.x_head.linear.weight, std=0.1)  # non-zero x̂, so sampling moves
    return model


class Spy(torch.nn.Module):
    """Forwards to the model and records the arguments of each call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.cfg = model, [], model.cfg

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.model(*args, **kwargs)


def test_model_denoiser_runs_denoise_mode_without_grad(tiny_model):
    spy = Spy(tiny_model)
    z, c = torch.randn(2, 5, D), torch.randn(2, 5, D)
    t, w = torch.tensor([0.1, 0.6]), torch.tensor([3.0, 3.0])
    x_hat = model_denoiser(spy)(z, c, t, w)
    (args, kwargs), = spy.calls
    assert not args[4].any() and kwargs == {"return_logits": False}
    assert not x_hat.requires_grad and x_hat.dtype == torch.float32
    with torch.no_grad():
        expected, _ = tiny_model(z, c, t, w, torch.zeros(2, dtype=torch.bool))
    assert torch.equal(x_hat, expected)


def test_decode_pass_is_argmax_at_t_one_in_decode_mode(tiny_model):
    spy = Spy(tiny_model)
    z = torch.randn(3, 7, D)
    _, mask = conditional_inputs(b=3, length=7, d=D, n_source=2)
    ids = decode_tokens(spy, z, 3.0, mask)
    (args, _), = spy.calls
    _, self_cond, t, w, decode = args
    assert torch.all(self_cond == 0) and torch.all(t == 1) and decode.all()
    assert torch.all(w == 3.0)  # the sampler's SC-CFG scale, as the authors' decode pass
    with torch.no_grad():
        _, logits = tiny_model(z, torch.zeros_like(z), torch.ones(3), torch.full((3,), 3.0),
                               torch.ones(3, dtype=torch.bool))
    expected = logits.argmax(-1)
    assert ids.shape == (3, 7) and ids.dtype == torch.long
    assert torch.equal(ids[:, 2:], expected[:, 2:])
    assert torch.all(ids[:, :2] == PAD_ID)  # source positions were not generated


@pytest.fixture(scope="module")
def t5_tokenizer(tmp_path_factory):
    texts = list(generate_lm(build_grammar(0), seed=0, n=200))
    return train_unigram_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))


def test_texts_are_cut_at_the_first_eos_after_the_source(t5_tokenizer):
    tok = t5_tokenizer
    a, b = tok("A dog sees the cat.").input_ids, tok("Anna walks.").input_ids  # each ends in EOS
    assert a[-1] == EOS_ID and b[-1] == EOS_ID
    junk = tok("The red ball.").input_ids
    source = tok("Karl buys.", add_special_tokens=False).input_ids
    rows = [a + junk, source + b + junk]
    width = max(map(len, rows))
    ids = torch.tensor([row + [EOS_ID] * (width - len(row)) for row in rows])
    assert ids_to_texts(ids, tok, start=[0, len(source)]) == ["A dog sees the cat.", "Anna walks."]
    assert ids_to_texts(ids[:1], tok) == ["A dog sees the cat."]
    # No EOS at all: the whole generated region; EOS first: empty text.
    assert ids_to_texts([a[:-1]], tok) == ["A dog sees the cat."]
    assert ids_to_texts([[EOS_ID, *a]], tok) == [""]
    mask = torch.zeros(2, width, dtype=torch.bool)
    mask[1, : len(source)] = True
    assert source_starts(mask).tolist() == [0, len(source)]
    with pytest.raises(ElfError, match="start positions"):
        ids_to_texts(ids, tok, start=[0])


def test_conditional_output_is_capped_after_the_source(t5_tokenizer):
    """§7: max_length − max_input_length tokens after the source, whatever the source's length, then the EOS cut."""
    tok = t5_tokenizer
    words = tok("A dog sees the cat. Anna walks. The red ball.", add_special_tokens=False).input_ids
    for n_source in (2, 5):
        row = [7] * n_source + words + [EOS_ID]
        for cap in (3, len(words) + 4):
            text, = ids_to_texts([row], tok, start=[n_source], max_tokens=cap)
            assert text == tok.decode(words[:cap], skip_special_tokens=True)
    # The sample stage and `elf sample --source` decode through `conditional_texts`: 128 / 64 as in WMT14.
    rows = torch.tensor([[7] * n + (words * 20)[: 128 - n] for n in (10, 60)])
    mask = torch.arange(128)[None] < torch.tensor([[10], [60]])
    texts = conditional_texts(rows, tok, mask, max_length=128, max_input_length=64)
    assert texts == [tok.decode((words * 20)[:64], skip_special_tokens=True)] * 2


def test_generate_passes_the_sampler_guidance_to_the_decode_pass(tiny_model):
    spy = Spy(tiny_model)
    generate(spy, D, 6, batch=2, cfg=SamplerConfig(kind="ode", steps=2, guidance=2.5), seed=0, device="cpu",
             num_samples=2, progress=False)
    (args, _) = spy.calls[-1]
    assert args[4].all() and torch.all(args[3] == 2.5)


def test_generate_is_reproducible_and_batches(tiny_model):
    cfg = SamplerConfig(kind="sde", steps=3, gamma=1.5)
    first = generate(tiny_model, D, 6, batch=2, cfg=cfg, seed=7, device="cpu", num_samples=5, progress=False)
    again = generate(tiny_model, D, 6, batch=2, cfg=cfg, seed=7, device="cpu", num_samples=5, progress=False)
    other = generate(tiny_model, D, 6, batch=2, cfg=cfg, seed=8, device="cpu", num_samples=5, progress=False)
    assert first.ids.shape == (5, 6) and first.nfe == 4 and first.seconds > 0
    assert torch.equal(first.ids, again.ids) and not torch.equal(first.ids, other.ids)
    assert int(first.ids.max()) < V


def test_generate_conditional_keeps_source_out_of_the_ids(tiny_model):
    source, mask = conditional_inputs(b=3, length=6, d=D, n_source=2)
    cfg = SamplerConfig(kind="ode", steps=2, cfg_scale=2.0, guidance=1.0)
    out = generate(tiny_model, D, 6, batch=2, cfg=cfg, seed=0, device="cpu", source=source, source_mask=mask,
                   progress=False)
    assert out.ids.shape == (3, 6) and out.nfe == 5
    assert torch.all(out.ids[:, :2] == PAD_ID)
    with pytest.raises(ElfError, match="encoder_dim"):
        generate(tiny_model, D + 1, 6, batch=2, cfg=cfg, seed=0, device="cpu", progress=False)

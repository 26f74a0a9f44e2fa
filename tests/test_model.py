"""The ELF network (elf-method.md §5): shapes, sizes, RoPE, prefix conditioning, init, precision."""

import math

import pytest
import torch

import elf.model as model_module
from elf.model import (
    ELF,
    PRESETS,
    ModelConfig,
    apply_rope,
    apply_rope_to_content,
    build_model,
    num_parameters,
    rope_angles,
    sinusoidal_features,
)

D, V, L = 32, 50, 6


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(**overrides) -> ELF:
    cfg = {"embed_dim": D, "vocab_size": V, "hidden": 64, "depth": 2, "heads": 4, "bottleneck": 8, **overrides}
    torch.manual_seed(0)
    return ELF(ModelConfig(**cfg))


def inputs(b: int = 3, decode=(True, False, True)):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(b, L, D, generator=g)
    c = torch.randn(b, L, D, generator=g)
    return z, c, torch.rand(b, generator=g), 0.5 + 4.5 * torch.rand(b, generator=g), torch.tensor(decode)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_forward_gives_x_hat_and_decode_row_logits(preset):
    # The big presets run with one block: the shapes do not depend on depth, and CPU time does.
    overrides = {} if preset in ("tiny", "small") else {"depth": 1}
    model = build_model(preset, embed_dim=D, vocab_size=V, **overrides)
    z, c, t, w, decode = inputs()
    x_hat, logits = model(z, c, t, w, decode)
    assert x_hat.shape == (3, L, D) and x_hat.dtype == torch.float32
    assert logits.shape == (2, L, V)  # decode rows only


def test_parameter_counts_match_the_paper_within_two_percent():
    paper = {"ELF-B": 105e6, "ELF-M": 342e6, "ELF-L": 652e6}
    for preset, expected in paper.items():
        with torch.device("meta"):
            model = build_model(preset, embed_dim=512, vocab_size=32100)
        assert abs(num_parameters(model) / expected - 1) < 0.02, (preset, num_parameters(model))


def test_preset_shapes_and_derived_widths():
    cfg = model_module.model_config("ELF-B", embed_dim=512, vocab_size=32100)
    assert (cfg.depth, cfg.hidden, cfg.heads) == (12, 768, 12)
    assert (cfg.bottleneck, cfg.decode_hidden, cfg.mlp_hidden) == (128, 512, 2048)
    assert model_module.model_config("tiny", embed_dim=128, vocab_size=V).bottleneck == 64


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="ELF-X.*ELF-B"):
        build_model("ELF-X", embed_dim=D, vocab_size=V)


def test_config_round_trips_and_rejects_misspelt_keys():
    cfg = ModelConfig(embed_dim=D, vocab_size=V, hidden=64, depth=2, heads=4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="hiden"):
        ModelConfig.from_dict({**cfg.to_dict(), "hiden": 32})
    with pytest.raises(ValueError, match="bottleneck"):
        ModelConfig(embed_dim=D, vocab_size=V, hidden=64, depth=2, heads=4, bottleneck=D)


def test_x_hat_is_zero_at_initialisation():
    model = tiny_model()
    x_hat, _ = model(*inputs())
    assert torch.equal(x_hat, torch.zeros_like(x_hat))


def test_init_follows_the_method():
    model = tiny_model(hidden=256, heads=4)
    assert model.time_tokens.std().item() == pytest.approx(0.02, rel=0.15)
    assert model.time_embed.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    fc2 = model.decode_head.fc2.weight  # Xavier-uniform: bound √(6 / (fan_in + fan_out))
    assert fc2.abs().max().item() <= math.sqrt(6 / (fc2.shape[0] + fc2.shape[1]))
    assert torch.equal(model.decode_head.fc2.bias, torch.zeros(V))
    assert model.input_proj.down.bias is None


def test_rope_rotates_interleaved_pairs():
    head_dim, theta = 8, 1e4
    cos, sin = rope_angles(5, head_dim, theta, torch.device("cpu"))
    x = torch.zeros(5, head_dim)
    x[:, 2] = 1.0  # the first element of pair (2, 3)
    out = apply_rope(x, cos, sin)
    angle = 3 * theta ** (-2 / head_dim)  # position 3, pair index 1
    assert out[3, 2].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert out[3, 3].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert torch.equal(out[3, [0, 1, 4, 5, 6, 7]], torch.zeros(6))
    assert torch.equal(out[0], x[0])  # position 0 is not rotated


def test_rope_scores_depend_only_on_the_offset():
    head_dim = 16
    cos, sin = rope_angles(20, head_dim, 1e4, torch.device("cpu"))
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    qs, ks = apply_rope(q.expand(20, -1), cos, sin), apply_rope(k.expand(20, -1), cos, sin)
    for shift in (1, 7):
        assert (qs[2] @ ks[5]).item() == pytest.approx((qs[2 + shift] @ ks[5 + shift]).item(), abs=1e-4)
    assert (qs[2] @ ks[5]).item() != pytest.approx((qs[2] @ ks[6]).item(), abs=1e-3)


def test_prefix_tokens_are_not_rotated_and_content_starts_at_position_zero():
    head_dim, prefix, length = 8, 12, 5
    cos, sin = rope_angles(length, head_dim, 1e4, torch.device("cpu"))
    x = torch.randn(2, 3, prefix + length, head_dim)
    out = apply_rope_to_content(x, cos, sin, prefix)
    assert torch.equal(out[..., :prefix, :], x[..., :prefix, :])
    assert torch.allclose(out[..., prefix:, :], apply_rope(x[..., prefix:, :], cos, sin))
    assert torch.equal(out[..., prefix, :], x[..., prefix, :])  # content position 0: angle 0


def test_decode_rows_get_the_same_logits_alone_or_in_a_mixed_batch():
    model = tiny_model()
    z, c, t, w, decode = inputs()
    _, logits = model(z, c, t, w, decode)
    _, alone = model(z[2:], c[2:], t[2:], w[2:], decode[2:])
    assert torch.allclose(logits[1], alone[0], atol=1e-5)
    assert model(z, c, t, w, decode, return_logits=False)[1] is None
    assert model(z, c, t, w, torch.zeros(3, dtype=torch.bool))[1] is None
    assert model(z, c, t, w, torch.zeros(3, dtype=torch.bool), return_logits=True)[1].shape == (0, L, V)


def test_mode_tokens_only_reach_decode_rows():
    model = tiny_model()
    with torch.no_grad():
        model.x_head.linear.weight.normal_()  # make x̂ depend on the input
    z, c, t, w, decode = inputs()
    before, _ = model(z, c, t, w, decode)
    with torch.no_grad():
        model.mode_tokens.add_(1.0)
    after, _ = model(z, c, t, w, decode)
    assert torch.equal(before[1], after[1])  # denoise row: gate 0
    assert not torch.allclose(before[0], after[0])


def test_time_and_guidance_change_the_output():
    model = tiny_model()
    with torch.no_grad():
        model.x_head.linear.weight.normal_()
    z, c, t, w, decode = inputs()
    base, _ = model(z, c, t, w, decode)
    assert not torch.allclose(base, model(z, c, t + 0.1, w, decode)[0])
    assert not torch.allclose(base, model(z, c, t, w + 1.0, decode)[0])
    assert not torch.allclose(base, model(z, torch.zeros_like(c), t, w, decode)[0])


def test_sinusoidal_features_are_cos_then_sin_of_the_raw_value():
    feats = sinusoidal_features(torch.tensor([0.0, 0.5]), dim=8, max_period=1e4)
    assert torch.equal(feats[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(1e4) * torch.arange(4) / 4)
    assert torch.allclose(feats[1], torch.cat([torch.cos(0.5 * freqs), torch.sin(0.5 * freqs)]))


@pytest.mark.parametrize("attention_fp32", [False, True])
def test_bf16_autocast_keeps_projections_and_heads_in_fp32(monkeypatch, attention_fp32):
    """Attention runs as bf16 SDPA by default (fp32 accumulation inside the GPU kernels); `attention_fp32`
    keeps q, k, v in fp32 with autocast off."""
    model = tiny_model(attention_fp32=attention_fp32)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", recording_sdpa)
    dtypes = {}
    for name in ("input_proj", "time_embed", "blocks.0.mlp"):
        module = model.get_submodule(name)
        module.register_forward_hook(lambda m, i, o, name=name: dtypes.__setitem__(name, o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat, logits = model(*inputs())
    assert x_hat.dtype == logits.dtype == torch.float32
    assert dtypes == {"input_proj": torch.float32, "time_embed": torch.float32, "blocks.0.mlp": torch.bfloat16}
    assert seen == ([(torch.float32, False)] * 2 if attention_fp32 else [(torch.bfloat16, True)] * 2)


def test_bf16_forward_is_close_to_fp32():
    model = tiny_model()
    with torch.no_grad():
        model.x_head.linear.weight.normal_(std=0.1)
    args = inputs()
    ref, ref_logits = model(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat, logits = model(*args)
    assert torch.allclose(x_hat, ref, atol=0.1, rtol=0.05)
    assert torch.allclose(logits, ref_logits, atol=0.1, rtol=0.05)


def test_empty_batch_runs():
    z = torch.zeros(0, L, D)
    x_hat, _ = tiny_model()(z, z, torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    assert x_hat.shape == (0, L, D)


def test_bf16_attention_stays_within_1_percent_of_fp32_attention():
    """The default (`attention_fp32: False`) runs bf16 SDPA under autocast; §5 asks for an fp32 softmax, which
    the GPU kernels keep internally. Measured here under CPU bf16 autocast: x̂ and logits differ from the fp32
    attention path by ≈ 0.45% (relative L2), as much as bf16 autocast itself moves them (≈ 0.5%): 1% is the
    stated tolerance. Without autocast both paths are the same fp32 computation."""
    torch.manual_seed(0)
    fast = build_model("small", 64, 500, depth=4, hidden=256, heads=4).eval()
    torch.nn.init.normal_(fast.x_head.linear.weight, std=0.05)
    exact = build_model("small", 64, 500, depth=4, hidden=256, heads=4, attention_fp32=True).eval()
    exact.load_state_dict(fast.state_dict())
    z, t, w = torch.randn(4, 128, 64) * 2, torch.rand(4), torch.full((4,), 2.0)
    decode = torch.tensor([False, True, False, True])
    with torch.no_grad():
        plain = fast(z, torch.zeros_like(z), t, w, decode), exact(z, torch.zeros_like(z), t, w, decode)
        assert all(torch.equal(a, b) for a, b in zip(*plain, strict=True))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x_fast, logits_fast = fast(z, torch.zeros_like(z), t, w, decode)
            x_exact, logits_exact = exact(z, torch.zeros_like(z), t, w, decode)
    for a, b in ((x_fast, x_exact), (logits_fast, logits_exact)):
        assert 0 < ((a - b).norm() / b.norm()).item() < 1e-2

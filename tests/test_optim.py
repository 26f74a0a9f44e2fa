"""Optimiser, schedule and EMA of the training recipe (elf-method.md §8)."""

import io
import math

import pytest
import torch
from torch import nn

from elf.flow import ObjectiveConfig, elf_loss
from elf.model import ELF, ModelConfig
from elf.optim import (
    EMA,
    CompositeOptimizer,
    build_optimizer,
    scaled_lr,
    split_muon_params,
    warmup_constant_schedule,
)

D, V = 16, 10


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(seed: int = 0) -> ELF:
    torch.manual_seed(seed)
    return ELF(ModelConfig(embed_dim=D, vocab_size=V, hidden=32, depth=1, heads=2, bottleneck=8))


def fake_grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_muon_gets_exactly_the_linear_weights_and_nadam_the_rest():
    model = small_model()
    optimizer = build_optimizer(model, "muon", lr=1e-3)
    muon, nadam = optimizer.optimizers["muon"], optimizer.optimizers["nadam"]
    muon_ids = {id(p) for group in muon.param_groups for p in group["params"]}
    nadam_ids = {id(p) for group in nadam.param_groups for p in group["params"]}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert muon_ids == linear_weights
    assert nadam_ids == {id(p) for p in model.parameters()} - linear_weights
    for name in ("time_tokens", "guidance_tokens", "mode_tokens", "blocks.0.norm1.weight", "x_head.linear.bias"):
        assert id(model.get_parameter(name)) in nadam_ids
    assert split_muon_params(model)[0][0].ndim == 2


def test_optimizer_settings_follow_the_recipe():
    optimizer = build_optimizer(small_model(), "muon", lr=2e-3)
    muon = optimizer.optimizers["muon"].param_groups[0]
    nadam = optimizer.optimizers["nadam"].param_groups[0]
    assert (muon["lr"], muon["momentum"], muon["nesterov"], muon["ns_steps"]) == (2e-3, 0.95, True, 5)
    assert muon["ns_coefficients"] == (3.4445, -4.7750, 2.0315)
    assert muon["adjust_lr_fn"] == "original" and muon["weight_decay"] == 0.0
    assert (nadam["lr"], nadam["betas"], nadam["eps"], nadam["weight_decay"]) == (2e-3, (0.9, 0.999), 1e-8, 0.0)
    adamw = build_optimizer(small_model(), "adamw", lr=1e-4).optimizers["adamw"].param_groups[0]
    assert adamw["betas"] == (0.9, 0.95) and adamw["lr"] == 1e-4
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer(small_model(), "sgd", lr=1e-3)


@pytest.mark.parametrize("foreach", [False, True])
def test_nadam_matches_textbook_nesterov_adam(foreach):
    """θ ← θ − lr·m̂/(√v̂ + ε), m̂ = β₁m_t/(1 − β₁^(t+1)) + (1 − β₁)g/(1 − β₁^t): no momentum schedule."""
    model = nn.Sequential(nn.LayerNorm(5))  # bias + scale only: all NAdam
    optimizer = build_optimizer(model, "muon", lr=0.1)
    optimizer.optimizers["nadam"].param_groups[0]["foreach"] = foreach
    param = model[0].bias
    theta, m, v = param.detach().clone().double(), torch.zeros(5).double(), torch.zeros(5).double()
    b1, b2, lr, eps = 0.9, 0.999, 0.1, 1e-8
    for step in range(1, 6):
        g = torch.randn(5)
        param.grad, model[0].weight.grad = g.clone(), torch.zeros(5)
        optimizer.step()
        g = g.double()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        m_hat = b1 * m / (1 - b1 ** (step + 1)) + (1 - b1) * g / (1 - b1**step)
        theta = theta - lr * m_hat / ((v / (1 - b2**step)).sqrt() + eps)
        assert torch.allclose(param.detach().double(), theta, atol=1e-6)


def test_muon_step_is_scaled_newton_schulz_of_the_gradient():
    linear = nn.Linear(4, 12, bias=False)  # fan_out / fan_in = 3
    optimizer = build_optimizer(linear, "muon", lr=0.01)
    before = linear.weight.detach().clone()
    grad = torch.randn(12, 4)
    linear.weight.grad = grad.clone()
    optimizer.step()

    x = grad.T / grad.norm()  # Newton–Schulz on the wide orientation (torch runs it in bf16: ~1% error)
    for _ in range(5):
        gram = x @ x.T
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    expected_step = 0.01 * math.sqrt(3) * x.T  # √max(1, fan_out / fan_in) = √3
    step = before - linear.weight.detach()
    assert (step - expected_step).norm() < 0.03 * expected_step.norm()


def test_muon_and_nadam_train_the_model():
    model = small_model()
    optimizer = build_optimizer(model, "muon", lr=1e-2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (4, 6), generator=g)
    x = torch.randn(V, D, generator=g)[tokens]
    masks = torch.ones(4, 6, dtype=torch.bool), torch.zeros(4, 6, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    cfg = ObjectiveConfig(decode_prob=1.0)  # CE only: a steady signal for a short run
    losses = []
    for _ in range(25):
        loss, _ = elf_loss(model, x, *masks, tokens, cfg, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


def test_scaled_lr():
    assert scaled_lr(512) == pytest.approx(0.002)
    assert scaled_lr(256, base_lr=1e-3) == pytest.approx(1e-3)


def test_warmup_is_linear_then_constant_on_both_optimizers():
    optimizer = build_optimizer(small_model(), "muon", lr=0.004)
    scheduler = warmup_constant_schedule(optimizer, warmup_steps=4)
    seen = []
    for _ in range(6):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert [lrs[0] for lrs in seen] == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.004, 0.004])
    assert all(len(set(lrs)) == 1 for lrs in seen)  # Muon and NAdam share the lr


def test_optimizer_and_schedule_state_dicts_round_trip():
    model_a = small_model()
    opt_a = build_optimizer(model_a, "muon", lr=0.01)
    sched_a = warmup_constant_schedule(opt_a, warmup_steps=10)
    for step in range(3):
        fake_grads(model_a, step)
        opt_a.step()
        sched_a.step()

    model_b = small_model(seed=1)
    model_b.load_state_dict(model_a.state_dict())
    opt_b = build_optimizer(model_b, "muon", lr=0.01)
    sched_b = warmup_constant_schedule(opt_b, warmup_steps=10)
    saved = io.BytesIO()  # through a checkpoint file: an in-memory state_dict shares its tensors
    torch.save({"opt": opt_a.state_dict(), "sched": sched_a.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved)
    opt_b.load_state_dict(checkpoint["opt"])
    sched_b.load_state_dict(checkpoint["sched"])
    assert sched_b.get_last_lr() == sched_a.get_last_lr()

    for model, opt, sched in ((model_a, opt_a, sched_a), (model_b, opt_b, sched_b)):
        fake_grads(model, 99)
        opt.step()
        sched.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="adamw"):
        opt_b.load_state_dict({"adamw": {}})


def test_zero_grad_clears_both_optimizers():
    model = small_model()
    optimizer = build_optimizer(model, "muon", lr=0.01)
    fake_grads(model, 0)
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert isinstance(optimizer, CompositeOptimizer)


def test_ema_is_an_exponential_average_from_init():
    model = nn.Linear(3, 2)
    init = model.weight.detach().clone()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], init + 0.1)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], 0.9 * (init + 0.1) + 0.1 * (init + 2.0))

    target = nn.Linear(3, 2)
    ema.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"])


def test_ema_keeps_an_fp32_shadow_and_its_state_round_trips():
    model = nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(model)
    assert ema.decay == 0.9999 and ema.shadow["weight"].dtype == torch.float32
    ema.update(model)
    restored = EMA(nn.Linear(3, 2))
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and torch.equal(restored.shadow["bias"], ema.shadow["bias"])
    with pytest.raises(ValueError, match="does not match"):
        EMA(nn.Linear(3, 2, bias=False)).load_state_dict(ema.state_dict())
    copy_ = ema.ema_model(model)
    assert not copy_.training and copy_.weight.dtype == torch.bfloat16

"""The training recipe's optimiser, learning-rate schedule and EMA (elf-method.md §8).

Default: torch.optim.Muon for the 2-D weight of every nn.Linear, torch.optim.NAdam for everything else
(biases, RMSNorm scales, the learned prefix tokens); same lr, weight decay 0. The two live in one
`CompositeOptimizer` so the trainer steps, zeroes, saves and loads them as one object.

How torch's optimisers compare with §8 (the settings chosen here, and what still differs):
- Muon: momentum 0.95, Nesterov, 5 Newton–Schulz steps with (3.4445, −4.7750, 2.0315) are torch's defaults
  and are passed explicitly. The update scale √max(1, fan_out/fan_in) is `adjust_lr_fn="original"`
  (rows/cols of the weight = out/in features); "match_rms_adamw" would be 0.2·√max(fan_out, fan_in).
  torch's weight_decay default is 0.1: set to 0 here. Differences that remain: torch keeps the momentum as
  an EMA, B ← 0.95·B + 0.05·g, Nesterov update g + 0.95·(B − g) (Keller Jordan's form; a global factor 0.05
  against B ← 0.95·B + g, which Newton–Schulz normalises away); the Newton–Schulz iteration runs in bf16
  and normalises by the Frobenius norm clamped at 1e-7.
- NAdam: torch's NAdam follows Dozat's momentum *schedule* μ_t = β₁·(1 − 0.5·0.96^(t·ψ)) with
  ψ = momentum_decay = 0.004 by default, i.e. an effective β₁ ≈ 0.45 at the start that reaches 0.9 only after
  ~10⁴–10⁵ steps. The textbook Nesterov-Adam (Keras/optax `nadam`) keeps μ_t = β₁. Setting
  ψ = `NADAM_CONSTANT_MOMENTUM` (1e9) makes 0.96^(t·ψ) = 0 for every t ≥ 1, so μ_t = β₁ exactly and torch's
  update equals the textbook one: m̂ = β₁·m_t/(1 − β₁^(t+1)) + (1 − β₁)·g/(1 − β₁^t), v̂ = v_t/(1 − β₂^t),
  θ ← θ − lr·m̂/(√v̂ + ε) (checked in tests/test_optim.py).
- Which parameters: §8 says "Muon for every 2-D weight"; the learned prefix tokens (4×H) are 2-D too but §8
  lists "learned tokens" under Nesterov-Adam, so Muon gets only nn.Linear weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim import AdamW, Muon, NAdam, Optimizer
from torch.optim.lr_scheduler import LambdaLR

NADAM_CONSTANT_MOMENTUM = 1e9  # NAdam momentum_decay that turns Dozat's μ schedule off (μ_t = β₁), see above
MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


# ---------------------------------------------------------------------------------------------------------
# Optimiser
# ---------------------------------------------------------------------------------------------------------


class CompositeOptimizer:
    """Several torch optimisers over disjoint parameters, stepped as one (Muon + NAdam, or AdamW alone)."""

    def __init__(self, optimizers: dict[str, Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        """The children's groups (the same dicts), e.g. for logging the lr or clipping gradients."""
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state has parts {sorted(state)}, expected {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])

    def __iter__(self) -> Iterator[Optimizer]:
        return iter(self.optimizers.values())


def split_muon_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon params, the rest): Muon gets the weight of every nn.Linear; biases, norms and tokens the rest."""
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) in matrices], [p for p in params if id(p) not in matrices]


def build_optimizer(
    model: nn.Module,
    kind: str = "muon",
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] | None = None,
    eps: float = 1e-8,
    momentum: float = 0.95,
    ns_steps: int = 5,
) -> CompositeOptimizer:
    """§8 optimiser. kind "muon": Muon (matrices) + NAdam β (0.9, 0.999) (the rest); kind "adamw": AdamW
    β (0.9, 0.95) on everything (the paper's weaker alternative, lr 1e-4). Same lr and weight decay for all."""
    if kind == "muon":
        matrices, others = split_muon_params(model)
        parts: dict[str, Optimizer] = {}
        if matrices:
            parts["muon"] = Muon(
                matrices,
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                nesterov=True,
                ns_coefficients=MUON_NS_COEFFICIENTS,
                ns_steps=ns_steps,
                adjust_lr_fn="original",  # √max(1, fan_out / fan_in)
            )
        if others:
            parts["nadam"] = NAdam(
                others,
                lr=lr,
                betas=betas or (0.9, 0.999),
                eps=eps,
                weight_decay=weight_decay,
                momentum_decay=NADAM_CONSTANT_MOMENTUM,
            )
        return CompositeOptimizer(parts)
    if kind == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        return CompositeOptimizer(
            {"adamw": AdamW(params, lr=lr, betas=betas or (0.9, 0.95), eps=eps, weight_decay=weight_decay)}
        )
    raise ValueError(f"unknown optimizer kind {kind!r}; known kinds: ['adamw', 'muon']")


# ---------------------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------------------


def scaled_lr(batch_size: int, base_lr: float = 1e-3, ref: int = 256) -> float:
    """§8: lr = base × batch / 256 (0.002 at batch 512)."""
    return base_lr * batch_size / ref


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup then constant: (step + 1) / warmup for the first `warmup_steps` updates, then 1.

    Counting from step + 1 makes the first update non-zero (a schedule starting at exactly 0 would spend the
    first step on a no-op); the lr reaches its full value at update number `warmup_steps`.
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


class CompositeScheduler:
    """One LambdaLR per child optimiser, stepped together; state_dict round-trips."""

    def __init__(self, optimizer: CompositeOptimizer, lr_lambda):
        self.schedulers = {name: LambdaLR(opt, lr_lambda) for name, opt in optimizer.optimizers.items()}

    def step(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.step()

    def get_last_lr(self) -> list[float]:
        return [lr for s in self.schedulers.values() for lr in s.get_last_lr()]

    def state_dict(self) -> dict:
        return {name: s.state_dict() for name, s in self.schedulers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state[name])


def warmup_constant_schedule(optimizer: CompositeOptimizer, warmup_steps: int) -> CompositeScheduler:
    """§8: linear warmup over `warmup_steps` updates, then constant. Call `.step()` after each update."""
    return CompositeScheduler(optimizer, lambda step: warmup_factor(step, warmup_steps))


# ---------------------------------------------------------------------------------------------------------
# EMA (§8: decay 0.9999, every step from init; evaluation and sampling use the EMA weights)
# ---------------------------------------------------------------------------------------------------------


class EMA:
    """fp32 shadow of a model's parameters: θ_ema ← decay·θ_ema + (1 − decay)·θ after every update.

    No warm-up of the decay ("from init"): the shadow starts as a copy of the initial weights. Buffers are
    copied, not averaged. Pass the bare model (not a DDP wrapper) so the names match the saved model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into `model` (e.g. a copy used for sampling)."""
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))

    def ema_model(self, model: nn.Module) -> nn.Module:
        """A deep copy of `model` holding the EMA weights, in eval mode."""
        copy_ = copy.deepcopy(model)
        self.copy_to(copy_)
        return copy_.eval()

    def state_dict(self) -> dict:
        """Like nn.Module.state_dict, the shadow tensors are shared, not copied: save before the next update."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model; differing parameters: {sorted(missing)[:5]}")
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

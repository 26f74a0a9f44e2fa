"""Bad settings and flags: one line naming the key or flag, exit 2, nothing written (reliability sweep)."""

import math
import shutil

import pytest
import torch
import yaml

from elf.config import config_from_dict
from elf.errors import ElfError
from elf.model import build_model
from elf.sample import SamplerConfig, generate
from tests.conftest import REPO, run_elf


@pytest.fixture
def params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def sampler(params: dict, **changes) -> None:
    params["sample"]["samplers"]["owt"][0].update(changes)


def objective(params: dict, **changes) -> None:
    params["train"]["defaults"]["objective"].update(changes)


PARAMS_CASES = [
    (lambda p: sampler(p, guidance=math.nan), "samplers.owt[0]: sampler.guidance: must be a finite number"),
    (lambda p: sampler(p, guidance=math.inf), "sampler.guidance: must be a finite number"),
    (lambda p: sampler(p, guidance=-1.0), "sampler.guidance: must be > 0"),
    (lambda p: sampler(p, gamma=math.inf), "sampler.gamma: must be a finite number"),
    (lambda p: sampler(p, cfg_scale=math.inf), "sampler.cfg_scale: must be a finite number"),
    (lambda p: sampler(p, gamma="1.5"), "sampler.gamma: must be a finite number"),
    (lambda p: p["train"]["defaults"].update(lr=math.inf), "train.defaults.lr: Input should be a finite number"),
    (lambda p: p["train"]["defaults"].update(lr=math.nan), "train.defaults.lr: Input should be a finite number"),
    (lambda p: objective(p, noise_scale=math.inf), "objective.noise_scale: Input should be a finite number"),
    (lambda p: objective(p, time_mean=math.nan), "objective.time_mean: Input should be a finite number"),
    (lambda p: p["train"]["defaults"].update(nproc_per_node=0), "nproc_per_node must be >= 1 or 'auto'"),
    (lambda p: p["train"]["defaults"].update(compile="yes"), "train.defaults.compile"),
    (lambda p: p.update(threads=0), "threads: Input should be greater than 0"),
]


@pytest.mark.parametrize("edit, expected", PARAMS_CASES)
def test_bad_settings_are_one_line_errors_at_load(params, edit, expected):
    edit(params)
    with pytest.raises(ElfError) as error:
        config_from_dict(params)
    message = str(error.value)
    assert "\n" not in message and expected in message and len(message) < 300


@pytest.mark.parametrize("args, expected", [
    (["train", "owt", "--stop-after", "-1"], "--stop-after: must be a whole number >= 1 (got '-1')"),
    (["train", "owt", "--stop-after", "0"], "--stop-after: must be a whole number >= 1 (got '0')"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, args, expected):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    result = run_elf(*args, cwd=tmp_path, check=False)
    assert result.returncode == 2 and expected in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_model_that_produces_non_finite_embeddings_is_an_error_not_silent_pad():
    torch.manual_seed(0)
    model = build_model("tiny", 8, 20, depth=1, hidden=16, heads=2, bottleneck=4).eval()
    with torch.no_grad():
        model.x_head.linear.bias.fill_(math.nan)  # as a diverged run's weights would be
    with pytest.raises(ElfError, match="non-finite embeddings"):
        generate(model, 8, 6, batch=2, cfg=SamplerConfig(kind="ode", steps=2), seed=0, device="cpu",
                 num_samples=2, progress=False)

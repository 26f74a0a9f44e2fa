"""The validation loss (elf/validation.py): fixed rows and noise, independent of batching, and it tracks training."""

import copy
import math
from pathlib import Path

import pytest
import torch

from elf.distributed import Dist
from elf.encoders import load_encoder
from elf.flow import ObjectiveConfig
from elf.model import load_model
from elf.validation import Validator

ONE_PROCESS = Dist(rank=0, world=1, device=torch.device("cpu"))


def validator(built: Path, micro_batch: int = 4, rows: int = 256) -> Validator:
    return Validator(built / "data/tokens/owt/validation", "lm", 32, load_encoder(built / "data/encoder"),
                     ObjectiveConfig(decode_noise_scale=5.0), rows, [0.1, 0.5, 0.9], ONE_PROCESS, micro_batch)


def test_same_rows_and_noise_every_time_whatever_the_batching(built, one_thread):
    model, _ = load_model(built / "models/owt/model")
    first = validator(built)(model.eval())
    again = validator(built)(model)  # a new validator: the same rows and noise (a resumed run builds one anew)
    assert again == first
    chunked = validator(built, micro_batch=1)(model)
    assert chunked == pytest.approx(first, rel=1e-5)
    assert first["rows"] == validator(built, rows=10**6).rows  # all the split's rows when it has fewer
    assert validator(built, rows=3)(model)["rows"] == 3
    assert all(math.isfinite(v) for v in first.values()) and 0 < first["loss_se"] < first["loss"]
    # loss = 0.8 · mean over t of mse + 0.2 · ce (the objective's mix of denoise and decode rows)
    mse = [first[f"mse_t{t}"] for t in (0.1, 0.5, 0.9)]
    assert first["mse"] == pytest.approx(sum(mse) / 3, rel=1e-5)
    assert first["loss"] == pytest.approx(0.8 * first["mse"] + 0.2 * first["ce"], rel=1e-5)


def test_a_network_with_other_weights_scores_differently(built, one_thread):
    model, _ = load_model(built / "models/owt/model")
    scrambled = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in scrambled.parameters():
            p.add_(torch.randn_like(p), alpha=0.5)
    v = validator(built)
    assert v(scrambled)["loss"] > v(model.eval())["loss"]

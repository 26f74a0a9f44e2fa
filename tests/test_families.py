"""The baseline families (elf/families): MDLM's SUBS and ELBO and AR's causal teacher forcing against hand
computations, their samplers' shapes and determinism, and both trained, resumed and sampled by the train stage."""

import math

import pytest
import torch
from test_train import DATASETS, SETTINGS, data, final_weights, paths  # noqa: F401 - data is a fixture

from elf.config import TrainSettings
from elf.families import build_network
from elf.families.ar import ar_loss, ar_sample, shift_right
from elf.families.mdlm import TIME_EPS, draw_mask_per_row, elbo_weight, mdlm_loss, mdlm_sample, subs_log_probs
from elf.pretrained import ELFPipeline
from elf.train import train
from elf.vocab import EOS_ID, PAD_ID

V = 8  # vocabulary of the hand computations; the MDLM mask id is V


class FixedLogits:
    """A network whose logits are fixed, recording its inputs: the objectives' arithmetic by hand."""

    def __init__(self, logits: torch.Tensor):
        self.logits, self.calls = logits, []

    def __call__(self, ids, t=None):
        self.calls.append((ids.clone(), None if t is None else t.clone()))
        return self.logits


def tiny(family: str, vocab: int = V, **shape) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(family, "tiny", 16, vocab, depth=1, hidden=32, heads=2, **shape).eval()


def test_subs_zero_mask_probability_and_carry_over():
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0], [5.0, -1.0, 2.0]]])  # V = 3, mask id 3
    z_t = torch.tensor([[3, 2]])  # position 0 masked, position 1 shows token 2
    log_probs = subs_log_probs(logits, z_t, mask_id=3)
    torch.testing.assert_close(log_probs[0, 0].exp(), torch.tensor([0.25, 0.5, 0.25, 0.0]))
    assert log_probs[0, 1].tolist() == [-math.inf, -math.inf, 0.0, -math.inf]


def test_mdlm_loss_is_the_elbo_weighted_masked_cross_entropy():
    ids = torch.tensor([[5, 6, 7, 1]])
    logits = torch.zeros(1, 4, V)
    logits[0, 2, 7] = math.log(3.0)  # p(7) = 3 / (V + 2) at position 2
    network = FixedLogits(logits)
    draws = {"t": torch.tensor([0.25]), "u": torch.tensor([[0.1, 0.9, 0.2, 0.7]])}  # u < t: positions 0 and 2
    source = torch.zeros(1, 4, dtype=torch.bool)
    loss, stats = mdlm_loss(network, ids, torch.ones(1, 4, dtype=torch.bool), source, draws, mask_id=V)
    z_t, t_in = network.calls[0]
    assert z_t.tolist() == [[V, 6, V, 1]] and t_in.tolist() == [0.25]
    nll = math.log(V) + (math.log(V + 2) - math.log(3.0))
    assert loss.item() == pytest.approx((1 / 0.25) * nll / 4)  # (1/t) Σ masked CE, per loss token
    assert stats["ce"].item() == pytest.approx(nll / 2) and int(stats["decode_tokens"]) == 2
    assert elbo_weight(torch.tensor(0.5)).item() == 2.0

    # seq2seq: the source is never masked and never scored, whatever its draw
    network = FixedLogits(logits)
    source[0, 0] = True
    loss, _ = mdlm_loss(network, ids, torch.ones(1, 4, dtype=torch.bool), source, draws, mask_id=V)
    assert network.calls[0][0].tolist() == [[5, 6, V, 1]]
    assert loss.item() == pytest.approx(4 * (math.log(V + 2) - math.log(3.0)) / 3)


def test_mdlm_draws_depend_on_the_row_seed_alone():
    a, b = draw_mask_per_row([7, 8], 5), draw_mask_per_row([8], 5)
    assert torch.equal(a["u"][1], b["u"][0]) and a["t"][1] == b["t"][0]
    assert bool(((a["t"] >= TIME_EPS) & (a["t"] <= 1)).all())


def test_ar_loss_is_teacher_forced_next_token_cross_entropy():
    ids = torch.tensor([[5, 6, 1, 0]])
    logits = torch.zeros(1, 4, V)
    logits[0, 1, 6] = math.log(5.0)  # p(6 | EOS, 5) = 5 / (V + 4)
    network = FixedLogits(logits)
    valid = torch.tensor([[True, True, True, False]])  # the pad is not a loss token
    loss, stats = ar_loss(network, ids, valid, torch.zeros_like(valid))
    assert network.calls[0][0].tolist() == [[EOS_ID, 5, 6, 1]]  # shifted right, EOS as beginning of sequence
    expected = (math.log(V) + math.log(V + 4) - math.log(5.0) + math.log(V)) / 3
    assert loss.item() == pytest.approx(expected) and int(stats["loss_tokens"]) == 3


def test_ar_network_is_causal_and_mdlm_network_is_not():
    ids = torch.randint(3, V, (2, 6))
    changed = ids.clone()
    changed[:, 3] = (ids[:, 3] + 1 - 3) % (V - 3) + 3
    ar = tiny("ar")
    with torch.no_grad():
        before, after = ar(shift_right(ids)), ar(shift_right(changed))
    torch.testing.assert_close(before[:, :4], after[:, :4], rtol=0, atol=0)  # positions ≤ 3 never see token 3
    assert not torch.allclose(before[:, 4:], after[:, 4:])
    mdlm = tiny("mdlm")
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        assert not torch.allclose(mdlm(ids, t)[:, 0], mdlm(changed, t)[:, 0])


def test_mdlm_sampler_shapes_determinism_source_and_cache():
    network = tiny("mdlm")
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    ids, calls = mdlm_sample(network, (4, 6), 12, g())
    again, _ = mdlm_sample(network, (4, 6), 12, g())
    assert ids.shape == (4, 6) and ids.dtype == torch.long and torch.equal(ids, again)
    assert bool((ids < V).all()) and calls in (12, 13)  # time-conditioned: a call every step (no cache)
    untimed = tiny("mdlm", time_conditioning=False)
    assert untimed.cfg.num_prefix == 0 and not any("time" in name for name, _ in untimed.named_parameters())
    cached, many = mdlm_sample(untimed, (1, 6), 200, g())
    assert many <= 6 + 1  # a call only after a step that unmasked something: exact, the input is unchanged
    torch.manual_seed(0)
    assert bool((cached < V).all())
    source = torch.full((4, 6), 5)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, :2] = True
    ids, _ = mdlm_sample(network, (4, 6), 6, g(), source, mask)
    assert bool((ids[:, :2] == 5).all())


def test_ar_sampler_shapes_determinism_greedy_and_prefix():
    network = tiny("ar")
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    ids, calls = ar_sample(network, (3, 5), g())
    assert ids.shape == (3, 5) and torch.equal(ids, ar_sample(network, (3, 5), g())[0]) and calls <= 5
    greedy, _ = ar_sample(network, (1, 5), g(), greedy=True)
    with torch.no_grad():  # each greedy token is the argmax given the tokens before it (up to the first EOS)
        logits = network(shift_right(greedy))
    end = greedy[0].tolist().index(EOS_ID) + 1 if EOS_ID in greedy[0].tolist() else 5
    assert greedy[0, :end].tolist() == logits[0, :end].argmax(-1).tolist()
    source = torch.tensor([[4, 5, 6, PAD_ID, PAD_ID]] * 2)
    mask = torch.tensor([[True, True, True, False, False]] * 2)
    ids, calls = ar_sample(network, (2, 5), g(), source_ids=source, source_mask=mask)
    assert ids[:, :3].tolist() == [[4, 5, 6]] * 2 and calls <= 2


@pytest.mark.parametrize("family, name", [("mdlm", "owt"), ("ar", "wmt14")])
def test_train_stage_trains_resumes_and_samples_a_baseline(data, tmp_path, family, name):  # noqa: F811
    settings = TrainSettings(**{**SETTINGS, "family": family})
    straight = paths(data, tmp_path / "straight", name)
    train(name, DATASETS[name], settings, 42, straight)
    resumed = paths(data, tmp_path / "resumed", name)
    train(name, DATASETS[name], settings, 42, resumed, stop_after=3)
    train(name, DATASETS[name], settings, 42, resumed)
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact resume, as ELF
    curve = (straight.metrics / "validation_history.csv").read_text().splitlines()
    assert len(curve) == 4 and float(curve[-1].split(",")[1]) > 0
    pipeline = ELFPipeline.load(straight.model)
    assert pipeline.family == family and pipeline.sampler().kind == family
    if name == "owt":
        texts = pipeline.generate(3, seed=0, steps=8)
    else:
        texts = pipeline.generate(source=["ich sehe", "der hund"], seed=0)
    assert len(texts) in (2, 3) and all(isinstance(t, str) for t in texts)
    with pytest.raises(Exception, match="samples elf models"):
        pipeline.generate(1 if name == "owt" else 0, source=None if name == "owt" else ["x"], kind="ode")

    import mlflow
    import pandas as pd

    from elf.tracking import latest_logged_model

    logged = latest_logged_model(mlflow.MlflowClient(), pipeline.info["mlflow_run_id"])
    served = mlflow.pyfunc.load_model(logged.model_uri)  # the registry's copy samples with its own kind by default
    rows = pd.DataFrame({"source": ["", ""] if name == "owt" else ["ich sehe", "der hund"]})
    assert len(served.predict(rows, params={"steps": 4} if family == "mdlm" else None)) == 2


def test_the_pipeline_stages_train_sample_and_evaluate_a_baseline(built, tmp_path):
    """`train.datasets.<ds>.family: mdlm` with an mdlm sampler: the stages as `dvc repro` runs them."""
    import json
    import shutil

    import yaml
    from conftest import inside, mlflow_store_in

    from elf.cli import main

    project = tmp_path / "project"
    shutil.copytree(built, project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["datasets"]["owt"] = {"family": "mdlm"}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with inside(project):  # an ELF sampler for an MDLM model is refused at load, naming both
        assert main(["config", "check"]) == 2
    params["sample"]["samplers"]["owt"] = [{"name": "mdlm-8", "kind": "mdlm", "steps": 8}]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with inside(project), mlflow_store_in(project):
        for args in (["train", "owt"], ["sample", "owt"], ["evaluate", "owt"]):
            assert main(args) == 0, args
    assert json.loads((project / "models" / "owt" / "model" / "config.json").read_text())["family"] == "mdlm"
    rows = [json.loads(line) for line in (project / "samples" / "owt.jsonl").read_text().splitlines()]
    assert {(row["sampler"], row["settings"]["kind"]) for row in rows} == {("mdlm-8", "mdlm")}
    report = json.loads((project / "metrics" / "owt" / "eval.json").read_text())
    assert report["samplers"]["mdlm-8"]["oracle_ppl_floored"] > 1
    assert list((project / "models").glob("owt.aside/run-*"))  # the ELF checkpoints were moved aside, not deleted

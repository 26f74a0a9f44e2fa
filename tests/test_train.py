"""The train stage: exact resume after a kill, DDP ≡ one process, checkpoint integrity, outputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elf.config import DatasetConfig, TokenizeConfig, TrainSettings
from elf.data.embed import embed_dataset
from elf.data.prepare import prepare_dataset
from elf.data.tokenizer import build_tokenizer, training_texts
from elf.data.tokens import tokenize_dataset
from elf.encoders import gaussian_encoder, save_encoder
from elf.errors import ElfError
from elf.model import load_model
from elf.train import TrainPaths, train

DATASETS = {
    "owt": DatasetConfig(task="lm", source="demo", max_length=24,
                         demo={"generator": "lm", "train_size": 120, "validation_size": 10, "max_sentences": 2}),
    "wmt14": DatasetConfig(task="seq2seq", source="demo", max_length=48, max_input_length=30,
                           demo={"generator": "translation", "train_size": 120, "validation_size": 10}),
}
SETTINGS = dict(preset="tiny", model={"depth": 1, "hidden": 32, "heads": 2}, steps=6, batch_size=8,
                checkpoint_every=2, log_every=1, warmup_steps=2, lr=0.003, shuffle_window=2, ema_decay=0.9,
                validation={"every": 2, "rows": 10})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Demo data, tokenizer, a Gaussian encoder and the embedding cache, built with the library."""
    root = tmp_path_factory.mktemp("train-data")
    for name, dataset in DATASETS.items():
        prepare_dataset(name, dataset, 42, root / "raw" / name)
    raw = {n: (root / "raw" / n / "train.parquet", d.columns) for n, d in DATASETS.items()}
    digest = build_tokenizer("train", "", 300, training_texts(raw, 1000), root / "tokenizer")
    for name, dataset in DATASETS.items():
        tokenize_dataset(name, dataset, TokenizeConfig(shard_rows=50, batch_size=20), root / "raw" / name,
                         root / "tokenizer", root / "tokens" / name)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(root / "tokenizer"))
    save_encoder(gaussian_encoder(vocab, 16, seed=0), root / "encoder", digest)
    for name in DATASETS:
        embed_dataset(root / "tokens" / name, root / "encoder", root / "embeddings" / name, cache=True, batch_size=16)
    return root


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")


def paths(data: Path, out: Path, name: str = "owt", cached: bool = True) -> TrainPaths:
    return TrainPaths(tokens=data / "tokens" / name / "train",
                      embeddings=data / "embeddings" / name / "train" if cached else None,
                      encoder=data / "encoder", tokenizer=data / "tokenizer", out=out / "models" / name,
                      metrics=out / "metrics" / name)


def final_weights(p: TrainPaths) -> dict[str, torch.Tensor]:
    checkpoints = sorted((p.out / "checkpoints").iterdir())
    return load_file(str(checkpoints[-1] / "model.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


def test_train_writes_model_metrics_and_plot(data, tmp_path):
    p = paths(data, tmp_path)
    summary = train("owt", DATASETS["owt"], TrainSettings(**SETTINGS), 42, p)
    model, meta = load_model(p.model)
    assert meta["dataset"] == "owt" and meta["step"] == 6 and meta["mlflow_run_id"]
    figures = json.loads((p.metrics / "train.json").read_text())
    assert figures["steps"] == 6 and figures["val_loss"] > 0 and 0 < figures["val_loss_se"] < figures["val_loss"]
    curve = (p.metrics / "validation_history.csv").read_text().splitlines()
    assert curve[0] == "step,loss,loss_se,mse,ce,decode_acc" and [r.split(",")[0] for r in curve[1:]] == ["2", "4", "6"]
    assert (p.metrics / "train_loss.png").stat().st_size > 0
    assert sorted(c.name for c in (p.out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    assert summary["loss"] > 0 and model.cfg.depth == 1

    import mlflow

    run = mlflow.MlflowClient().get_run(meta["mlflow_run_id"])
    assert run.data.params["train.batch_size"] == "8"
    assert {"loss", "mse", "ce", "lr", "grad_norm", "tokens_per_s", "val/loss", "val/loss_se", "val/mse_t0.5",
            "val/ce"} <= set(run.data.metrics)
    assert run.data.tags["dataset"] == "owt" and run.data.tags["encoder_content_hash"]


TRAIN_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_train import DATASETS, SETTINGS, paths
from elf.config import TrainSettings
from elf.train import train
settings = TrainSettings(**{{**SETTINGS, **{overrides!r}}})
train({name!r}, DATASETS[{name!r}], settings, 42, paths(Path({data!r}), Path({out!r}), {name!r}, {cached!r}))
"""


def run_train(data, out, name="owt", cached=True, overrides=None, env=None, background=False):
    code = TRAIN_SCRIPT.format(tests=str(Path(__file__).parent), overrides=overrides or {}, name=name,
                               data=str(data), out=str(out), cached=cached)
    full_env = {**os.environ, **(env or {})}
    if background:
        return subprocess.Popen([sys.executable, "-c", code], env=full_env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    result = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("name, cached", [("owt", True), ("wmt14", False)])
def test_resume_after_kill_continues_with_identical_weights(data, tmp_path, name, cached):
    straight = paths(data, tmp_path / "straight", name, cached)
    train(name, DATASETS[name], TrainSettings(**{**SETTINGS, "steps": 8}), 42, straight)

    killed = paths(data, tmp_path / "killed", name, cached)
    process = run_train(data, tmp_path / "killed", name, cached, overrides={"steps": 8}, background=True)
    deadline = time.time() + 120
    while not (killed.out / "checkpoints" / "step-000002" / "checkpoint.json").exists():
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not killed.model.exists()
    train(name, DATASETS[name], TrainSettings(**{**SETTINGS, "steps": 8}), 42, killed)
    assert_same_weights(final_weights(straight), final_weights(killed))
    straight_model, _ = load_model(straight.model)
    killed_model, _ = load_model(killed.model)
    assert_same_weights(straight_model.state_dict(), killed_model.state_dict())
    # Fixed rows and noise: the resumed run's validation curve is the uninterrupted one, figure for figure.
    assert (killed.metrics / "validation_history.csv").read_text() == \
        (straight.metrics / "validation_history.csv").read_text()


# AdamW: the same update up to float summation order. Muon: its Newton–Schulz iteration runs in bf16 (torch's
# implementation), so a last-bit difference in the all-reduced gradient can round differently: looser bound.
@pytest.mark.parametrize("optimizer, atol", [("adamw", 1e-5), ("muon", 1e-3)])
def test_two_gloo_processes_match_one_process(data, tmp_path, optimizer, atol):
    overrides = {"steps": 4, "optimizer": optimizer}
    one = paths(data, tmp_path / "one")
    train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, **overrides}), 42, one)
    two = paths(data, tmp_path / "two")
    code = TRAIN_SCRIPT.format(tests=str(Path(__file__).parent), overrides=overrides, name="owt",
                               data=str(data), out=str(tmp_path / "two"), cached=True)
    script = tmp_path / "ddp_train.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(final_weights(one), final_weights(two), atol=atol)
    # Each process scores its share of the validation rows; the reduced figures are those of one process.
    one_val = json.loads((one.metrics / "train.json").read_text())
    two_val = json.loads((two.metrics / "train.json").read_text())
    assert two_val["val_loss"] == pytest.approx(one_val["val_loss"], rel=1e-3)
    assert two_val["val_loss_se"] == pytest.approx(one_val["val_loss_se"], rel=1e-2)


def test_micro_batches_match_full_batch(data, tmp_path):
    full = paths(data, tmp_path / "full")
    train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 3}), 42, full)
    micro = paths(data, tmp_path / "micro")
    train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 3, "micro_batch_size": 2}), 42, micro)
    assert_same_weights(final_weights(full), final_weights(micro), atol=1e-3)


def test_corrupt_checkpoint_is_an_error_naming_the_file(data, tmp_path):
    p = paths(data, tmp_path)
    train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 4}), 42, p)
    weights = p.out / "checkpoints" / "step-000004" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ElfError, match="step-000004/model.safetensors: corrupt checkpoint file"):
        train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 6}), 42, p)


def test_changed_settings_start_afresh_but_more_steps_resume(data, tmp_path, capsys):
    p = paths(data, tmp_path)
    train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 2}), 42, p)
    first = final_weights(p)
    summary = train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 4}), 42, p)  # steps may grow
    assert summary["steps"] == 4 and "resuming at step 2" in capsys.readouterr().out
    train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 2, "lr": 0.01}), 42, p)
    err = capsys.readouterr().err
    assert "changed: train.lr" in err and "Move them back" in err
    assert [c.name for c in (p.out / "checkpoints").iterdir()] == ["step-000002"]
    fresh = final_weights(p)  # step 2 again, now with lr 0.01: not the old step-2 weights
    assert any(not torch.equal(first[key], fresh[key]) for key in first)
    # Nothing was deleted: the old run's checkpoints wait beside the model directory, outside DVC's output
    # (step 4 as past the new target, step 2 as another run's).
    aside = sorted(str(c.relative_to(p.out.parent / "owt.aside")) for c in (p.out.parent / "owt.aside").glob("*/*"))
    assert aside[0] == "past-step-2/step-000004" and aside[1].startswith("run-") and aside[1].endswith("step-000002")


def test_lowered_steps_set_the_checkpoints_past_them_aside(data, tmp_path, capsys):
    """A run to 6 steps, then `steps: 4`: the model must be the 4-step model, not the 6-step one."""
    reference = paths(data, tmp_path / "reference")
    train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 4}), 42, reference)
    p = paths(data, tmp_path / "run")
    train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "keep_checkpoints": 3}), 42, p)  # 2, 4, 6
    summary = train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 4, "keep_checkpoints": 3}), 42, p)
    out, err = capsys.readouterr()
    assert "moved 1 checkpoint(s)" in err and "resuming at step 4" in out and summary["steps"] == 4
    assert [c.name for c in sorted((p.out / "checkpoints").iterdir())] == ["step-000002", "step-000004"]
    assert_same_weights(final_weights(p), final_weights(reference))
    assert [c.name for c in (p.out.parent / "owt.aside" / "past-step-4").iterdir()] == ["step-000006"]


def test_a_stray_checkpoint_of_another_run_does_not_take_the_valid_ones_with_it(data, tmp_path, capsys):
    p = paths(data, tmp_path)
    train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 4}), 42, p)
    other = paths(data, tmp_path / "other")
    train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 6, "lr": 0.01}), 42, other)
    os.replace(other.checkpoints / "step-000006", p.checkpoints / "step-000006")  # e.g. copied in by mistake
    summary = train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 6}), 42, p)
    out, err = capsys.readouterr()
    assert "resuming at step 4" in out and summary["steps"] == 6 and "changed: train.lr" in err
    assert [c.name for c in (p.out.parent / "owt.aside").glob("run-*/*")] == ["step-000006"]


def test_a_second_training_on_the_same_model_directory_is_refused(data, tmp_path):
    """Two `elf train owt` at once would race on one checkpoint directory: the second stops with one line."""
    p = paths(data, tmp_path)
    p.out.parent.mkdir(parents=True)
    lock, owner = p.out.parent / ".owt.train.lock", p.out.parent / ".owt.train.owner"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom filelock import FileLock\n"
         f"lock = FileLock({str(lock)!r})\nlock.acquire()\nopen({str(owner)!r}, 'w').write('pid 4242 on trainer-1')\n"
         "print('held', flush=True)\ntime.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ElfError, match=r"another training is running on it \(pid 4242 on trainer-1\)") as error:
            train("owt", DATASETS["owt"], TrainSettings(**SETTINGS), 0, p)
        assert "\n" not in str(error.value) and not p.out.exists()
    finally:
        holder.kill()
        holder.wait()
    train("owt", DATASETS["owt"], TrainSettings(**SETTINGS), 0, p)  # the holder gone, the lock is free
    assert (p.out / "model" / "model.safetensors").is_file()


def test_each_training_segment_has_its_own_run_and_frozen_registered_model(data, tmp_path):
    """Train 4 steps and register; extend to 6 and register: version 1 still serves the 4-step weights."""
    import mlflow

    from elf.tracking import register_candidate, tracking_uri

    p = paths(data, tmp_path)
    client = mlflow.MlflowClient(tracking_uri())  # this test's store (MLflow keeps the last URI process-wide)
    runs, steps = [], [4, 6]
    for total in steps:
        train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": total}), 42, p)
        runs.append((p.out / "mlflow_run_id").read_text().strip())
        register_candidate("elf-owt", runs[-1], "model", "gen_ppl", 10.0 - total, higher_is_better=False)
    first, second = (client.get_run(r) for r in runs)
    assert first.info.run_id != second.info.run_id
    parent = first.data.tags["mlflow.parentRunId"]
    assert second.data.tags["mlflow.parentRunId"] == parent  # one training, two segments
    assert [(r.data.tags["segment_start_step"], r.data.tags["segment_end_step"]) for r in (first, second)] == \
        [("0", "4"), ("4", "6")]
    assert [h.step for h in client.get_metric_history(second.info.run_id, "loss")] == [5, 6]
    assert second.data.params["train.steps"] == "6" and first.data.params["train.steps"] == "4"
    for version, total in zip(("1", "2"), steps, strict=True):
        loaded = mlflow.artifacts.download_artifacts(f"models:/elf-owt/{version}", dst_path=str(tmp_path / version))
        config = json.loads(next(Path(loaded).rglob("config.json")).read_text())
        assert config["step"] == total, version
        source = client.get_model_version("elf-owt", version).source  # models:/<its logged model's id>
        logged = client.get_logged_model(source.removeprefix("models:/"))
        assert logged.tags["step"] == str(total) and logged.tags["weights_sha256"] == config["weights_sha256"]

    # A finished training run again (e.g. `dvc repro` after a log_every change) opens no new segment or model.
    train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 6, "log_every": 2}), 42, p)
    assert (p.out / "mlflow_run_id").read_text().strip() == runs[-1]
    assert len(client.search_logged_models([second.info.experiment_id],
                                           filter_string=f"source_run_id = '{runs[-1]}'")) == 1
    # Other validation settings start the validation curve anew (one curve, one definition).
    train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 8, "validation": {"every": 2, "rows": 5}}),
          42, p)
    curve = (p.metrics / "validation_history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in curve[1:]] == ["8"]


def test_a_checkpoint_of_an_older_version_keeps_its_validation_curve(data, tmp_path):
    """Checkpoints written before the validation settings were recorded resume with their curve."""
    from elf.checkpoint import INDEX
    from elf.hashing import file_sha256

    p = paths(data, tmp_path)
    settings = TrainSettings(**{**SETTINGS, "steps": 4})
    train("owt", DATASETS["owt"], settings, 42, p)
    curve = (p.metrics / "validation_history.csv").read_text()
    last = sorted((p.out / "checkpoints").iterdir())[-1]
    state = json.loads((last / "trainer.json").read_text())
    del state["validation_settings"]
    (last / "trainer.json").write_text(json.dumps(state))
    index = json.loads((last / INDEX).read_text())
    index["files"]["trainer.json"] = file_sha256(last / "trainer.json")
    (last / INDEX).write_text(json.dumps(index))
    train("owt", DATASETS["owt"], settings, 42, p)
    assert (p.metrics / "validation_history.csv").read_text() == curve and len(curve.splitlines()) == 3


def test_a_model_samples_with_the_noise_scale_it_was_trained_with(data, tmp_path):
    """The prior and SDE noise scale s (and the x̂ → v floor) belong to the model: a sampler that leaves them
    unset uses the training objective's, and the samples file records the value used."""
    from elf.config import SampleConfig
    from elf.generation import sample_dataset
    from elf.pretrained import ELFPipeline

    p = paths(data, tmp_path)
    train("owt", DATASETS["owt"], TrainSettings(**{**SETTINGS, "steps": 2, "objective": {"noise_scale": 1.25}}), 42, p)
    pipeline = ELFPipeline.load(p.model)
    assert (pipeline.sampler().noise_scale, pipeline.sampler().min_denom) == (1.25, 0.05)
    assert pipeline.sampler(noise_scale=3.0).noise_scale == 3.0  # an explicit value is kept
    settings = SampleConfig(num_samples=2, batch_size=2, seeds=[0],
                            samplers={"owt": [{"name": "ode-2", "kind": "ode", "steps": 2}]})
    out = tmp_path / "samples.jsonl"
    sample_dataset("owt", DATASETS["owt"], settings, p.model, data / "tokens" / "owt", data / "raw" / "owt", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {row["settings"]["noise_scale"] for row in rows} == {1.25}

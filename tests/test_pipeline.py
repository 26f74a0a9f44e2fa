"""`dvc repro` of the real dvc.yaml in a temporary git repository, on a tiny demo configuration."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from elf.data.shards import verify_shards
from tests.conftest import BIN, REPO

pytestmark = pytest.mark.slow

PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "pyproject.toml"]


def tiny_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["threads"] = 1  # the test machines share 2 cores (tests/conftest.py)
    params["evaluate"]["trained_judge"].update(layers=1, hidden=32, heads=2, steps=20, batch_size=8)
    datasets = params["datasets"]
    datasets["owt"]["demo"].update(train_size=300, validation_size=20)
    datasets["wmt14"]["demo"].update(train_size=200, validation_size=20, test_size=20)
    datasets["xsum"]["demo"].update(train_size=100, validation_size=10, test_size=10)
    params["tokenizer"]["vocab_size"] = 400
    params["encoder"]["scratch"].update(d_model=32, num_layers=1, num_heads=2, d_ff=64, steps=10, batch_size=8)
    params["train"]["defaults"].update(steps=4, batch_size=8, checkpoint_every=2, log_every=1,
                                       model={"depth": 1, "hidden": 32, "heads": 2, "bottleneck": 16})
    for override in params["train"]["datasets"].values():  # the demo's per-dataset lengths
        for key in ("steps", "warmup_steps"):
            override.pop(key, None)
    params["sample"].update(num_samples=4, batch_size=4, seeds=[0, 1])
    params["sample"]["samplers"] = {
        "owt": [{"name": "sde-4", "kind": "sde", "steps": 4, "gamma": 1.5, "guidance": 3.0},
                {"name": "ode-2", "kind": "ode", "steps": 2, "guidance": 3.0}],
        "wmt14": [{"name": "ode-4", "kind": "ode", "steps": 4, "guidance": 1.0, "cfg_scale": 2.0}],
        "xsum": [{"name": "ode-4", "kind": "ode", "steps": 4, "guidance": 1.0, "cfg_scale": 2.0}],
    }
    return params


def run(*cmd: str, cwd) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def copy_project(repo: Path) -> None:
    """The repository's pipeline definition, code and input folders, copied into a new directory `repo`."""
    repo.mkdir()
    for name in PROJECT_FILES:
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "elf", repo / "elf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data/input", repo / "data/input")


@pytest.fixture
def project(tmp_path):
    """A copy of the repository's pipeline definition and code in a fresh git + DVC repository."""
    repo = tmp_path / "repo"
    copy_project(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    run("git", "init", "-q", cwd=repo)
    run(str(BIN / "dvc"), "init", "-q", cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=repo)
    return repo


def test_dvc_repro_runs_every_stage_and_second_run_does_nothing(project):
    run(str(BIN / "dvc"), "repro", cwd=project)
    for name in ("owt", "wmt14", "xsum"):
        assert (project / f"data/raw/{name}/train.parquet").is_file()
        manifest = verify_shards(project / f"data/tokens/{name}/train")
        assert manifest["rows"] > 0 and manifest["tokenizer_hash"]
    assert (project / "data/raw/owt/grammar.json").is_file()
    assert (project / "data/tokenizer/tokenizer.json").is_file()
    assert (project / "data/encoder/encoder.json").is_file()
    reports = {}
    for name in ("owt", "wmt14", "xsum"):
        assert (project / f"models/{name}/model/model.safetensors").is_file()
        assert json.loads((project / f"metrics/{name}/train.json").read_text())["steps"] == 4
        samples = [json.loads(line) for line in (project / f"samples/{name}.jsonl").read_text().splitlines()]
        assert {row["seed"] for row in samples} == {0, 1}
        reports[name] = json.loads((project / f"metrics/{name}/eval.json").read_text())
        assert (project / f"metrics/{name}/eval_quality.png").stat().st_size > 0
    assert set(reports["owt"]["samplers"]) == {"sde-4", "ode-2"}
    assert reports["owt"]["reference"]["oracle_ppl"] > 1
    assert reports["owt"]["primary"]["metric"] == "gen_ppl"  # under the judge trained on the owt rows
    reference = reports["owt"]["reference"]
    assert reference["gen_ppl"] > 1 and reference["gen_ppl_shuffled"] > 1 and reports["owt"]["judge"]["validation_ppl"]
    assert {"bleu", "bleu_cased", "rougeL"} <= set(reports["wmt14"]["samplers"]["ode-4"])
    assert reports["xsum"]["primary"]["metric"] == "rougeL"

    # DVC's metrics are a few numbers per dataset (what `dvc exp show` compares); the curves are data plots.
    shown = json.loads(run(str(BIN / "dvc"), "metrics", "show", "--json", cwd=project))
    files = next(iter(shown.values()))["data"]
    assert sorted(files) == sorted(f"metrics/{n}/{f}" for n in ("owt", "wmt14", "xsum")
                                   for f in ("train.json", "headline.json"))
    # steps, loss, decode_acc, val_loss ± SE; primary ± SE and whether it is ranked (a null is left out)
    assert 18 <= sum(len(entry["data"]) for entry in files.values()) <= 24
    assert set(files["metrics/wmt14/headline.json"]["data"]) == {"bleu", "bleu_se", "ranked"}
    plots = json.loads(run(str(BIN / "dvc"), "plots", "show", "--json", "--split", cwd=project))
    assert "metrics/xsum/train_history.csv" in json.dumps(plots) and "metrics/owt/samplers.csv" in json.dumps(plots)

    # MLflow: one run per training, with the evaluation on the same run, and the registered models.
    import mlflow

    # A client of its own: mlflow.set_tracking_uri would also set MLFLOW_TRACKING_URI for the rest of the session.
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    for name in ("owt", "wmt14", "xsum"):
        run_id = (project / f"models/{name}/mlflow_run_id").read_text().strip()
        metrics = client.get_run(run_id).data.metrics
        assert "loss" in metrics and any(key.startswith("eval/") for key in metrics)
        model = client.get_registered_model(f"elf-{name}")
        assert set(model.aliases) >= {"candidate"}
    # Gen PPL is compared under the same judge only: the version's figure names its judge.
    tags = client.get_model_version("elf-owt", "1").tags
    assert any(key.startswith("gen_ppl/trained-") for key in tags), tags
    lock = (project / "dvc.lock").read_text()

    second = run(str(BIN / "dvc"), "repro", cwd=project)
    assert "Data and pipelines are up to date." in second
    assert (project / "dvc.lock").read_text() == lock

    # A kill while DVC rewrites dvc.lock in place leaves it empty or cut mid-record: `elf lock repair` (what
    # `make demo` and the flows run before DVC) restores the last good copy, and nothing has to rerun.
    run(str(BIN / "elf"), "lock", "save", cwd=project)
    for broken in ("", lock[: len(lock) // 2].rsplit("\n", 3)[0] + "\n"):
        (project / "dvc.lock").write_text(broken)
        check = subprocess.run([str(BIN / "elf"), "lock", "check"], cwd=project, capture_output=True, text=True)
        assert check.returncode == 1 and ("empty" in check.stderr or "missing for" in check.stderr
                                          or "cut short" in check.stderr), check.stderr
        assert "restored the good copy" in run(str(BIN / "elf"), "lock", "repair", cwd=project)
        assert (project / "dvc.lock").read_text() == lock
        assert "Data and pipelines are up to date." in run(str(BIN / "dvc"), "repro", cwd=project)

    # A file in a dataset's input folder is a dependency of that dataset's prepare stage only.
    (project / "data/input/wmt14/extra.jsonl").write_text('{"de": "hallo", "en": "hello"}\n')
    assert list(json.loads(run(str(BIN / "dvc"), "status", "--json", cwd=project))) == ["prepare@wmt14"]
    (project / "data/input/wmt14/extra.jsonl").unlink()

    # One dataset's setting marks that dataset's stage only (each stage depends on its own params sections).
    original = (project / "params.yaml").read_text()
    for change, stage in [(lambda p: p["train"]["datasets"]["wmt14"].update(steps=5), "train@wmt14"),
                          (lambda p: p["sample"]["samplers"]["owt"][0].update(steps=5), "sample@owt")]:
        params = yaml.safe_load(original)
        change(params)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        status = json.loads(run(str(BIN / "dvc"), "status", "--json", cwd=project))
        assert list(status) == [stage], status
    (project / "params.yaml").write_text(original)

    # Changing the evaluation seeds reruns sampling and evaluation only, never training.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sample"]["seeds"] = [0]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(str(BIN / "dvc"), "repro", cwd=project)
    assert "Running stage 'sample@owt'" in third and "Running stage 'evaluate@xsum'" in third
    assert "Running stage 'train@" not in third and "Running stage 'embed@" not in third

    # nproc_per_node 2: the train stage launches torchrun (2 gloo processes here) and resumes the 1-process run.
    params["train"]["datasets"]["owt"].update(steps=6, nproc_per_node=2)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = run(str(BIN / "dvc"), "repro", "train@owt", cwd=project)
    assert "launching torchrun --standalone --nproc-per-node 2" in fourth
    assert "resuming at step 4, 2 process(es)" in fourth
    assert json.loads((project / "metrics/owt/train.json").read_text())["steps"] == 6

"""`dvc repro` of the real dvc.yaml in a temporary git repository, on a tiny demo configuration."""

import shutil
import subprocess

import pytest
import yaml

from elf.data.shards import verify_shards
from tests.conftest import BIN, REPO

pytestmark = pytest.mark.slow

PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "pyproject.toml"]


def tiny_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    datasets = params["datasets"]
    datasets["owt"]["demo"].update(train_size=300, validation_size=20)
    datasets["wmt14"]["demo"].update(train_size=200, validation_size=20, test_size=20)
    datasets["xsum"]["demo"].update(train_size=100, validation_size=10, test_size=10)
    params["tokenizer"]["vocab_size"] = 400
    params["encoder"]["scratch"].update(d_model=32, num_layers=1, num_heads=2, d_ff=64, steps=10, batch_size=8)
    return params


def run(*cmd: str, cwd) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def project(tmp_path):
    """A copy of the repository's pipeline definition and code in a fresh git + DVC repository."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in PROJECT_FILES:
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "elf", repo / "elf", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    run("git", "init", "-q", cwd=repo)
    run(str(BIN / "dvc"), "init", "-q", cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=repo)
    return repo


def test_dvc_repro_builds_data_stages_and_second_run_does_nothing(project):
    run(str(BIN / "dvc"), "repro", cwd=project)
    for name in ("owt", "wmt14", "xsum"):
        assert (project / f"data/raw/{name}/train.parquet").is_file()
        manifest = verify_shards(project / f"data/tokens/{name}/train")
        assert manifest["rows"] > 0 and manifest["tokenizer_hash"]
    assert (project / "data/raw/owt/grammar.json").is_file()
    assert (project / "data/tokenizer/tokenizer.json").is_file()
    assert (project / "data/encoder/encoder.json").is_file()
    lock = (project / "dvc.lock").read_text()

    second = run(str(BIN / "dvc"), "repro", cwd=project)
    assert "Data and pipelines are up to date." in second
    assert (project / "dvc.lock").read_text() == lock

    # Changing one dataset's length reruns only that dataset's tokenize stage.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["datasets"]["wmt14"]["max_length"] = 60
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(str(BIN / "dvc"), "repro", cwd=project)
    assert "Running stage 'tokenize@wmt14'" in third
    assert "Running stage 'tokenize@owt'" not in third and "Running stage 'tokenizer'" not in third

"""Shared test setup: offline, telemetry off, and helpers to run the real `elf` command."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

for key, value in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    # One torch thread in the tests and the `elf` commands they start (params with `threads: null` read it; the
    # test projects set `threads: 1`): the test
    # machines share 2 cores, where two spinning threads per process make everything several times slower.
    "OMP_NUM_THREADS": "1",
    # The tests are the CPU path (gloo, fp32), also on a machine with GPUs; bench/gpu_check.py checks the GPU.
    "CUDA_VISIBLE_DEVICES": "",
}.items():
    os.environ[key] = value
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"


def run_elf(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed `elf` console script as a user would."""
    result = subprocess.run([str(BIN / "elf"), *args], cwd=cwd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"elf {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture
def one_thread():
    """Small matmuls run far faster on one thread than on two contended ones (the test machines share 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


STAGES = [["prepare", "owt"], ["tokenizer"], ["tokenize", "owt"], ["encoder"], ["embed", "owt"], ["judge", "owt"],
          ["train", "owt"], ["sample", "owt"], ["evaluate", "owt"]]


def tiny_owt_params() -> dict:
    """The demo configuration cut to one small dataset: every stage runs in seconds."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["threads"] = 1  # the test machines share 2 cores (see ENV above)
    params["evaluate"]["trained_judge"].update(layers=1, hidden=32, heads=2, steps=20, batch_size=8)
    params["datasets"] = {"owt": params["datasets"]["owt"]}
    params.pop("compare", None)  # it names wmt14
    params["datasets"]["owt"]["demo"].update(train_size=120, validation_size=10)
    params["tokenizer"]["vocab_size"] = 300
    params["embed"]["cache"] = {"owt": True}
    params["train"]["defaults"].update(steps=2, batch_size=4, checkpoint_every=2, log_every=1,
                                       model={"depth": 1, "hidden": 32, "heads": 2, "bottleneck": 16})
    params["train"]["datasets"] = {"owt": {}}
    params["sample"].update(num_samples=2, batch_size=2, seeds=[0])
    params["sample"]["samplers"] = {"owt": [{"name": "ode-2", "kind": "ode", "steps": 2, "guidance": 3.0}]}
    params["evaluate"].update(primary_metric={}, register_model=False)
    return params


@contextlib.contextmanager
def inside(directory: Path):
    """Run with `directory` as the working directory (the `elf` stages' paths are relative to it)."""
    before = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def mlflow_store_in(directory: Path):
    """MLflow records in `directory`/mlruns.db while in-process stages run there (MLflow keeps the URI it was
    last given process-wide, in MLFLOW_TRACKING_URI too, so it is set explicitly and restored)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{directory / 'mlruns.db'}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """A small owt-only project with every stage run once (in this process): copy it, never change it."""
    import yaml

    from elf.cli import main

    root = tmp_path_factory.mktemp("built")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_owt_params(), sort_keys=False))
    with inside(root), mlflow_store_in(root):
        for args in STAGES:
            assert main(args) == 0, args
    return root

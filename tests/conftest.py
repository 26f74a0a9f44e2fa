"""Shared test setup: offline, telemetry off, and helpers to run the real `elf` command."""

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
    # One torch thread in the tests and the `elf` commands they start (`threads: null` reads it): the test
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

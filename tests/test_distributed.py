"""Multi-process training plumbing: NCCL-safe collectives and the torchrun launch of `elf train`."""

import ast
from pathlib import Path

import pytest
import torch

from elf.distributed import Dist, all_reduce, launch_torchrun, resolve_nproc
from tests.conftest import REPO

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "gather", "scatter", "send", "recv", "barrier"}


def test_all_reduce_puts_its_tensor_on_the_process_groups_device(monkeypatch):
    """NCCL rejects CPU tensors. The group's device here is `meta` (a stand-in for cuda:N that a CPU machine
    has), so a tensor that reached the collective from the CPU would show up as such."""
    seen = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *a, **k: seen.append(tensor.device))
    d = Dist(rank=0, world=2, device=torch.device("meta"))
    out = all_reduce(torch.tensor([3.0]), d)
    assert seen == [torch.device("meta")] and out.device == torch.device("meta")


def test_one_process_needs_no_collective(monkeypatch):
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: pytest.fail("no collective expected"))
    assert all_reduce(torch.tensor([3.0]), Dist(0, 1, torch.device("cpu"))).tolist() == [3.0]


def _direct_collectives(path: Path) -> list[str]:
    """Calls such as `dist.all_reduce(...)` or `torch.distributed.barrier(...)` in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed", "distributed"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node.func)}")
    return found


def test_every_collective_goes_through_the_device_safe_helpers():
    sources = [p for folder in ("elf", "flows", "bench") for p in (REPO / folder).rglob("*.py")]
    offenders = [hit for path in sources if path.name != "distributed.py" for hit in _direct_collectives(path)]
    assert offenders == [], "call elf.distributed.all_reduce / barrier instead"


def test_nproc_auto_is_one_process_per_visible_gpu():
    assert resolve_nproc(3) == 3
    assert resolve_nproc("auto") == max(1, torch.cuda.device_count())


def test_a_worker_that_fails_on_bad_input_makes_the_launch_exit_2(tmp_path):
    """torchrun exits 1 for any worker failure; a bad input must stay a permanent error (2) for the flows."""
    code = launch_torchrun(2, ["--params", str(tmp_path / "missing.yaml"), "train", "owt"])
    assert code == 2

"""Multi-process training plumbing: NCCL-safe collectives and the torchrun launch of `elf train`."""

import ast
from pathlib import Path

import pytest
import torch

from elf.distributed import Dist, all_reduce, launch_torchrun, resolve_nproc
from elf.errors import ElfError
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
    """Uses of torch.distributed collectives in one source file: `dist.all_reduce(...)` under any alias of the
    module, `torch.distributed.barrier(...)`, or `from torch.distributed import all_reduce`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = {"torch.distributed"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"{path.relative_to(REPO)}:{node.lineno}: import {a.name}"
                      for a in node.names if a.name in COLLECTIVES]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            if ast.unparse(node.func.value) in aliases:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node.func)}")
    return found


def test_every_collective_goes_through_the_device_safe_helpers(tmp_path):
    sources = [p for folder in ("elf", "flows", "bench") for p in (REPO / folder).rglob("*.py")]
    offenders = [hit for path in sources if path.name != "distributed.py" for hit in _direct_collectives(path)]
    assert offenders == [], "call elf.distributed.all_reduce / barrier instead"
    # The scan finds the spellings it must find.
    sample = REPO / "elf" / ".scan_sample.py"
    try:
        sample.write_text("import torch.distributed as td\nfrom torch import distributed\n"
                          "from torch.distributed import barrier\ntd.all_reduce(x)\ndistributed.broadcast(x, 0)\n"
                          "import torch\ntorch.distributed.all_gather(a, b)\n")
        assert len(_direct_collectives(sample)) == 4
    finally:
        sample.unlink()


def test_nproc_auto_is_one_process_per_visible_gpu(monkeypatch):
    import elf.distributed as distributed

    assert (resolve_nproc(3), resolve_nproc("auto")) == (3, 1)  # no GPU visible: CPU processes as asked
    monkeypatch.setattr(distributed, "visible_gpus", lambda: 4)
    assert (resolve_nproc("auto"), resolve_nproc(2)) == (4, 2)
    with pytest.raises(ElfError, match="nproc_per_node 8 exceeds the 4 visible GPU"):
        resolve_nproc(8)


def test_a_worker_that_fails_on_bad_input_makes_the_launch_exit_2(tmp_path):
    """torchrun exits 1 for any worker failure; a bad input must stay a permanent error (2) for the flows."""
    code = launch_torchrun(2, ["--params", str(tmp_path / "missing.yaml"), "train", "owt"])
    assert code == 2


def test_sigterm_to_the_launch_stops_every_worker(tmp_path):
    """A killed stage (DVC, a Prefect retry, Ctrl-C) must leave no worker behind holding a GPU."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import sys\nfrom elf.distributed import launch_torchrun\n"
              f"sys.exit(launch_torchrun(2, [{str(tmp_path)!r}], module='tests.sleeping_worker'))\n")
    launcher = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    pid_files = [tmp_path / f"worker-{rank}.pid" for rank in (0, 1)]
    deadline = time.time() + 60
    while not all(p.is_file() and p.read_text() for p in pid_files) and time.time() < deadline:
        time.sleep(0.2)
    pids = [int(p.read_text()) for p in pid_files]
    launcher.send_signal(signal.SIGTERM)
    code = launcher.wait(timeout=60)
    assert code != 0

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    deadline = time.time() + 30
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in pids)

"""Processes of a training run: the `torchrun` environment, the process group and its collectives.

    torchrun --standalone --nproc-per-node 8 -m elf.cli train owt     # what `elf train` runs for you when
                                                                       # train.*.nproc_per_node is 8 (or auto)

NCCL (GPUs) accepts only CUDA tensors in a collective; gloo (CPUs, the tests) accepts CPU tensors too, so a
stray CPU tensor passes every CPU test and crashes the first multi-GPU step. Hence every collective of the
project goes through `all_reduce` / `barrier` below, which put the tensor on the process group's device
first (a test checks that no other module calls `torch.distributed` collectives itself).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from elf.errors import PERMANENT_EXIT_CODES, ElfError

#: Set by torchrun in each worker; its presence means "already launched".
LAUNCHED_ENV = "LOCAL_RANK"
#: A file where a worker that stops on a bad input (exit 2) says so: torchrun itself exits 1 for any failure,
#: and the flows must tell a permanent error (2) from one a retry can fix (1).
WORKER_EXIT_FILE_ENV = "ELF_WORKER_EXIT_FILE"


@dataclass(frozen=True)
class Dist:
    """This process: its rank, the number of processes and the device its work and collectives use."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """One process, or the `torchrun` environment: NCCL on GPUs (one per local rank), gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get(LAUNCHED_ENV, "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Dist(rank, world, device)


def all_reduce(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """Σ of `values` over the processes, as a tensor on the group's device `d.device` (NCCL-safe: a CPU
    tensor is copied there first). With one process, `values` on that device. Shapes are unchanged."""
    values = values.to(d.device)
    if d.world > 1:
        dist.all_reduce(values)
    return values


def barrier(d: Dist) -> None:
    """Wait for every process (on GPUs, NCCL's barrier runs on the device this process set)."""
    if d.world > 1:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def visible_gpus() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES honoured)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_nproc(setting: int | str) -> int:
    """`train.*.nproc_per_node` as a number: `auto` is one process per visible GPU (1 without GPUs). More
    processes than visible GPUs on a GPU machine is an error (each process needs its own GPU)."""
    gpus = visible_gpus()
    if setting == "auto":
        return max(1, gpus)
    if gpus and int(setting) > gpus:
        raise ElfError(f"params.yaml: train nproc_per_node {setting} exceeds the {gpus} visible GPU(s) "
                       "(use auto, or set CUDA_VISIBLE_DEVICES)")
    return int(setting)


def launch_torchrun(nproc: int, argv: list[str], module: str = "elf.cli") -> int:
    """Run `elf <argv>` (`python -m <module> <argv>`) as `torchrun --standalone --nproc-per-node nproc` workers;
    return the exit code.

    torchrun's own code is kept, except that a worker which failed in a way a retry cannot fix (it wrote exit
    code 2 or 3, elf/errors.py, to the file named by ELF_WORKER_EXIT_FILE) makes the result that code.
    SIGTERM / SIGINT are passed on to torchrun, which stops its workers, so a killed stage leaves no orphaned
    process (the next run resumes from the last checkpoint). Multi-node runs call torchrun directly (README:
    "Training on GPUs").
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", module, *argv]
    with tempfile.TemporaryDirectory(prefix="elf-launch-") as tmp:
        exit_file = Path(tmp) / "worker-exit"
        started: list[subprocess.Popen] = []

        def forward(signum, _frame) -> None:
            for process in started:
                process.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            # A session of its own: a signal to this process group (Ctrl-C, a kill of the stage) reaches torchrun
            # once, through `forward`, not twice while it is stopping its workers.
            started.append(subprocess.Popen(command, env={**os.environ, WORKER_EXIT_FILE_ENV: str(exit_file)},
                                            start_new_session=True))
            code = started[0].wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if code < 0:  # torchrun itself died of a signal: the shell's convention
            return 128 - code
        recorded = [int(c) for c in exit_file.read_text().split()] if exit_file.is_file() else []
        permanent = [c for c in recorded if c in PERMANENT_EXIT_CODES]
        return permanent[0] if code != 0 and permanent else code


def record_worker_exit(code: int) -> None:
    """In a launched worker: leave `code` where `launch_torchrun` reads it (no-op outside a launch)."""
    path = os.environ.get(WORKER_EXIT_FILE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{code}\n")

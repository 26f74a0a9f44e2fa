"""How torch runs on this machine: CPU threads, TF32 for fp32 matmuls on GPUs, bf16 autocast (elf-method §8).

Light on imports (torch only), so that the GPU benchmark can use it without the pipeline's dependencies.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch


def default_threads() -> int:
    """OMP_NUM_THREADS when set (the tests set 1), else the physical cores: on a 2-core machine two threads
    per core fight for it and a step runs several times slower when anything else runs."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover - psutil is a dependency; the GPU benchmark may lack it
        physical = None
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(physical or allowed or 1, allowed or 1))  # a container may get fewer cores than the host


def on_terminal() -> bool:
    """Whether progress bars make sense: stderr is a terminal. Elsewhere (DVC under a Prefect worker, a batch
    job's log file) every redraw would be a log line of its own, tens of thousands at paper scale."""
    return sys.stderr.isatty()


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (`threads` in params.yaml; None: `default_threads()`); returns the count."""
    count = threads or default_threads()
    torch.set_num_threads(count)
    return count


def configure_device(device: torch.device) -> None:
    """On CUDA let fp32 matmuls and convolutions use TF32 (the regions §8 keeps in fp32: projections, heads,
    the loss math); the bf16 regions are unaffected. Nothing to do on CPUs."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """§8 bf16 autocast on CUDA (the model keeps its projections and heads in fp32); a no-op on CPUs, where
    bf16 matmuls are slow on most processors and the demo's numbers stay fp32."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()

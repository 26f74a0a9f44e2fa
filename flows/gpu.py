"""The `gpu` global concurrency limit: one slot per GPU, held while a step uses a GPU.

Any number of flow runs may be in flight; the limit decides how many of them use GPUs at once, on one
machine or across a cluster (the limit lives on the Prefect server). A run waiting for a slot shows as
waiting in the UI, and starts as soon as one frees. A limit that does not exist would not block at all,
so a run creates it (with one slot per visible GPU, at least one) when an administrator has not.

Each hold can be appended as one JSON line to the file named by `ELF_GPU_LEDGER` (acquired/released
timestamps, dataset, step, flow run): a cheap record to check that holds never overlap and to measure
how long queued runs wait.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

GPU_LIMIT = "gpu"
LEDGER_ENV = "ELF_GPU_LEDGER"


def count_gpus() -> int:
    """GPUs on this machine per `nvidia-smi -L` (no torch import: it costs seconds in every flow run)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def default_slots() -> int:
    return max(1, count_gpus())


def visible_gpus() -> int:
    """GPUs a stage started from here may use: CUDA_VISIBLE_DEVICES when set (as torch counts), else all."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return count_gpus()
    return len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")])


def ensure_gpu_limit(slots: int | None = None, update: bool = False) -> int:
    """Create the `gpu` limit if missing (or, with `update`, set its slots); return its slot count."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    wanted = slots if slots is not None else default_slots()
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=wanted))
                return wanted
            except ObjectAlreadyExists:  # another run created it a moment ago
                limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        if update and limit.limit != wanted:
            client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=wanted))
            return wanted
        return limit.limit


def training_gpus(project, dataset: str) -> int:
    """`gpu` slots `train@<dataset>` holds: one per process (`nproc_per_node`; `auto`: every visible GPU), and
    one on a machine without GPUs, where its processes share the CPU like any other step."""
    from elf.config import load_config

    setting = load_config(project / "params.yaml").train.for_dataset(dataset).nproc_per_node
    gpus = visible_gpus()
    if gpus == 0:
        return 1
    return gpus if setting == "auto" else setting


@contextlib.contextmanager
def gpu_slot(dataset: str, step: str, logger, slots: int = 1) -> Iterator[None]:
    """Hold `slots` slots of the `gpu` limit for the body (one per GPU the step uses); log the wait and
    record the hold in the ledger. Asking for more slots than the limit has is an error, not a wait forever."""
    from prefect.concurrency.sync import concurrency
    from prefect.context import get_run_context

    from flows.stages import PermanentStageError

    limit = ensure_gpu_limit()
    if slots > limit:
        raise PermanentStageError(f"error: {step} {dataset} needs {slots} GPUs but the '{GPU_LIMIT}' concurrency "
                                  f"limit has {limit} slots (prefect gcl update {GPU_LIMIT} --limit {slots}, or "
                                  f"lower train.nproc_per_node)")
    asked = time.time()
    # A failed lease renewal (a server restart, a network blip) must not kill hours of training: the run
    # keeps going, at the risk of the lease expiring and another run starting on a busy GPU meanwhile.
    with concurrency(GPU_LIMIT, occupy=slots, strict=True, raise_on_lease_renewal_failure=False):
        acquired = time.time()
        logger.info("%d gpu slot(s) acquired for %s %s after %.1f s", slots, step, dataset, acquired - asked)
        try:
            yield
        finally:
            released = time.time()
            ledger = os.environ.get(LEDGER_ENV)
            if ledger:
                context = get_run_context()
                flow_run = getattr(context, "task_run", None) and context.task_run.flow_run_id
                record = {"dataset": dataset, "step": step, "slots": slots, "asked": asked, "acquired": acquired,
                          "released": released, "flow_run_id": str(flow_run), "host": socket.gethostname(),
                          "pid": os.getpid()}
                with open(ledger, "a", encoding="utf-8") as handle:  # one short append: atomic enough
                    handle.write(json.dumps(record) + "\n")

"""MLflow: where runs, metrics and models are recorded.

The store is `sqlite:///mlruns.db` in the working directory unless `MLFLOW_TRACKING_URI` says otherwise
(e.g. a team's `mlflow server`). Stages log here; nothing in the library needs MLflow to compute.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

from elf.errors import ElfError

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def git_commit() -> str | None:
    """The commit the code ran at (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → MLflow params (`a.b.c`: value); MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


@contextlib.contextmanager
def mlflow_run(experiment: str, run_name: str, params: Mapping[str, Any] | None = None,
               tags: Mapping[str, str] | None = None, run_id: str | None = None) -> Iterator[Any]:
    """Start (or, with `run_id`, reopen) a run; an unreachable tracking server is a one-line error."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        if run_id is None:
            mlflow.set_experiment(experiment)
    except Exception as error:  # MLflow raises several types for an unreachable or broken store
        raise ElfError(f"MLflow tracking store {uri} is not reachable ({str(error).splitlines()[0]})") from None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
        if params:
            mlflow.log_params(flatten(params))
        commit = git_commit()
        mlflow.set_tags({**({"git_commit": commit} if commit else {}), **(tags or {})})
        yield run

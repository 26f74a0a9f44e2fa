"""Where a training's MLflow run is, for the flow's log and UI, and a reachability check before a run.

The flows never log to MLflow themselves (the stages do); they only point at what the stages recorded,
and refuse to start when the tracking server is down rather than failing after the data stages.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path

from flows.stages import PermanentStageError


def mlflow_run_link(project: Path, dataset: str) -> dict[str, str] | None:
    """Where the training run lives in MLflow: tracking URI, run id, and a browser URL when one exists.

    The run id comes from models/<ds>/mlflow_run_id (written by the train stage). For the default SQLite
    store the experiment id is read from the database directly (no mlflow import in the flow process)
    and the URL is the one `make mlflow-ui` serves; for a tracking server it is the server's own UI.
    """
    from elf.tracking import DEFAULT_TRACKING_URI, redact

    run_id_file = project / "models" / dataset / "mlflow_run_id"
    if not run_id_file.is_file():
        return None
    run_id = run_id_file.read_text(encoding="utf-8").strip()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    ui = os.environ.get("ELF_MLFLOW_UI_URL", "http://127.0.0.1:5000")
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        path = path if path.is_absolute() else project / path
        uri = f"sqlite:///{path}"
        experiment = None
        with contextlib.suppress(sqlite3.Error):  # a missing or busy database only costs the experiment id
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
                row = db.execute("SELECT experiment_id FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
                experiment = row[0] if row else None
    elif uri.startswith(("http://", "https://")):
        ui, experiment = redact(uri).rstrip("/"), _experiment_over_http(uri, run_id)
    else:
        return {"tracking_uri": redact(uri), "run_id": run_id}
    link = f"{ui}/#/experiments/{experiment}/runs/{run_id}" if experiment is not None else ui
    return {"tracking_uri": redact(uri), "run_id": run_id, "url": link}


def _experiment_over_http(uri: str, run_id: str) -> str | None:
    from elf.tracking import http_get

    try:
        with http_get(f"{uri.rstrip('/')}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=5) as r:
            return json.load(r)["run"]["info"]["experiment_id"]
    except (OSError, ValueError, KeyError):
        return None


def preflight_tracking() -> None:
    """An unreachable MLflow server fails the run now, naming the URL, instead of after the data stages."""
    from elf.errors import ElfError
    from elf.tracking import check_reachable, tracking_uri

    try:
        check_reachable(tracking_uri())
    except ElfError as error:
        raise PermanentStageError(f"error: {error}") from None

"""MLflow: where runs, metrics and models are recorded.

The store is `sqlite:///mlruns.db` in the working directory unless `MLFLOW_TRACKING_URI` says otherwise
(e.g. a team's `mlflow server`). Stages log here; nothing in the library needs MLflow to compute.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

from elf.errors import ElfError

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3's experiment type tag


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the default; a relative SQLite path is made absolute against the working
    directory, because MLflow caches one store per URI string: the same relative URI used again from another
    directory in one process would write to the first directory's database."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{os.path.abspath(uri.removeprefix('sqlite:///'))}"
    return uri


def redact(uri: str) -> str:
    """`uri` without user and password (`https://alice:pw@host:5000` → `https://host:5000`): for anything printed,
    logged or stored. A URI without credentials comes back unchanged."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def http_get(url: str, timeout: float):
    """GET `url` (urllib); credentials in it (`user:password@`) go into a Basic Authorization header, which
    urllib does not do by itself. Returns the open response; raises urllib's errors."""
    import base64
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    request = urllib.request.Request(redact(url))
    if parts.username is not None:
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    return urllib.request.urlopen(request, timeout=timeout)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds when an http(s) tracking server does not answer.

    MLflow's own client retries an unreachable server with backoff for minutes before giving up, which
    looks like a hang to whoever is waiting on a stage; one short probe first turns that into a one-line
    error naming the URL. Any HTTP answer counts as reachable (MLflow reports real API errors itself);
    other stores (sqlite, databricks, ...) are not probed.
    """
    import urllib.error

    if not uri.lower().startswith(("http://", "https://")):
        return
    try:
        http_get(f"{uri.rstrip('/')}/health", timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise ElfError(f"MLflow tracking server {redact(uri)} is not reachable ({reason}); start it or set "
                       "MLFLOW_TRACKING_URI to a reachable server (unset: sqlite:///mlruns.db)") from None


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


def local_store_lock(uri: str, timeout: float = 600.0) -> contextlib.AbstractContextManager:
    """An exclusive lock for a local SQLite store (`<db>.lock` beside it), else nothing.

    MLflow creates and migrates a fresh SQLite store on first use; two processes doing it at once fail, and
    can leave it half-migrated so that every later run fails. Registration decisions (read the champion,
    then move it) are made under the same lock, so two evaluations cannot both move `champion`. A server
    store serialises its own writes.
    """
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(f"{uri.removeprefix('sqlite:///')}.lock", timeout=timeout)


@contextlib.contextmanager
def mlflow_run(experiment: str, run_name: str, params: Mapping[str, Any] | None = None,
               tags: Mapping[str, str] | None = None, run_id: str | None = None,
               system_metrics: bool = False) -> Iterator[Any]:
    """Start (or, with `run_id`, reopen) a run; an unreachable tracking server is a one-line error.

    A `run_id` the store does not have (a checkpoint resumed against another store: a fresh clone, a
    `dvc exp run --temp` workspace) starts a new run instead, with a warning; `params` are logged on new runs.
    `system_metrics` samples CPU / memory / GPU use in the background (MLflow's monitor, needs psutil).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with local_store_lock(uri):  # the first user of a fresh SQLite store creates its tables
            if run_id is not None:
                try:
                    mlflow.MlflowClient(uri).get_run(run_id)
                except MlflowException:
                    print(f"warning: MLflow run {run_id} is not in {redact(uri)}; recording in a new run",
                          file=sys.stderr)
                    run_id = None
            if run_id is None:
                found = mlflow.set_experiment(experiment)
                if EXPERIMENT_KIND not in found.tags:  # the UI then opens on the training runs, not GenAI traces
                    mlflow.MlflowClient(uri).set_experiment_tag(found.experiment_id, EXPERIMENT_KIND,
                                                                "custom_model_development")
    except Exception as error:  # MLflow raises several types for an unreachable or broken store
        raise ElfError(f"MLflow tracking store {redact(uri)} is not reachable "
                       f"({redact(str(error).splitlines()[0])})") from None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                          log_system_metrics=system_metrics) as run:
        if params and run_id is None:
            mlflow.log_params(flatten(params))
        commit = git_commit()
        mlflow.set_tags({**({"git_commit": commit} if commit else {}), **(tags or {})})
        yield run


def register_candidate(name: str, run_id: str, artifact_path: str, metric: str, value: float | None,
                       higher_is_better: bool) -> dict[str, Any]:
    """Register the run's model as a new version of `name` with alias `candidate`; move `champion` to it only
    when it beats the current champion's `metric` (a tie keeps the champion; no champion yet → it becomes one).

    The comparison is returned and recorded as tags on the version and the run.
    """
    with local_store_lock(tracking_uri()):  # read the champion and move it as one step
        return _register(name, run_id, artifact_path, metric, value, higher_is_better)


def _register(name: str, run_id: str, artifact_path: str, metric: str, value: float | None,
              higher_is_better: bool) -> dict[str, Any]:
    import mlflow
    from mlflow.exceptions import MlflowException

    check_reachable(tracking_uri())
    client = mlflow.MlflowClient(tracking_uri())
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="ELF models; aliases: candidate (newest), champion (best)")
    # The run's logged model of that name (elf/mlflow_model.py): a version then loads with mlflow.pyfunc.
    run = client.get_run(run_id)
    logged = client.search_logged_models([run.info.experiment_id], max_results=1, order_by=[
        {"field_name": "creation_timestamp", "ascending": False}],
        filter_string=f"source_run_id = '{run_id}' AND name = '{artifact_path}'")
    if not logged:
        raise ElfError(f"MLflow run {run_id} has no logged model '{artifact_path}' (trained by an older version: "
                       "rerun its train stage, which resumes from the last checkpoint)")
    version = client.create_model_version(name, logged[0].model_uri, run_id=run_id, model_id=logged[0].model_id)
    client.set_registered_model_alias(name, "candidate", version.version)
    if value is not None:
        client.set_model_version_tag(name, version.version, metric, str(value))
    try:
        champion = client.get_model_version_by_alias(name, "champion")
        champion_value = champion.tags.get(metric)
        champion_value = float(champion_value) if champion_value is not None else None
    except MlflowException:
        champion, champion_value = None, None
    if value is None:
        moved, reason = False, f"candidate has no {metric}"
    elif champion is None:
        moved, reason = True, "no champion yet"
    elif champion_value is None:
        moved, reason = True, f"champion v{champion.version} has no {metric}"
    elif (value > champion_value) if higher_is_better else (value < champion_value):
        moved, reason = True, f"{metric} {value:.4g} beats champion v{champion.version} ({champion_value:.4g})"
    else:
        moved, reason = False, f"{metric} {value:.4g} does not beat champion v{champion.version} ({champion_value:.4g})"
    if moved:
        client.set_registered_model_alias(name, "champion", version.version)
    comparison = {"model": name, "version": int(version.version), "metric": metric, "value": value,
                  "champion_before": None if champion is None else int(champion.version),
                  "champion_value_before": champion_value, "champion_moved": moved, "reason": reason}
    client.set_model_version_tag(name, version.version, "champion_decision", reason)
    client.set_tag(run_id, "registry_decision", f"{name} v{version.version}: {reason}")
    return comparison


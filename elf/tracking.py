"""MLflow: where runs, metrics and models are recorded.

The store is `sqlite:///mlruns.db` in the working directory unless `MLFLOW_TRACKING_URI` says otherwise
(e.g. a team's `mlflow server`). Stages log here; nothing in the library needs MLflow to compute.
A store that cannot be opened is one line (`store_error`) whose exit code tells the flows whether to retry.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

from elf.errors import (
    EXIT_BAD_INPUT,
    EXIT_NEEDS_FIX,
    EXIT_TEMPORARY,
    ElfError,
    StoreError,
    describe_os_error,
    os_error_exit_code,
)

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
        raise StoreError(f"MLflow tracking server {redact(uri)} is not reachable ({reason}); start it or set "
                         "MLFLOW_TRACKING_URI to a reachable server (unset: sqlite:///mlruns.db)",
                         EXIT_TEMPORARY) from None


# The module SQLAlchemy imports for a database URI → the pip package that provides it.
_DRIVERS = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pg8000": "pg8000", "asyncpg": "asyncpg",
            "MySQLdb": "mysqlclient", "pymysql": "PyMySQL", "mysql": "mysql-connector-python", "pyodbc": "pyodbc",
            "pymssql": "pymssql"}
# What SQLite, SQLAlchemy, alembic and MLflow say about a file that is not (or no longer) an MLflow store.
_NOT_A_STORE = ("file is not a database", "database disk image is malformed", "no such table", "no such column",
                "out-of-date database schema", "can't locate revision", "no such revision")
# MLflow error codes a later attempt can get past (a busy or restarting server).
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED"}


def _one_line(error: BaseException) -> str:
    """The first line of `error` (its first sentence when long), without credentials of any URL in it."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if len(text) > 160:
        text = re.split(r"(?<=\.)\s+(?=[A-Z])", text, maxsplit=1)[0]
    return re.sub(r"(?<=://)[^/\s@]+@", "", text)


@contextlib.contextmanager
def _without_db_tracebacks() -> Iterator[None]:
    """MLflow logs a traceback for every SQLAlchemy OperationalError before it raises one; while the store is
    opened, the one line of `store_error` says it instead."""
    import logging

    logger = logging.getLogger("mlflow.store.db.utils")

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SQLAlchemy database error")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _not_a_store(uri: str, detail: str) -> StoreError:
    where = "move the file aside (it is left as it is)" if uri.startswith("sqlite:") else "fix or migrate the database"
    return StoreError(f"MLflow tracking store {redact(uri)} is not a usable MLflow store ({detail}); {where} or set "
                      "MLFLOW_TRACKING_URI to another store", EXIT_NEEDS_FIX)


def check_local_store(uri: str) -> None:
    """Refuse an existing SQLite file that is not an MLflow store before MLflow opens it.

    MLflow adds its tables to any SQLite database without them (another program's, or one whose first
    migration stopped half-way) and may fail only after changing it; this reads the file's table names
    (read-only) and leaves such a file exactly as it is. Call it under `local_store_lock`.
    """
    import sqlite3

    if not uri.startswith("sqlite:///"):
        return
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return  # MLflow creates a new store
    try:
        with contextlib.closing(sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as error:
        raise store_error(uri, error) from None
    if tables and not {"experiments", "alembic_version"} <= tables:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise _not_a_store(uri, f"an SQLite database without MLflow's tables; it has: {shown}")


def store_error(uri: str, error: BaseException) -> StoreError:
    """The one-line error, with the exit code that fits, for `error` raised while opening the store at `uri`.

    A store that is busy (a locked SQLite file, a server that does not answer) is transient: the flows retry
    it. A file that is not a usable MLflow store (not SQLite, another program's database, a schema this MLflow
    does not know) needs a person: it is never moved or deleted here, since it may hold every run so far. A
    missing database driver or a URI MLflow rejects is a setting. SQLAlchemy and MLflow wrap the database's
    own error (MLflow calls most of them TEMPORARILY_UNAVAILABLE), so the whole chain is read.
    """
    if isinstance(error, StoreError):  # already said (`check_local_store`)
        return error
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain and len(chain) < 10:
        chain.append(link)
        link = link.__cause__ or link.__context__
    root, shown, text = chain[-1], redact(uri), " ".join(str(e) for e in chain).lower()
    sqlite = uri.startswith("sqlite:")
    names = {type(e).__name__ for e in chain}
    missing = next((e.name for e in chain if isinstance(e, ModuleNotFoundError) and e.name), None)
    if missing:
        package = _DRIVERS.get(missing.split(".")[0], missing.split(".")[0])
        return StoreError(f"MLflow tracking store {shown} needs the Python module '{missing}', which is not "
                          f"installed (pip install '{package}'), or set MLFLOW_TRACKING_URI to another store",
                          EXIT_BAD_INPUT)
    if "database is locked" in text or "database table is locked" in text or "TimeoutError" in names or any(
            isinstance(e, TimeoutError) for e in chain):
        return StoreError(f"MLflow tracking store {shown} is busy ({_one_line(root)}); a retry may succeed",
                          EXIT_TEMPORARY)
    if any(marker in text for marker in _NOT_A_STORE) or "CommandError" in names or (
            sqlite and "CompileError" in names):
        found = re.search(r"found version (\S+), but expected (\S+)\)", str(chain[0]))
        return _not_a_store(uri, f"schema version {found[1]}, this MLflow expects {found[2]}; `mlflow db upgrade` "
                                 "migrates an older one" if found else _one_line(root))
    number = next((e.errno for e in chain if isinstance(e, OSError) and isinstance(e.errno, int)), None)
    if number is not None:
        path = next((e.filename for e in chain if isinstance(e, OSError) and e.filename), None)
        return StoreError(f"MLflow tracking store {shown}: {describe_os_error(number, path)}",
                          os_error_exit_code(number))
    if "OperationalError" in names:  # SQLite: a file it cannot open or write; a server: down or refusing
        return StoreError(f"MLflow tracking store {shown} cannot be used ({_one_line(root)})",
                          EXIT_NEEDS_FIX if sqlite else EXIT_TEMPORARY)
    code = next((e.error_code for e in chain if isinstance(getattr(e, "error_code", None), str)), None)
    # A connection lost on the way (an OSError without errno, e.g. from requests) or a busy server: retry.
    transient = code in _TRANSIENT_CODES or any(isinstance(e, OSError) for e in chain)
    return StoreError(f"MLflow tracking store {shown} cannot be used ({_one_line(error)})",
                      EXIT_TEMPORARY if transient else EXIT_BAD_INPUT)


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
               tags: Mapping[str, str] | None = None, run_id: str | None = None) -> Iterator[Any]:
    """Start (or, with `run_id`, reopen) a run; a store that cannot be opened is a one-line error (`store_error`).

    A `run_id` the store does not have (a checkpoint resumed against another store: a fresh clone, a
    `dvc exp run --temp` workspace) starts a new run instead, with a warning; `params` are logged on new runs.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        # The first user of a fresh SQLite store creates its tables.
        with local_store_lock(uri), _without_db_tracebacks():
            check_local_store(uri)
            if run_id is not None:
                try:
                    # MLflow reopens a run only inside the active experiment: make it the run's own (a process
                    # that trains several datasets, as `elf compare` does, last set another one)
                    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id)
                except MlflowException as error:
                    if error.error_code != "RESOURCE_DOES_NOT_EXIST":  # a broken store is no reason for a new run
                        raise
                    print(f"warning: MLflow run {run_id} is not in {redact(uri)}; recording in a new run",
                          file=sys.stderr)
                    run_id = None
            if run_id is None:
                found = mlflow.set_experiment(experiment)
                if EXPERIMENT_KIND not in found.tags:  # the UI then opens on the training runs, not GenAI traces
                    mlflow.MlflowClient(uri).set_experiment_tag(found.experiment_id, EXPERIMENT_KIND,
                                                                "custom_model_development")
        with _without_db_tracebacks():  # the first write: a store MLflow could not repair fails here
            active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
    except Exception as error:  # MLflow raises several types for an unreachable or broken store
        raise store_error(uri, error) from None
    with active as run:
        if params and run_id is None:
            mlflow.log_params(flatten(params))
        commit = git_commit()
        mlflow.set_tags({**({"git_commit": commit} if commit else {}), **(tags or {})})
        yield run


def latest_logged_model(client, run_id: str, name: str = "model"):
    """The newest logged model `name` of a run (an MLflow `LoggedModel`), or None."""
    run = client.get_run(run_id)
    logged = client.search_logged_models([run.info.experiment_id], max_results=1, order_by=[
        {"field_name": "creation_timestamp", "ascending": False}],
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
    return logged[0] if logged else None


def register_candidate(name: str, run_id: str, artifact_path: str, metric: str | None, value: float | None,
                       higher_is_better: bool, not_ranked: str | None = None) -> dict[str, Any]:
    """Register the run's model as a new version of `name` with alias `candidate`; move `champion` to it only
    when it may be ranked (`not_ranked` None: its samples pass elf/selection.py's checks) and beats the current
    champion's `metric` (a tie keeps the champion; no champion yet → it becomes one).

    The comparison is returned and recorded as tags on the version and the run.
    """
    with local_store_lock(tracking_uri()):  # read the champion and move it as one step
        return _register(name, run_id, artifact_path, metric, value, higher_is_better, not_ranked)


def _register(name: str, run_id: str, artifact_path: str, metric: str | None, value: float | None,
              higher_is_better: bool, not_ranked: str | None) -> dict[str, Any]:
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    check_reachable(uri)
    try:  # the first use of the store in this process, as in `mlflow_run`
        check_local_store(uri)
        client = mlflow.MlflowClient(uri)
        with _without_db_tracebacks():
            try:
                client.get_registered_model(name)
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                client.create_registered_model(name, description="ELF models; aliases: candidate (newest), "
                                               "champion (best)")
    except Exception as error:
        raise store_error(uri, error) from None
    # The run's logged model of that name (elf/mlflow_model.py): a version then loads with mlflow.pyfunc.
    logged = latest_logged_model(client, run_id, artifact_path)
    if logged is None:
        raise ElfError(f"MLflow run {run_id} has no logged model '{artifact_path}' (trained by an older version: "
                       "rerun its train stage, which resumes from the last checkpoint)")
    version = client.create_model_version(name, logged.model_uri, run_id=run_id, model_id=logged.model_id)
    client.set_registered_model_alias(name, "candidate", version.version)
    if value is not None and metric is not None:
        client.set_model_version_tag(name, version.version, metric, str(value))
    try:
        champion = client.get_model_version_by_alias(name, "champion")
        champion_value = champion.tags.get(metric)
        champion_value = float(champion_value) if champion_value is not None else None
    except MlflowException:
        champion, champion_value = None, None
    if not_ranked is not None:
        moved, reason = False, not_ranked
    elif metric is None:
        moved, reason = False, "no quality metric to rank by (set evaluate.judge)"
    elif value is None:
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


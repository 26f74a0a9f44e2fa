"""Running pipeline stages from flows: always through `dvc repro`, never around it.

DVC owns the DAG, staleness and caching, so a flow step is `dvc repro <targets>` in the project directory
(after a read-only `dvc status` for the shared upstream data, see `repro`): an up-to-date stage is skipped
by DVC, a stale one reruns, and `dvc.lock` records exactly what ran. This module starts those commands,
streams their output into the Prefect log, and sorts failures into two kinds:

- permanent: a stage exited with status 2 (bad input: a bad parameter, an unknown dataset, a missing file)
  or 3 (the machine refuses the work: disk full, read-only, a size limit), together with a one-line
  `error: ...` message (elf/errors.py). Retrying cannot help, so it raises `PermanentStageError` carrying
  that line, and the tasks' retry condition refuses to retry it;
- transient: any other failure (a killed process, out of memory, a lost node, a DVC lock held by another
  run, a passing I/O error, exit 75). It raises `StageFailed` and is retried; a retried `train@<ds>`
  resumes from its newest checkpoint because the stage itself does (`persist: true` keeps the checkpoints
  across `dvc repro` runs).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from elf.errors import PERMANENT_EXIT_CODES

# DVC's summary line for a failed stage command, e.g. "failed to run: elf train owt, exited with 2".
_EXIT_STATUS = re.compile(r"failed to run: .*, exited with (-?\d+)")


class StageFailed(RuntimeError):
    """A stage (or DVC itself) failed in a way a retry may fix."""


class PermanentStageError(RuntimeError):
    """Bad input: a retry would fail the same way. The message is the stage's own `error: ...` line."""


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry everything except permanent errors."""
    try:
        state.result()
    except PermanentStageError:
        return False
    except Exception:  # any other failure is worth another attempt
        return True
    return True


def classify(returncode: int, output_lines: Sequence[str], args: Sequence[str]) -> Exception:
    """The exception for a failed `dvc repro`: permanent when a stage exited 2 or 3, else transient.

    The message is the stage's own `error:` line when there is one (that is what the user must fix),
    else DVC's last `ERROR:` message (with the lines that continue it, e.g. which process holds a lock),
    else the exit status.
    """
    stage_status = None
    for line in output_lines:
        if match := _EXIT_STATUS.search(line):
            stage_status = int(match.group(1))
    errors = [line.strip() for line in output_lines if line.startswith("error: ")]
    if stage_status in PERMANENT_EXIT_CODES and errors:
        return PermanentStageError(errors[-1])
    starts = [i for i, line in enumerate(output_lines) if line.startswith("ERROR: ")]
    if errors:
        detail = errors[-1]
    elif starts:
        follow = list(itertools.takewhile(lambda line: line.strip(), output_lines[starts[-1] + 1:starts[-1] + 4]))
        detail = " ".join(line.strip() for line in [output_lines[starts[-1]], *follow])
    else:
        detail = f"exit status {returncode}"
    return StageFailed(f"dvc {' '.join(args)} failed: {detail}")


def tool_env() -> dict[str, str]:
    """The environment for `dvc` and the `elf` stage commands it starts.

    DVC runs stage commands with whatever `elf` is on PATH, so a worker started outside the virtualenv
    would run the wrong one (or none): when `dvc`/`elf` are not on PATH, the interpreter's own bin
    directory is put in front. An existing PATH that already has both is left alone, so a deliberate
    choice (a wrapper, another environment) wins.
    """
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not (shutil.which("dvc", path=env.get("PATH")) and shutil.which("elf", path=env.get("PATH"))):
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _printable(line: str) -> str:
    """A progress bar redraws with carriage returns; only its last state is worth a log line."""
    return line.rstrip("\n").split("\r")[-1].rstrip()


def run_dvc(args: Sequence[str], project: Path, logger: logging.Logger | logging.LoggerAdapter) -> list[str]:
    """Run `dvc <args>` in `project`, logging each output line; raise a classified error on failure.

    `--wait-for-lock` lets concurrent runs in one workspace queue on DVC's short repository lock instead
    of failing (DVC releases it while a stage command runs). The process gets its own session so that a
    cancelled task can stop the whole tree (dvc and the stage under it).
    """
    _guard_dvc_lock(project, logger)
    command = ["dvc", "--wait-for-lock", *args]
    logger.info("$ %s  (in %s)", " ".join(command), project)
    env = tool_env()
    tail: deque[str] = deque(maxlen=400)
    process = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", start_new_session=True,
                               executable=shutil.which("dvc", path=env["PATH"]))
    try:
        assert process.stdout is not None
        for raw in process.stdout:
            line = _printable(raw)
            if line:
                tail.append(line)
                logger.info(line)
        returncode = process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
    if returncode != 0:
        raise classify(returncode, list(tail), args)
    from elf.lockfile import save_good_copy

    save_good_copy(project)
    return list(tail)


def _guard_dvc_lock(project: Path, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Before a `dvc` call: restore dvc.lock from the last good copy if a kill broke it (elf/lockfile.py)."""
    from elf.errors import ElfError
    from elf.lockfile import repair

    try:
        notice = repair(project)
    except ElfError as error:
        raise PermanentStageError(f"error: {error}") from None
    if notice:
        logger.warning(notice)


def repro(targets: Sequence[str], project: Path, logger: logging.Logger | logging.LoggerAdapter,
          single_item: bool = False) -> list[str]:
    """`dvc repro <targets>`: DVC decides what is stale; the stages' output goes to the log.

    `single_item`: the targets only, in the order given, without walking their upstream stages. That
    matters when several runs share a workspace: `dvc repro` write-locks the outputs of every stage it
    walks, even of those it then skips, while a running stage read-locks its inputs; so a full walk
    (e.g. `train@owt`, passing `encoder`) fails with "is busy" whenever another dataset is training on
    `data/encoder`. The flows bring the upstream stages up to date first (`ensure_up_to_date`) and
    then reproduce each dataset's own stages alone.
    """
    return run_dvc(["repro", *(["--single-item"] if single_item else []), *targets], project, logger)


def ensure_up_to_date(targets: Sequence[str], project: Path, logger: logging.Logger | logging.LoggerAdapter) -> bool:
    """Reproduce `targets` with everything upstream, but only if `dvc status` finds something stale.

    `dvc status` only read-locks, so checking data that another run is training on is safe; a real
    rebuild needs the write locks and is refused while that run reads the data (a transient error,
    retried). Returns whether anything had to run.
    """
    lines = run_dvc(["status", "--json", "--with-deps", *targets], project, logger)
    if _last_json(lines) == {}:
        logger.info("%s and upstream stages are up to date", ", ".join(targets))
        return False
    repro(targets, project, logger)
    return True


def _last_json(lines: Sequence[str]) -> Any:
    """The last output line that is a JSON object (DVC may print warnings around it), else None."""
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


# -- the project and its parameters ---------------------------------------------------------------------------


def resolve_project(project_dir: str | os.PathLike | None) -> Path:
    """The repository root a flow works in: the given directory, else the working directory.

    A deployment's pull step sets the working directory (the local checkout, or a fresh clone on a
    cluster), so the default is right for deployments; tests and scripts pass a directory explicitly.
    """
    project = Path(project_dir or os.getcwd()).resolve()
    missing = [name for name in ("dvc.yaml", "params.yaml") if not (project / name).is_file()]
    if missing:
        raise PermanentStageError(f"error: {project}: not an ELF project ({', '.join(missing)} not found)")
    return project


def dataset_names(project: Path) -> list[str]:
    """The datasets `params.yaml` defines (the keys DVC's `foreach` fans out over)."""
    from elf.config import read_yaml
    from elf.errors import ElfError

    try:
        params = read_yaml(project / "params.yaml") or {}
    except ElfError as error:
        raise PermanentStageError(f"error: {error}") from None
    return list((params.get("datasets") or {}).keys())


def check_dataset(project: Path, dataset: str) -> None:
    """Reject an unknown dataset before DVC reports it as a missing stage (a retry would not help)."""
    known = dataset_names(project)
    if dataset not in known:
        raise PermanentStageError(f"error: unknown dataset '{dataset}' (params.yaml defines: {', '.join(known)})")


def flatten_overrides(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"defaults": {"steps": 8}}}` → `{"train.defaults.steps": 8}`: a nested override merges into
    the section instead of replacing it (and wiping its other keys). An empty mapping is a value."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_overrides(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def apply_overrides(project: Path, overrides: dict[str, Any]) -> list[str]:
    """Write `{"dotted.key": value}` overrides (or nested mappings) into params.yaml, validated first.

    This is what `dvc exp run -S key=value` does to the workspace, without the experiment bookkeeping:
    DVC tracks params.yaml values, so the stages that read a changed key rerun and `dvc.lock` records the
    values they ran with, which keeps it true. The file is validated with the pipeline's own config
    loader before it replaces the original, so a bad value fails here with the same one-line error a
    stage would print, and params.yaml is left untouched. Comments and order are kept (ruamel).
    """
    from elf.config import params_yaml, write_params
    from elf.errors import ElfError

    path = project / "params.yaml"
    round_trip = params_yaml()
    document = round_trip.load(path.read_text(encoding="utf-8"))
    changed = []
    for dotted, value in flatten_overrides(overrides).items():
        keys = str(dotted).split(".")
        node = document
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        if node.get(keys[-1]) != value:
            node[keys[-1]] = value
            changed.append(f"{dotted}={value!r}")
    if not changed:
        return []
    try:
        write_params(document, path, source="params.yaml")
    except ElfError as error:
        raise PermanentStageError(f"error: {error}") from None
    return changed

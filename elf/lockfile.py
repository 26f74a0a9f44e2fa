"""A guard for `dvc.lock`, which DVC rewrites in place: a kill during the write leaves it empty (every later
`dvc repro` fails) or cut short yet parseable (records silently lost, so stages rerun for nothing).

The project keeps the last good copy in `.dvc/tmp/` (ignored by git): the flows and `make demo` save it after
every successful `dvc` call, and every `elf` stage saves it when it starts (by then DVC has written the records
of the stages before it). Before their `dvc` calls the flows and `make demo` check the lock and restore the copy
when it is broken, with a notice; run by hand, an `elf` stage prints the one command that restores it.

    elf lock check     # exit 1 and one line if dvc.lock is broken
    elf lock repair    # restore the last good copy if it is; a no-op otherwise
    elf lock save      # keep the current dvc.lock as the good copy (if it is good)
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from elf.config import parse_yaml
from elf.errors import ElfError
from elf.files import atomic_file

LOCK = "dvc.lock"
GOOD_COPY = Path(".dvc") / "tmp" / "elf-dvc.lock.good"


def _stages(text: str, source: str) -> dict[str, Any]:
    data = parse_yaml(text, source)
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise ElfError(f"{source}: no 'stages' mapping")
    return data["stages"]


def lock_problem(project: Path) -> str | None:
    """Why `project/dvc.lock` is broken, in a few words, or None when it is fine (or absent: a fresh project).

    Broken: empty, unparseable, without stages, or shorter than the last good copy: a stage record the copy
    has is missing, or has lost keys (cut mid-record).
    """
    lock = project / LOCK
    if not lock.is_file():
        return None
    text = lock.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        return "it is empty"
    try:
        stages = _stages(text, LOCK)
    except ElfError as error:
        return f"it does not parse ({str(error).removeprefix(LOCK + ': ')})"
    good = project / GOOD_COPY
    if not good.is_file():
        return None
    try:
        good_stages = _stages(good.read_text(encoding="utf-8"), str(good))
    except ElfError:
        return None
    missing = sorted(name for name in good_stages if name not in stages)
    if missing:
        return f"records missing for {', '.join(missing)}"
    cut = sorted(name for name, record in good_stages.items()
                 if isinstance(record, dict) and isinstance(stages[name], dict) and set(record) - set(stages[name]))
    if cut:
        return f"records cut short for {', '.join(cut)}"
    return None


def _copy_atomically(source: Path, target: Path) -> None:
    with atomic_file(target) as tmp:
        shutil.copyfile(source, tmp)


def save_good_copy(project: Path) -> bool:
    """Keep `dvc.lock` as the last good copy when it is good (and this is a DVC project); returns whether it did."""
    lock = project / LOCK
    if not (project / ".dvc").is_dir() or not lock.is_file() or lock_problem(project) is not None:
        return False
    (project / GOOD_COPY).parent.mkdir(parents=True, exist_ok=True)
    _copy_atomically(lock, project / GOOD_COPY)
    return True


def repair(project: Path, settle_seconds: float = 1.0) -> str | None:
    """Restore the last good copy when `dvc.lock` is broken; returns the notice to print, or None if it was fine.

    A lock that another DVC process is writing this very moment looks broken for milliseconds: it counts as
    broken only if it is still broken, byte for byte the same, after `settle_seconds`. Raises ElfError when it
    is broken and no copy exists (the message says how to get one back from git)."""
    problem = lock_problem(project)
    if problem is None:
        return None
    before = (project / LOCK).read_bytes()
    time.sleep(settle_seconds)
    problem = lock_problem(project)
    if problem is None or (project / LOCK).read_bytes() != before:
        return None
    good = project / GOOD_COPY
    if not good.is_file():
        raise ElfError(f"{project / LOCK}: {problem}, and no good copy is kept; `git checkout {LOCK}` restores "
                       "the committed one")
    _copy_atomically(good, project / LOCK)
    saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(good.stat().st_mtime))
    return f"{project / LOCK}: {problem} (a kill while DVC wrote it?); restored the good copy of {saved}"


def warn_if_broken(project: Path) -> str | None:
    """For an `elf` stage started by hand: the one-line advice when `dvc.lock` is broken, else None (and the
    current lock saved as the good copy)."""
    problem = lock_problem(project)
    if problem is None:
        save_good_copy(project)
        return None
    return f"warning: {project / LOCK}: {problem}; `elf lock repair` restores the last good copy"

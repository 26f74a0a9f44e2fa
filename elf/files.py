"""Writing outputs so that no failure leaves a partial one, and OS errors that name their path.

Every stage writes each output under a temporary sibling name and renames it into place only when it is
complete, so a crash, a kill or a full disk never leaves a torn output where DVC or a later stage would
take it for a finished one; a failed write removes its temporary file or directory. The libraries that
write for us report OS errors in different shapes (Python's `OSError`, pyarrow's `OSError` without a
path, safetensors' and tokenizers' "(os error 28)" strings, torch's "enforce fail" when given a path),
so `naming_os_errors` turns all of them into one `OSError(errno, strerror, path)` that the CLI prints in
one line (`elf.errors.os_error_exit_code` says whether a retry can help).
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from elf.errors import ElfError

# How libraries spell an errno in their messages: "[Errno 28] …", "[errno 28] …", "… (os error 28)".
_ERRNO_IN_MESSAGE = re.compile(r"\[errno (\d+)\]|\(os error (\d+)\)", re.IGNORECASE)


def os_errno(error: BaseException) -> int | None:
    """The errno behind `error` or the exceptions it was raised from, whichever library raised it; else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno
        if match := _ERRNO_IN_MESSAGE.search(str(error)):
            number = int(match.group(1) or match.group(2))
            if number in errno_codes.errorcode:
                return number
        # The cause, else the exception being handled when it was raised, unless that was suppressed (`from None`).
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None


@contextlib.contextmanager
def naming_os_errors(path: str | Path, temporary: str | Path | None = None) -> Iterator[None]:
    """Re-raise any failure with an OS errno behind it as `OSError(errno, strerror, path)`.

    `path` is the output being written. An error that names another file (an input that could not be
    read) keeps its name; one that names nothing (pyarrow, safetensors, tokenizers) or names something
    under `temporary` (the hidden name `path` is written under) gets `path`.
    """
    try:
        yield
    except ElfError:
        raise
    except Exception as error:
        number = os_errno(error)
        if number is None:
            raise
        named = isinstance(error, OSError) and error.filename
        if named and not (temporary and str(error.filename).startswith(str(temporary))):
            raise
        raise OSError(number, os.strerror(number), str(path)) from error


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _remove_leftovers(final: Path) -> None:
    """Temporary siblings of `final` (`.<name>.tmp-<pid>`, `.<name>.old-<pid>`) left by writers that are gone: a
    kill, a crash. A live writer's are left alone (two processes may write the same file, e.g. torchrun workers)."""
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for stale in final.parent.glob(pattern):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; it replaces `final` only if the block succeeds.

    Leftovers of killed runs are removed first. On any failure the temporary file is removed and `final` is
    left as it was; OS errors name `final`.
    """
    final = Path(final)
    tmp = _tmp_name(final)
    try:
        with naming_os_errors(final, temporary=tmp):
            final.parent.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(final)
            yield tmp
            os.replace(tmp, final)
    finally:
        with contextlib.suppress(OSError):  # on a read-only file system even a missing file cannot be unlinked
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `final` only if the block succeeds.

    Leftover temporary directories of killed runs are removed first. On any exception the temporary
    directory is deleted and `final` is left as it was; OS errors name `final`.
    """
    final = Path(final)
    tmp = _tmp_name(final)
    with naming_os_errors(final, temporary=tmp):
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(final)
        tmp.mkdir()
        try:
            yield tmp
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing it; the old `dst` is moved aside first, then deleted."""
    if dst.exists():
        trash = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv_atomic(path: str | Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Rows with the same keys (`columns`, default the first row's) as a CSV file with a header, also when there
    are no rows (DVC's data plots read it); None is an empty cell."""
    import csv

    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or (list(rows[0]) if rows else []))
        writer.writeheader()
        writer.writerows(rows)


def read_json(path: str | Path, what: str = "file") -> dict[str, Any]:
    """A JSON object from `path`; a missing or malformed file is a one-line error naming it and `what` it is."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ElfError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ElfError(f"{path}: {what} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ElfError(f"{path}: {what} must be a JSON object")
    return data

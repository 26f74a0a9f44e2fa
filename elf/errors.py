"""The one exception type a user sees, and the exit codes that tell a scheduler whether a retry can help.

Every stage turns bad input into an `ElfError` whose message is a single line naming the file, row,
column or parameter at fault; the CLI prints it and exits `EXIT_BAD_INPUT`. An OS error (disk full, a
read-only or too-small file system) is printed the same way, naming its path, with an exit code that says
whether running the stage again can succeed without a person fixing something first. Anything else is a
bug (a traceback, exit 1, which the flows treat as transient). An `ElfError` carries its exit code
(`exit_code`, bad input unless said otherwise): a tracking store that is down, corrupt or lacks its driver
(`StoreError`, elf/tracking.py) needs a retry, a person, or a setting.
"""

import errno
import os

EXIT_BAD_INPUT = 2
"""Bad input or settings: a retry fails the same way."""
EXIT_NEEDS_FIX = 3
"""The machine refuses the work (disk full, read-only, size limit, no permission): fix it, then rerun."""
EXIT_TEMPORARY = 75  # EX_TEMPFAIL of sysexits.h
"""A passing OS failure (I/O error, stale network file handle, a timeout): a retry may succeed."""

PERMANENT_EXIT_CODES = frozenset({EXIT_BAD_INPUT, EXIT_NEEDS_FIX})

_NEEDS_FIX = {
    errno.ENOSPC: "free some space, then rerun",
    errno.EDQUOT: "free some space or raise the quota, then rerun",
    errno.EFBIG: "the file-size limit (ulimit -f) is too small for this output",
    errno.EROFS: "the file system is read-only; run where outputs can be written",
    errno.EACCES: "no permission; fix the permissions, then rerun",
    errno.EPERM: "no permission; fix the permissions, then rerun",
    errno.ENOENT: "a file or directory is missing",
    errno.ENOTDIR: "a file stands where a directory is expected",
    errno.EEXIST: "a file stands where a directory is to be made",
    errno.EISDIR: "a directory stands where a file is expected",
    errno.ENAMETOOLONG: "the path is too long",
    errno.ELOOP: "too many symbolic links",
    errno.EMFILE: "too many open files (ulimit -n)",
}


class ElfError(Exception):
    """Bad input or configuration, reported to the user as one line."""

    exit_code: int = EXIT_BAD_INPUT


class StoreError(ElfError):
    """The MLflow tracking store cannot be used; `exit_code` says whether a retry, a person or a setting helps."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # keep the code across pickling (args hold only the message)
        return type(self), (str(self), self.exit_code)


def os_error_exit_code(number: int) -> int:
    """`EXIT_NEEDS_FIX` for OS errors a rerun cannot get past on its own, else `EXIT_TEMPORARY`."""
    return EXIT_NEEDS_FIX if number in _NEEDS_FIX else EXIT_TEMPORARY


def describe_os_error(number: int, path: str | None) -> str:
    """One line: `<path>: <strerror> (<what to do>)`."""
    advice = _NEEDS_FIX.get(number, "a passing failure; rerunning may succeed")
    return f"{path + ': ' if path else ''}{os.strerror(number)} ({advice})"

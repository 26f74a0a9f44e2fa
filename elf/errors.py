"""The one exception type a user sees.

Every stage turns bad input into an `ElfError` whose message is a single line naming the file, row,
column or parameter at fault; the CLI prints it and exits non-zero. Anything else is a bug.
"""


class ElfError(Exception):
    """Bad input or configuration, reported to the user as one line."""

"""The one exception type for mistakes a user can fix (bad config, missing data, impossible mesh).

The CLI catches it, prints its message on stderr without a traceback and exits with code 2.
Everything else is a bug and keeps its traceback.
"""

import errno


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong and how to fix it."""


def need(cond: bool, message: str) -> None:
    """Raise UserError(message) unless `cond` (the config checks' one-line form)."""
    if not cond:
        raise UserError(message)


class RunAborted(Exception):
    """The run gave up on its own (a non-finite loss, a detector's `stop`): the CLI prints the message in
    one line and exits with code 4. Checkpoints already written are intact."""

    exit_code = 4


class DiskFull(Exception):
    """A write failed for lack of space (ENOSPC, a quota): the CLI prints the message in one line (which path
    is full, how much was needed) and exits with code 5. The previous checkpoint is intact."""

    exit_code = 5


def is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC / EDQUOT / EFBIG (or their message, from C++ writers like TensorStore) in the exception's chain."""
    for _ in range(20):
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False

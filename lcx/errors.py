"""User errors: mistakes a user can fix (a flag, a config value, a path, a workdir).

Code that checks what a user gave raises `UserError`, naming the config key or flag, the
value and what would be valid. `python -m lcx.main` prints it as one line,
`lcx: error: ...`, and exits with status `USER_ERROR` (LCX_DEBUG=1 shows the traceback);
any other exception keeps its traceback: it is a bug to report, not a mistake to fix.
`UserError` is a ValueError, so code that catches ValueError catches it too.
"""

from __future__ import annotations

import os
import sys

USER_ERROR = 2  # the exit status of every mistake a user can fix


class UserError(ValueError):
    """A mistake the user can fix; the message says what to change, on one line."""


def one_line(error: BaseException) -> str:
    """The exception's message with its line breaks folded into spaces."""
    return " ".join(str(error).split())


def exit_with(message: str, error: BaseException | None = None):
    """Print `lcx: error: message` and exit with USER_ERROR; with LCX_DEBUG=1 set, raise
    `error` instead (its traceback)."""
    if error is not None and os.environ.get("LCX_DEBUG"):
        raise error
    print(f"lcx: error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR)

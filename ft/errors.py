"""Exceptions the CLI turns into exit codes: UserError -> 2, Interrupted -> 128 + signal, a failed write -> 2."""

from __future__ import annotations

import errno
import os


class UserError(Exception):
    """A problem in the user's input (recipe, data, flags, files). The message says what and where."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint; `--resume` continues it."""

    def __init__(self, checkpoint: str | None, signum: int):
        super().__init__(checkpoint)
        self.checkpoint, self.signum = checkpoint, signum
        self.again: str | None = None  # the command that continues the run (ft.runner.run_stage sets it)


def first_line(error: BaseException, limit: int = 300, empty: str | None = None) -> str:
    """The first line of an error's message cut to `limit` characters, for a one-line message a person can read;
    `empty` (else the error's type name) when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else (empty if empty is not None else type(error).__name__)


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES}
_DISK_MESSAGES = ("no space left on device", "disk quota exceeded", "read-only file system", "file too large",
                  "file write failed", "storagefull")


def disk_error(error: BaseException) -> str | None:
    """A short description if `error` (or what caused it) is a failed write: disk full, quota, read-only,
    file too large, permission denied. Libraries wrap these differently: OSError (Python), SafetensorError
    "... (os error 28)" (safetensors), RuntimeError "file write failed" (torch.save)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
            return f"{error.filename + ': ' if error.filename else ''}{error.strerror or error}"
        text = str(error)
        for number in _DISK_ERRNOS:
            if f"(os error {number})" in text:
                return os.strerror(number)
        if any(m in text.lower() for m in _DISK_MESSAGES):
            return first_line(error)
        error = error.__cause__ or error.__context__
    return None

"""Errors and exit codes.

Every error a user can cause is an :class:`EdgeccError` subclass with a one-line message; the
CLI prints that line and exits with the class's code. Anything else is an internal error.

Exit codes (documented in the README):
    0  success
    1  internal error (a bug: rerun with ``--debug`` and report it)
    2  user error: bad arguments, missing or corrupt file, unknown target, ...
    3  unsupported operators: the model uses ops the lowering cannot handle
    4  check failed: ``run --check`` found outputs outside tolerance
    5  target toolchain missing (cross compiler, CUDA, emulator)
    130 interrupted (Ctrl-C, SIGTERM) before the package was written; an earlier package at
        the output path is kept

A message may span lines (ONNX Runtime's do): the CLI prints its first line, all with ``--debug``.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2
EXIT_UNSUPPORTED = 3
EXIT_CHECK_FAILED = 4
EXIT_TOOLCHAIN = 5
EXIT_INTERRUPTED = 130


class EdgeccError(Exception):
    """A failure the user can act on; ``str(err)`` is one readable line."""

    exit_code = EXIT_USER


class UserInputError(EdgeccError):
    """Bad arguments, missing/corrupt files, unknown names."""


class UnsupportedOperatorError(EdgeccError):
    """The model contains operators the target lowering cannot handle."""

    exit_code = EXIT_UNSUPPORTED

    def __init__(self, unsupported: list[tuple[str, int, list[str]]] | str):
        if isinstance(unsupported, str):  # a message with context added (the pass manager's)
            self.unsupported = []
            super().__init__(unsupported)
            return
        self.unsupported = unsupported
        parts = [f"{op} x{count} (e.g. {', '.join(names[:3])})" for op, count, names in unsupported]
        super().__init__("unsupported operators: " + "; ".join(parts))


class CheckFailedError(EdgeccError):
    """Outputs differ from the recorded reference beyond tolerance."""

    exit_code = EXIT_CHECK_FAILED


class ToolchainError(EdgeccError):
    """A compiler, emulator or device the target needs is not available."""

    exit_code = EXIT_TOOLCHAIN


class PassError(EdgeccError):
    """A pass failed; the message names the pass and the passes that ran before it."""

    exit_code = EXIT_INTERNAL


# OSErrors of the user's files and folders (permissions, read-only or full disks, a file where
# a folder is needed): the user acts on them, so they are user errors, not bugs.
_USER_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENOENT,
    errno.ENAMETOOLONG,
}


def as_user_error(err: BaseException) -> EdgeccError | None:
    """The user error an exception stands for (a file-system error naming a path), or None."""
    if isinstance(err, OSError) and err.errno in _USER_ERRNOS and err.filename:
        return UserInputError(f"cannot access {err.filename}: {err.strerror or err}")
    return None


def first_line(message: str) -> tuple[str, bool]:
    """A message's first non-empty line, and whether lines were left out."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if not lines:
        return "", False
    return lines[0], len(lines) > 1

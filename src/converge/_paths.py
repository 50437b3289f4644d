"""The check every public entry point taking a file-system path makes first."""

from __future__ import annotations

import os

from converge.errors import UsageError

__all__ = ["check_path"]


def check_path(value: object, name: str) -> str:
    """Return ``value`` as a ``str`` path the file system can take: non-empty, no NUL,
    encodable (a lone surrogate outside ``surrogateescape``'s range is not).

    Raises:
        UsageError: For anything else, naming the argument.
    """
    if not isinstance(value, str | os.PathLike):
        raise UsageError(f"{name} must be a path, not {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str) or not path or "\x00" in path:
        raise UsageError(f"{name} must be a non-empty str path (no NUL character)")
    try:
        os.fsencode(path)
    except UnicodeEncodeError as exc:
        raise UsageError(f"{name} {path!r} has no file-system encoding: {exc.reason}") from None
    return path

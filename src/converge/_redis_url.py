"""Redis URLs, checked and printed the same way by every part that connects to Redis
(``RedisStore``, ``RedisStreamsBridge``, the gateway's ``store`` setting)."""

from __future__ import annotations

import re
import urllib.parse

from converge._repr import safe_repr
from converge.errors import UsageError

__all__ = ["check_redis_url", "masked_url"]

_SCHEMES = ("redis://", "rediss://", "unix://")
_DATABASE = re.compile(r"/?|/\d+")  # the path of a redis:// URL: none, or the database


def masked_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for messages and logs).

    Works on malformed URLs too, which is when an error message shows one.
    """
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    user, at, host = netloc.rpartition("@")
    if not at or ":" not in user:
        return url
    return f"{scheme}{sep}{user.split(':', 1)[0]}:***@{host}{slash}{tail}"


def check_redis_url(url: object) -> str:
    """Return ``url`` if it is a usable ``redis://``, ``rediss://`` or ``unix://`` URL.

    Raises:
        UsageError: For anything else: another scheme, a port that is not a number in
            0-65535, no host (no socket path for ``unix://``), or a path other than a
            database number (``/0``).
    """
    shown = masked_url(url) if isinstance(url, str) else url
    if not isinstance(url, str) or not url.startswith(_SCHEMES):
        raise UsageError(
            f"url must be a redis://, rediss:// or unix:// URL, not {safe_repr(shown)}"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # parsed on access: raises for a bad port
    except ValueError as exc:
        raise UsageError(f"invalid Redis URL {shown!r}: {exc}") from None
    if parts.scheme == "unix":
        if not parts.path:
            raise UsageError(f"invalid Redis URL {shown!r}: no socket path (unix:///path)")
    elif not parts.hostname:
        raise UsageError(f"invalid Redis URL {shown!r}: no host")
    elif not _DATABASE.fullmatch(parts.path):
        raise UsageError(f"invalid Redis URL {shown!r}: the path is a database number, as in /0")
    return url

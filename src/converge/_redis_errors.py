"""Redis failures as converge's store errors, the same for every part that talks to Redis
(``RedisStore``, ``RedisStreamsBridge``)."""

from __future__ import annotations

from converge._chain import exception_chain
from converge.errors import StoreError, StoreOutcomeUnknownError, StoreUnavailableError

__all__ = ["redis_error"]


def redis_error(
    exc: BaseException, *, server: str, timeout: float, write_key: str | None = None
) -> StoreError | None:
    """converge's error for ``exc``, raised by coredis (or a time limit) talking to
    ``server`` (its masked URL); None when ``exc`` is no Redis failure.

    A write (``write_key``) that got no answer is an unknown outcome: it may have been
    applied. A refused connection sent nothing, so it is only unavailable.
    """
    import coredis.exceptions

    for leaf in _leaves(exc):
        if isinstance(leaf, StoreError):
            continue
        if isinstance(leaf, coredis.exceptions.ConnectionError | OSError | TimeoutError):
            if write_key is not None and not _refused(leaf):
                return StoreOutcomeUnknownError(
                    write_key,
                    f"Redis at {server} did not answer within {timeout} s "
                    f"({type(leaf).__name__}: {leaf})",
                )
            return StoreUnavailableError(
                f"Redis at {server} is unreachable or not answering: {leaf}"
            )
        if isinstance(leaf, coredis.exceptions.RedisError):
            return StoreError(f"Redis at {server} failed: {leaf}")
    return None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _refused(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is a refused connection: nothing was sent."""
    return any(isinstance(cause, ConnectionRefusedError) for cause in exception_chain(exc))

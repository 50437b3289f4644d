"""The one mechanism behind every documented synchronous signature.

converge is async first: each I/O component implements ``async def a<name>(...)`` and its
documented synchronous ``<name>(...)`` is a thin shim. Shims come in three kinds
(see ``docs/async-vs-sync.md``):

* **Pure in-memory work** (``MemoryStore``, token-bucket math, breakers): both surfaces
  call the same synchronous core; no shim is needed, and calling the sync form on the
  event-loop thread is fine.
* **Blocking work** (files, sqlite3, PBKDF2): the sync form calls the blocking core
  directly after :func:`check_sync_allowed`; the async form is one
  ``anyio.to_thread.run_sync`` hop around the same core.
* **Loop-bound work** (SDK clients, HTTP pools, Redis): the async class is the real one;
  the sync form goes through :func:`run` (a stateless coroutine) or through a
  :class:`Portal` owned by the object (state that must live on one loop).

In every kind, a sync call made on an event-loop thread that would block raises
:class:`~converge.errors.SyncInEventLoopError` naming the coroutine to ``await`` instead,
rather than blocking or deadlocking the loop.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import sniffio

from converge.errors import ClosedError, SyncInEventLoopError

__all__ = [
    "LoopLocal",
    "Portal",
    "check_sync_allowed",
    "in_event_loop_thread",
    "in_worker_thread",
    "run",
]

T = TypeVar("T")


def in_event_loop_thread() -> bool:
    """Return True when called on a thread that is running an asyncio or trio loop."""
    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return False
    return True


def _private_threadlocals() -> Any:
    # anyio marks its worker threads with an event-loop token in this private
    # thread-local: the cheapest way to tell "worker thread of a running loop" from "plain
    # thread". It is private, so its absence must never break ``import converge``.
    try:
        from anyio._core._eventloop import threadlocals
    except ImportError:
        return None
    return threadlocals if hasattr(threadlocals, "__dict__") else None


_anyio_threadlocals = _private_threadlocals()


def _worker_by_public_api() -> bool:
    # The public fallback: check_cancelled() refuses to run outside an anyio worker thread.
    try:
        anyio.from_thread.check_cancelled()
    except RuntimeError:
        return False
    except anyio.get_cancelled_exc_class():  # pragma: no cover - cancelled while asking
        return True
    return True


def in_worker_thread() -> bool:
    """Return True inside a worker thread started by ``anyio.to_thread.run_sync``."""
    if _anyio_threadlocals is None:
        return _worker_by_public_api()
    return getattr(_anyio_threadlocals, "current_token", None) is not None


def check_sync_allowed(async_name: str) -> None:
    """Raise if a blocking sync call is made on an event-loop thread.

    Args:
        async_name: The coroutine the caller should await instead, e.g.
            ``"FileStore.aget"``.

    Raises:
        SyncInEventLoopError: When called on an asyncio or trio event-loop thread.
    """
    if in_event_loop_thread():
        raise SyncInEventLoopError(
            f"this synchronous call would block the running event loop; "
            f"use 'await {async_name}(...)' instead"
        )


def run(func: Callable[..., Awaitable[T]], *args: Any, async_name: str, **kwargs: Any) -> T:
    """Run a coroutine function to completion from synchronous code.

    From an anyio worker thread the coroutine runs on that thread's event loop (so it
    shares the loop's resources); from any other thread, or a plain script, on a fresh
    event loop for this call (``anyio.run``: about 0.13 ms here). anyio offers no way to
    keep a loop between calls on the calling thread; a portal loop in another thread
    costs more per call (about 0.2 ms), so objects with loop-bound state keep their own
    :class:`Portal` instead.

    Args:
        func: The coroutine function (typically the ``a``-prefixed method).
        *args: Its positional arguments.
        **kwargs: Its keyword arguments.
        async_name: Named in the error if this is called on an event-loop thread.

    Raises:
        SyncInEventLoopError: When called on an event-loop thread.
    """
    check_sync_allowed(async_name)
    if in_worker_thread():
        return anyio.from_thread.run(_as_coroutine(func, kwargs), *args)
    return anyio.run(_as_coroutine(func, kwargs), *args)


def _as_coroutine(
    func: Callable[..., Awaitable[T]], kwargs: dict[str, Any]
) -> Callable[..., Coroutine[Any, Any, T]]:
    async def call(*args: Any) -> T:
        return await func(*args, **kwargs)

    return call


class Portal:
    """A background event loop owned by one object, for its loop-bound state.

    The loop thread starts on first use, is a daemon (it never holds up interpreter exit),
    is replaced in a forked child, and stops on :meth:`close`. Calls from any number of
    threads are serialised onto that one loop, so state created there (client pools,
    connections) is always used from the loop that created it.

    Args:
        backend: ``"asyncio"`` or ``"trio"`` for the portal's own loop.
    """

    def __init__(self, backend: str = "asyncio") -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._pid = 0
        self._closed = False
        _PORTALS.add(self)

    def call(
        self, func: Callable[..., Awaitable[T]], *args: Any, async_name: str, **kwargs: Any
    ) -> T:
        """Run ``func(*args)`` on the portal's loop and return its result.

        Raises:
            SyncInEventLoopError: When called on an event-loop thread.
            ClosedError: After :meth:`close`.
        """
        check_sync_allowed(async_name)
        future = self._get().start_task_soon(_as_coroutine(func, kwargs), *args)
        try:
            result: T = future.result()
            return result
        except BaseException:
            # e.g. KeyboardInterrupt in the caller: cancel the task, do not orphan it
            future.cancel()
            raise

    def _get(self) -> anyio.from_thread.BlockingPortal:
        with self._lock:
            if self._closed:
                raise ClosedError("this object's sync surface was closed")
            if self._portal is None or self._pid != os.getpid():
                self._portal = self._start()
                self._pid = os.getpid()
            return self._portal

    def _start(self) -> anyio.from_thread.BlockingPortal:
        ready = threading.Event()
        box: list[anyio.from_thread.BlockingPortal] = []
        failure: list[BaseException] = []

        async def serve() -> None:
            async with anyio.from_thread.BlockingPortal() as portal:
                box.append(portal)
                ready.set()
                await portal.sleep_until_stopped()

        def main() -> None:
            try:
                anyio.run(serve, backend=self._backend)
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()

        threading.Thread(target=main, name="converge-portal", daemon=True).start()
        ready.wait()
        if failure:
            raise failure[0]
        return box[0]

    def close(self) -> None:
        """Stop the portal's loop (idempotent). Later calls raise ClosedError."""
        with self._lock:
            portal, self._portal = self._portal, None
            self._closed = True
            same_process = self._pid == os.getpid()
        if portal is not None and same_process:
            portal.call(portal.stop)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._portal = None


class LoopLocal(Generic[T]):
    """One lazily created value per running event loop.

    For loop-bound state (an SDK's async client, a connection pool) of an object that may
    be used from several loops: from the user's loop, from a :class:`Portal`, from a
    fresh loop of :func:`run`. Values die with their loop.

    Args:
        factory: Creates the value; called on the loop that will use it.
    """

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._values: weakref.WeakKeyDictionary[object, T] = weakref.WeakKeyDictionary()

    def get(self) -> T:
        """Return this loop's value, creating it on first use. Call from async code."""
        key = anyio.lowlevel.current_token().native_token
        try:
            return self._values[key]
        except KeyError:
            value = self._values[key] = self._factory()
            return value

    def values(self) -> list[T]:
        """Every value still alive (for closing them)."""
        return list(self._values.values())


_PORTALS: weakref.WeakSet[Portal] = weakref.WeakSet()


def _reset_portals_in_child() -> None:
    # A forked child has none of the parent's threads; a lock held by one of them at fork
    # time would never be released.
    for portal in list(_PORTALS):
        portal._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_portals_in_child)

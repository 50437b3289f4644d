"""The process's one TLS client context, shared by every HTTP client converge creates."""

from __future__ import annotations

import ssl
import threading

import anyio.to_thread

__all__ = ["ashared_ssl_context", "shared_ssl_context"]

_lock = threading.Lock()
_context: ssl.SSLContext | None = None


def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context for every HTTP client converge creates (LLM providers, outbound
    webhooks).

    Building a context (loading the trust store) costs tens of milliseconds; httpx
    recommends sharing one, and it is safe across threads and loops.
    """
    global _context
    with _lock:
        if _context is None:
            import httpx2

            _context = httpx2.create_ssl_context()
        return _context


async def ashared_ssl_context() -> ssl.SSLContext:
    """:func:`shared_ssl_context` from async code: the first build (about 20 ms here, over
    100 ms with the imports it brings) runs in a worker thread, off the event loop."""
    context = _context
    if context is not None:
        return context
    return await anyio.to_thread.run_sync(shared_ssl_context)

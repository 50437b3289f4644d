"""The process's one TLS client context, shared by every HTTP client converge creates."""

from __future__ import annotations

import ssl
import threading

__all__ = ["shared_ssl_context"]

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

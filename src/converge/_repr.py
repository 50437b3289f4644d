"""A value's ``repr`` (``safe_repr``) or JSON text (``json_text``) for error messages,
prompts and spans, never raising.

Tool results, model output and caller data are arbitrary: ``repr`` itself can fail on
them (``RecursionError`` for values nested thousands deep, a ``__repr__`` that raises).
"""

from __future__ import annotations

import json
import reprlib
from typing import Any

__all__ = ["json_text", "safe_repr"]

# Depth and width bounded, for what repr() cannot show.
_BOUNDED = reprlib.Repr()
_BOUNDED.maxlevel = 8
_BOUNDED.maxstring = _BOUNDED.maxother = 200
_BOUNDED.maxlist = _BOUNDED.maxtuple = _BOUNDED.maxdict = 50
_BOUNDED.maxset = _BOUNDED.maxfrozenset = _BOUNDED.maxdeque = 50


def safe_repr(value: Any) -> str:
    """``repr(value)``; when that fails, a depth- and width-bounded rendering (``reprlib``),
    or ``<T object>`` as a last resort."""
    try:
        return repr(value)
    except Exception:  # RecursionError included
        try:
            return _BOUNDED.repr(value)
        except Exception:
            return f"<{type(value).__name__} object>"


def json_text(value: Any) -> str | None:
    """``value`` as JSON text (objects JSON has no form for as their ``repr``), or None
    when it has none: a key that is not a string or number, nesting too deep, a raising
    ``__repr__``."""
    try:
        return json.dumps(value, ensure_ascii=False, default=repr)
    except Exception:  # TypeError, ValueError, RecursionError, or a __repr__'s own error
        return None

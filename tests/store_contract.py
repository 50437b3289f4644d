"""The Store contract suite now ships in the package; this module keeps old imports working."""

from __future__ import annotations

from converge.extensions.storage.testing import TTL_SHORT, TTL_WAIT, VALUES, StoreContract

__all__ = ["TTL_SHORT", "TTL_WAIT", "VALUES", "StoreContract"]

"""Value serializers and key encoding shared by the storage backends.

Two serializers, named by the ``serializer=`` option of every backend:

* ``"pickle"`` (the default, as the seed documents): any picklable Python object. Reading
  a pickle runs code chosen by whoever wrote it, so only read stores that nobody else can
  write.
* ``"json"``: JSON-compatible values only (tuples come back as lists, dict keys as
  strings); safe to read from a directory or database others can write.

Every stored value carries a one-byte tag naming its serializer. A JSON store never
unpickles: a pickle-tagged value in it reads as corrupt.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from converge._numbers import positive_float
from converge._repr import safe_repr
from converge.core.store import validate_key
from converge.errors import StoreCorruptedError, UsageError

SerializerName = Literal["pickle", "json"]

PICKLE_TAG: Final = 0x50  # "P"
JSON_TAG: Final = 0x4A  # "J"


# One encoder for every write: json.dumps builds a new one per call when given options.
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True, slots=True)
class Serializer:
    """Turns values into tagged bytes and back, with converge's errors."""

    name: SerializerName
    tag: int

    def dumps(self, key: str, value: Any) -> bytes:
        """Serialize ``value`` (stored under ``key``) to bytes, without the tag.

        Raises:
            UsageError: If the value cannot be serialized.
        """
        if self.tag == PICKLE_TAG:
            try:
                return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:  # PicklingError, TypeError, AttributeError, Recursion
                raise UsageError(f"value for key {key!r} cannot be pickled: {exc}") from exc
        try:
            return _JSON.encode(value).encode("ascii")
        except (TypeError, ValueError, RecursionError) as exc:
            raise UsageError(
                f"value for key {key!r} is not JSON-serializable ({exc}); store "
                "JSON-compatible values or use serializer='pickle'"
            ) from exc

    def loads(self, key: str, tag: int, data: bytes | memoryview) -> Any:
        """Decode bytes written under ``tag``.

        Raises:
            StoreCorruptedError: If the bytes do not decode, or were written by a
                serializer this store does not trust.
        """
        if tag == JSON_TAG:
            try:
                return json.loads(bytes(data))
            except Exception as exc:  # JSONDecodeError, UnicodeDecodeError, Recursion
                raise StoreCorruptedError(key, f"invalid JSON ({exc})") from None
        if tag == PICKLE_TAG:
            if self.tag != PICKLE_TAG:
                raise StoreCorruptedError(
                    key,
                    "value was written with the pickle serializer; this store uses "
                    "json and never unpickles",
                )
            try:
                return pickle.loads(data)
            except Exception as exc:  # anything a damaged or foreign pickle raises
                raise StoreCorruptedError(
                    key, f"cannot unpickle ({type(exc).__name__}: {exc})"
                ) from None
        raise StoreCorruptedError(key, f"unknown serializer tag {tag:#04x}")


_SERIALIZERS: Final = {
    "pickle": Serializer("pickle", PICKLE_TAG),
    "json": Serializer("json", JSON_TAG),
}


def get_serializer(name: object) -> Serializer:
    """Return the serializer called ``name``.

    Raises:
        UsageError: For anything but ``"pickle"`` or ``"json"``.
    """
    if isinstance(name, str) and name in _SERIALIZERS:
        return _SERIALIZERS[name]
    raise UsageError(f"serializer must be 'pickle' or 'json', not {safe_repr(name)}")


def key_bytes(key: str) -> bytes:
    """Encode a store key to bytes, reversibly, for any ``str`` (lone surrogates too).

    UTF-8 byte order equals code-point order, so sorting encoded keys sorts the keys.
    """
    return key.encode("utf-8", "surrogatepass")


def key_from_bytes(raw: bytes) -> str:
    """Inverse of :func:`key_bytes`. Raises ``UnicodeDecodeError`` for foreign bytes."""
    return raw.decode("utf-8", "surrogatepass")


def prefix_upper_bound(prefix: bytes) -> bytes | None:
    """Smallest byte string greater than every string that starts with ``prefix``.

    None when there is none (empty prefix, or all ``0xff``): the range is then open.
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def check_keys(keys: object) -> list[str]:
    """Return ``keys`` as a list if it is a sequence of valid keys.

    Raises:
        UsageError: For keys that are a single ``str`` (a common slip), a non-sequence
            or hold an invalid key.
    """
    if isinstance(keys, str | bytes) or not isinstance(keys, Sequence):
        raise UsageError("keys must be a sequence of str keys, such as a list")
    return [validate_key(key) for key in keys]


def check_update(keys: object, fn: object) -> list[str]:
    """Validate the ``keys`` and ``fn`` arguments of ``update``; return the keys.

    Raises:
        UsageError: For invalid keys (see :func:`check_keys`), or an ``fn`` that is not
            callable.
    """
    if not callable(fn):
        raise UsageError(f"fn must be a function of the current values, not {type(fn).__name__}")
    return check_keys(keys)


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` if it is a bool, else raise ``UsageError``."""
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False, not {safe_repr(value)}")
    return value


def check_timeout(value: object, name: str) -> float:
    """Return ``value`` as float seconds if it is a positive finite number."""
    seconds = positive_float(value)
    if seconds is None:
        raise UsageError(f"{name} must be a positive number of seconds, not {safe_repr(value)}")
    return seconds

"""EncryptedStore: seal every value of any Store with AES-256-GCM, with key rotation.

Blob layout (what the inner store holds, as ``bytes``; as the ASCII string
``"cve1:" + base64(blob)`` when the inner store uses the JSON serializer)::

    b"CVE" | version 0x01 | key-id length (1 byte) | key id (UTF-8) | sealed

``sealed`` is :func:`converge.extensions.crypto.encrypt` output (nonce + ciphertext +
tag) with the store key's UTF-8 bytes as associated data, so a blob copied under another
key does not open. The plaintext is a serializer tag (1 byte), the expiry as a big-endian
float64 Unix time (0 = none, kept so that :meth:`EncryptedStore.rotate` preserves TTLs),
then the serialized value.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, TypeVar, cast

import anyio.to_thread

from converge._repr import safe_repr
from converge.core.store import (
    Store,
    UpdateFn,
    WithTTL,
    check_changes,
    split_change,
    validate_key,
    validate_prefix,
    validate_ttl,
)
from converge.errors import (
    CryptoTypeError,
    CryptoValueError,
    DecryptionError,
    KeyNotFoundError,
    StoreCorruptedError,
    SyncInEventLoopError,
    UsageError,
)
from converge.extensions.crypto import INLINE_LIMIT as _INLINE_LIMIT
from converge.extensions.crypto import KEY_SIZE as _KEY_SIZE
from converge.extensions.crypto import NONCE_SIZE as _NONCE_SIZE
from converge.extensions.crypto import TAG_SIZE as _TAG_SIZE
from converge.extensions.crypto import decrypt, encrypt
from converge.extensions.crypto._impl import (
    adecrypt,
    aencrypt,
    afree,
    ajoin,
    aopen_parts,
    aseal_parts,
)
from converge.extensions.storage._codec import PICKLE_TAG as _PICKLE_TAG
from converge.extensions.storage._codec import (
    SerializerName,
    check_update,
    get_serializer,
    key_bytes,
)

__all__ = ["EncryptedStore"]

R = TypeVar("R")

_MAGIC: Final = b"CVE\x01"
_TEXT_PREFIX: Final = "cve1:"
_PLAIN_HEADER: Final = struct.Struct(">Bd")  # serializer tag, expires_at (0.0 = never)
# pickle.dumps(b, protocol=5) of a bytes value of 256 B .. 4 GiB is exactly
# PROTO 5 | BINBYTES <len, 4 bytes LE> | the bytes | MEMOIZE | STOP: large bytes values
# are sealed and opened in that form without copying them into a pickle first.
_PICKLED_BYTES: Final = struct.Struct("<2scI")
_PICKLED_BYTES_HEAD: Final = (b"\x80\x05", b"B")
_PICKLED_BYTES_TAIL: Final = b"\x94."


class EncryptedStore(Store):
    """Wrap any Store so that its values are sealed with AES-256-GCM.

    Keys (the store's key names) stay in clear, so ``list(prefix)`` works as before;
    values are encrypted and authenticated, bound to their key name (associated data),
    and tagged with the id of the encryption key that sealed them. Configure several
    encryption keys to rotate: new values are sealed with ``active_key_id``, old ones
    still open with theirs, and :meth:`rotate` re-seals everything under the active key.

    Values are serialized (pickle or JSON) *before* sealing. Unpickling is safe here even
    if others can write the inner store: a blob that does not authenticate is never
    decoded.

    Atomicity and locking are the inner store's: ``put_if_absent`` delegates to it.
    Closing the wrapper closes the inner store.

    Args:
        inner: The store that holds the sealed blobs.
        keys: Key id -> 32-byte AES key (for example from
            :func:`~converge.extensions.crypto.derive_key` or
            :func:`~converge.extensions.crypto.secure_random_bytes`).
        active_key_id: The id that seals new values; may be omitted when ``keys`` has a
            single entry.
        serializer: ``"pickle"`` or ``"json"``, applied before sealing.

    Raises:
        UsageError: For an invalid store, key id or serializer.
        CryptoTypeError: If a key is not bytes.
        CryptoValueError: If a key is not 32 bytes.
    """

    def __init__(
        self,
        inner: Store,
        keys: Mapping[str, bytes],
        *,
        active_key_id: str | None = None,
        serializer: SerializerName = "pickle",
    ) -> None:
        if not isinstance(inner, Store):
            raise UsageError(f"inner must be a converge Store, not {type(inner).__name__}")
        if not isinstance(keys, Mapping) or not keys:
            raise UsageError("keys must be a non-empty mapping of key id -> 32-byte key")
        checked: dict[str, bytes] = {}
        for key_id, key in keys.items():
            if not isinstance(key_id, str) or not key_id:
                raise UsageError(f"key ids must be non-empty str, not {safe_repr(key_id)}")
            if len(key_id.encode("utf-8", "surrogatepass")) > 255:
                raise UsageError(f"key id {key_id[:40]!r}... is longer than 255 bytes")
            if not isinstance(key, bytes | bytearray | memoryview):
                raise CryptoTypeError(f"key {key_id!r} must be bytes, not {type(key).__name__}")
            if len(key) != _KEY_SIZE:
                raise CryptoValueError(
                    f"key {key_id!r} must be {_KEY_SIZE} bytes for AES-256-GCM, got {len(key)}"
                )
            checked[key_id] = bytes(key)
        if active_key_id is None:
            if len(checked) != 1:
                raise UsageError("active_key_id is required when several keys are configured")
            active_key_id = next(iter(checked))
        elif not isinstance(active_key_id, str) or active_key_id not in checked:
            raise UsageError(f"active_key_id {active_key_id!r} is not one of the keys")
        self._inner = inner
        self._keys = checked
        self._active = active_key_id
        raw_id = active_key_id.encode("utf-8", "surrogatepass")
        self._active_header = _MAGIC + bytes([len(raw_id)]) + raw_id
        self._serializer = get_serializer(serializer)
        self._text = getattr(inner, "serializer", "pickle") == "json"

    @property
    def inner(self) -> Store:
        """The wrapped store."""
        return self._inner

    @property
    def active_key_id(self) -> str:
        """The key id that seals new values."""
        return self._active

    @property
    def atomic_put_if_absent(self) -> bool:  # type: ignore[override]  # per instance
        """The inner store's flag: ``put_if_absent`` is delegated to it."""
        return self._inner.atomic_put_if_absent

    @property
    def supports_locking(self) -> bool:  # type: ignore[override]  # per instance
        """The inner store's flag."""
        return self._inner.supports_locking

    def __repr__(self) -> str:
        return f"EncryptedStore({self._inner!r}, active_key_id={self._active!r})"

    # -- sealing (sans I/O) ------------------------------------------------------------

    def _plaintext(self, key: str, value: Any, ttl: float | None) -> bytes:
        expires_at = 0.0 if ttl is None else time.time() + ttl
        header = _PLAIN_HEADER.pack(self._serializer.tag, expires_at)
        return header + self._serializer.dumps(key, value)

    def _wrap(self, sealed: bytes) -> bytes | str:
        blob = self._active_header + sealed
        return _as_text(blob) if self._text else blob

    def _unwrap(self, key: str, stored: object) -> tuple[str, bytes, bytes]:
        """Split a stored blob into (key id, AES key, sealed part)."""
        if isinstance(stored, str) and stored.startswith(_TEXT_PREFIX):
            try:
                stored = base64.b64decode(stored[len(_TEXT_PREFIX) :], validate=True)
            except (binascii.Error, ValueError):
                raise StoreCorruptedError(key, "sealed value is not valid base64") from None
        if not isinstance(stored, bytes) or not stored.startswith(_MAGIC) or len(stored) < 5:
            raise StoreCorruptedError(key, "value is not an EncryptedStore blob")
        id_end = 5 + stored[4]
        if len(stored) < id_end:
            raise StoreCorruptedError(key, "sealed value is truncated")
        try:
            key_id = stored[5:id_end].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise StoreCorruptedError(key, "sealed value has a malformed key id") from None
        aes_key = self._keys.get(key_id)
        if aes_key is None:
            raise KeyNotFoundError(
                f"value for key {key!r} was sealed with key id {key_id!r}, which is not "
                f"configured (configured: {sorted(self._keys)}); add that key to open it"
            )
        # A zero-copy view: the crypto functions accept any bytes-like object.
        return key_id, aes_key, cast(bytes, memoryview(stored)[id_end:])

    @staticmethod
    def _header(key: str, plaintext: bytes) -> tuple[int, float]:
        if len(plaintext) < _PLAIN_HEADER.size:
            raise StoreCorruptedError(key, "sealed plaintext is truncated")
        tag, expires_at = _PLAIN_HEADER.unpack_from(plaintext)
        return tag, expires_at

    def _decode(self, key: str, plaintext: bytes) -> tuple[float, Any]:
        tag, expires_at = self._header(key, plaintext)
        payload = memoryview(plaintext)[_PLAIN_HEADER.size :]
        return expires_at, self._serializer.loads(key, tag, payload)

    @staticmethod
    def _failed(key: str, key_id: str) -> DecryptionError:
        return DecryptionError(
            f"value for key {key!r} does not open with key id {key_id!r}: it was tampered "
            "with, copied from another key, or that key id holds a different key now"
        )

    def _open(self, key: str, stored: object) -> tuple[float, Any]:
        key_id, aes_key, sealed = self._unwrap(key, stored)
        try:
            plaintext = decrypt(sealed, aes_key, key_bytes(key))
        except DecryptionError:
            raise self._failed(key, key_id) from None
        return self._decode(key, plaintext)

    async def _aopen(self, key: str, stored: object) -> tuple[float, Any]:
        if _large(stored):  # base64 of a JSON inner store's blob, decoded off the loop
            key_id, aes_key, sealed = await anyio.to_thread.run_sync(self._unwrap, key, stored)
        else:
            key_id, aes_key, sealed = self._unwrap(key, stored)
        if len(sealed) - _NONCE_SIZE - _TAG_SIZE <= _INLINE_LIMIT:
            try:
                plaintext = await adecrypt(sealed, aes_key, key_bytes(key))
            except DecryptionError:
                raise self._failed(key, key_id) from None
            return self._decode(key, plaintext)
        try:
            parts = await aopen_parts(aes_key, sealed, key_bytes(key))
        except DecryptionError:
            raise self._failed(key, key_id) from None
        head = parts[0]
        start = _PLAIN_HEADER.size + _PICKLED_BYTES.size
        if len(head) >= start:
            tag, expires_at = _PLAIN_HEADER.unpack_from(head)
            proto, opcode, size = _PICKLED_BYTES.unpack_from(head, _PLAIN_HEADER.size)
            total = sum(len(part) for part in parts)
            if (
                tag == _PICKLE_TAG
                and (proto, opcode) == _PICKLED_BYTES_HEAD
                and total == start + size + len(_PICKLED_BYTES_TAIL)
                and _tail(parts, len(_PICKLED_BYTES_TAIL)) == _PICKLED_BYTES_TAIL
            ):
                # A pickled bytes value: cut it straight out of the decrypted chunks.
                pieces = _cut(parts, start, start + size)
                await afree(parts)
                return expires_at, await ajoin(pieces)
        # Anything else is joined and unpickled in one piece (that holds the GIL).
        plaintext = await ajoin(parts)
        return await anyio.to_thread.run_sync(self._decode, key, plaintext)

    def _seal(self, key: str, value: Any, ttl: float | None) -> bytes | str:
        return self._wrap(
            encrypt(self._plaintext(key, value, ttl), self._keys[self._active], key_bytes(key))
        )

    async def _aseal(self, key: str, value: Any, ttl: float | None) -> bytes | str:
        aes_key = self._keys[self._active]
        parts: tuple[bytes, ...]
        pickled = self._serializer.tag == _PICKLE_TAG
        if type(value) is bytes and len(value) > _INLINE_LIMIT and pickled:
            # The pickle of a bytes value is the value between a few bytes of framing:
            # seal those parts as they are instead of copying 64 MiB into a pickle.
            expires_at = 0.0 if ttl is None else time.time() + ttl
            parts = (
                _PLAIN_HEADER.pack(_PICKLE_TAG, expires_at),
                _PICKLED_BYTES.pack(*_PICKLED_BYTES_HEAD, len(value)),
                value,
                _PICKLED_BYTES_TAIL,
            )
        else:
            plaintext = self._plaintext(key, value, ttl)
            if len(plaintext) <= _INLINE_LIMIT:
                return self._wrap(await aencrypt(plaintext, aes_key, key_bytes(key)))
            parts = (plaintext,)
        blob = await aseal_parts(aes_key, parts, key_bytes(key), prefix=self._active_header)
        if self._text:  # base64 of a large blob, off the loop
            return await anyio.to_thread.run_sync(_as_text, blob)
        return blob

    def _stale(self, key: str, stored: object) -> tuple[str, bytes, bytes] | None:
        """For :meth:`rotate`: the unwrapped blob if it is sealed with another key id."""
        if stored is None:
            return None
        if isinstance(stored, bytes) and stored.startswith(self._active_header):
            return None
        unwrapped = self._unwrap(key, stored)
        return None if unwrapped[0] == self._active else unwrapped

    def _ttl_left(self, key: str, plaintext: bytes) -> float | None:
        """For :meth:`rotate`: the TTL to re-store with; None: none; 0.0: expired."""
        expires_at = self._header(key, plaintext)[1]
        if not expires_at:
            return None
        return max(expires_at - time.time(), 0.0)

    # -- async surface -----------------------------------------------------------------

    async def aget(self, key: str) -> Any | None:
        """Return the decrypted value under ``key``, or None if absent or expired.

        Raises:
            DecryptionError: If the blob does not authenticate under its key id.
            KeyNotFoundError: If the blob names a key id that is not configured.
            StoreCorruptedError: If the stored value is not an EncryptedStore blob.
        """
        stored = await self._inner.aget(validate_key(key))
        if stored is None:
            return None
        return (await self._aopen(key, stored))[1]

    async def aput(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Seal ``value`` with the active key and store it under ``key``."""
        seconds = validate_ttl(ttl)
        blob = await self._aseal(validate_key(key), value, seconds)
        await self._inner.aput(key, blob, ttl=seconds)

    async def adelete(self, key: str) -> None:
        """Delete ``key`` from the inner store."""
        await self._inner.adelete(validate_key(key))

    async def alist(self, prefix: str = "") -> builtins.list[str]:
        """The inner store's keys starting with ``prefix``, sorted."""
        return await self._inner.alist(validate_prefix(prefix))

    async def aput_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Seal and store only if ``key`` is absent; as atomic as the inner store's."""
        seconds = validate_ttl(ttl)
        blob = await self._aseal(validate_key(key), value, seconds)
        return await self._inner.aput_if_absent(key, blob, ttl=seconds)

    async def arotate(self) -> int:
        """Re-seal every value that is not sealed with the active key.

        TTLs are kept. Run it while nobody else writes the store: a value written between
        this method reading a key and writing it back would be replaced by the older one.

        Returns:
            How many values were re-sealed.

        Raises:
            KeyNotFoundError: If a value names a key id that is not configured.
            DecryptionError: If a value does not authenticate.
        """
        count = 0
        for key in await self._inner.alist(""):
            stale = self._stale(key, await self._inner.aget(key))
            if stale is None:
                continue
            key_id, aes_key, sealed = stale
            try:
                plaintext = await adecrypt(sealed, aes_key, key_bytes(key))
            except DecryptionError:
                raise self._failed(key, key_id) from None
            ttl = self._ttl_left(key, plaintext)
            if ttl == 0.0:
                continue  # expired meanwhile
            blob = self._wrap(await aencrypt(plaintext, self._keys[self._active], key_bytes(key)))
            await self._inner.aput(key, blob, ttl=ttl)
            count += 1
        return count

    def _sealing(
        self, names: builtins.list[str], fn: UpdateFn[R], ttl: float | None
    ) -> UpdateFn[R]:
        """Wrap an update function so that it sees plaintext and returns sealed blobs."""

        def sealed_fn(blobs: dict[str, Any | None]) -> tuple[dict[str, Any | None], R]:
            current = {
                key: None if blob is None else self._open(key, blob)[1]
                for key, blob in blobs.items()
            }
            changes, result = fn(current)
            check_changes(names, changes)
            sealed: dict[str, Any | None] = {}
            for key, change in changes.items():
                value, key_ttl = split_change(change, ttl)
                if value is None:
                    sealed[key] = None
                elif key_ttl == ttl:
                    sealed[key] = self._seal(key, value, ttl)
                else:  # the inner store must expire it at the same time
                    sealed[key] = WithTTL(self._seal(key, value, key_ttl), key_ttl)
            return sealed, result

        return sealed_fn

    async def aupdate(self, keys: Sequence[str], fn: UpdateFn[R], *, ttl: float | None = None) -> R:
        """Atomic read-modify-write through the inner store's :meth:`~Store.aupdate`.

        ``fn`` sees decrypted values; its changes are sealed before they are written, all
        inside the inner store's atomic step.
        """
        names = check_update(keys, fn)
        seconds = validate_ttl(ttl)
        return await self._inner.aupdate(names, self._sealing(names, fn, seconds), ttl=seconds)

    async def atime(self) -> float:
        """The inner store's clock."""
        return await self._inner.atime()

    async def aclose(self) -> None:
        """Close the inner store."""
        await self._inner.aclose()

    # -- sync surface: the inner store's sync methods plus inline crypto ----------------

    @contextmanager
    def _named(self, method: str) -> Iterator[None]:
        try:
            yield
        except SyncInEventLoopError:
            raise SyncInEventLoopError(
                "this synchronous call would block the running event loop; "
                f"use 'await EncryptedStore.{method}(...)' instead"
            ) from None

    def get(self, key: str) -> Any | None:
        """Retrieve and decrypt a value (sync form of :meth:`aget`)."""
        with self._named("aget"):
            stored = self._inner.get(validate_key(key))
        return None if stored is None else self._open(key, stored)[1]

    def put(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Seal and store a value (sync form of :meth:`aput`)."""
        seconds = validate_ttl(ttl)
        blob = self._seal(validate_key(key), value, seconds)
        with self._named("aput"):
            self._inner.put(key, blob, ttl=seconds)

    def delete(self, key: str) -> None:
        """Delete a value (sync form of :meth:`adelete`)."""
        with self._named("adelete"):
            self._inner.delete(validate_key(key))

    def list(self, prefix: str = "") -> builtins.list[str]:
        """List keys starting with prefix (sync form of :meth:`alist`)."""
        with self._named("alist"):
            return self._inner.list(validate_prefix(prefix))

    def put_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Seal and store only if absent (sync form of :meth:`aput_if_absent`)."""
        seconds = validate_ttl(ttl)
        blob = self._seal(validate_key(key), value, seconds)
        with self._named("aput_if_absent"):
            return self._inner.put_if_absent(key, blob, ttl=seconds)

    def rotate(self) -> int:
        """Re-seal every value under the active key (sync form of :meth:`arotate`).

        Returns:
            How many values were re-sealed.
        """
        count = 0
        with self._named("arotate"):
            keys = self._inner.list("")
        for key in keys:
            with self._named("arotate"):
                stale = self._stale(key, self._inner.get(key))
            if stale is None:
                continue
            key_id, aes_key, sealed = stale
            try:
                plaintext = decrypt(sealed, aes_key, key_bytes(key))
            except DecryptionError:
                raise self._failed(key, key_id) from None
            ttl = self._ttl_left(key, plaintext)
            if ttl == 0.0:
                continue  # expired meanwhile
            blob = self._wrap(encrypt(plaintext, self._keys[self._active], key_bytes(key)))
            with self._named("arotate"):
                self._inner.put(key, blob, ttl=ttl)
            count += 1
        return count

    def update(self, keys: Sequence[str], fn: UpdateFn[R], *, ttl: float | None = None) -> R:
        """Atomic read-modify-write (sync form of :meth:`aupdate`)."""
        names = check_update(keys, fn)
        seconds = validate_ttl(ttl)
        with self._named("aupdate"):
            return self._inner.update(names, self._sealing(names, fn, seconds), ttl=seconds)

    def close(self) -> None:
        """Close the inner store (sync form of :meth:`aclose`)."""
        with self._named("aclose"):
            self._inner.close()


def _as_text(blob: bytes) -> str:
    return _TEXT_PREFIX + base64.b64encode(blob).decode("ascii")


def _large(stored: object) -> bool:
    return isinstance(stored, str | bytes) and len(stored) > _INLINE_LIMIT


def _tail(parts: builtins.list[bytes], size: int) -> bytes:
    """The last ``size`` bytes of the concatenation of ``parts``."""
    out = b""
    for part in reversed(parts):
        out = part[-(size - len(out)) :] + out if len(out) < size else out
        if len(out) >= size:
            break
    return out


def _cut(parts: builtins.list[bytes], start: int, end: int) -> builtins.list[bytes]:
    """The pieces of ``parts`` covering bytes ``start`` to ``end`` of their concatenation.

    Whole parts are passed as they are and only the two ends are sliced (a chunk each at
    most): ``bytes.join`` releases the GIL while it copies only when every item is
    ``bytes`` (not a memoryview).
    """
    pieces: builtins.list[bytes] = []
    offset = 0
    for part in parts:
        low, high = max(start - offset, 0), min(end - offset, len(part))
        if low < high:
            pieces.append(part if (low, high) == (0, len(part)) else part[low:high])
        offset += len(part)
    return pieces

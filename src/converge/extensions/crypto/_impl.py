"""AES-256-GCM, PBKDF2 and random bytes: the crypto extension's implementation."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Sequence
from typing import Final

import anyio.lowlevel
import anyio.to_thread
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from converge.errors import CryptoTypeError, CryptoValueError, DecryptionError

__all__ = [
    "CHUNK_SIZE",
    "INLINE_LIMIT",
    "KEY_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "adecrypt",
    "aderive_key",
    "aencrypt",
    "decrypt",
    "derive_key",
    "afree",
    "ajoin",
    "aopen_parts",
    "aseal_parts",
    "encrypt",
    "secure_random_bytes",
]

KEY_SIZE: Final = 32
"""Bytes in an AES-256 key."""

NONCE_SIZE: Final = 12
"""Bytes of the random nonce that starts every sealed blob."""

TAG_SIZE: Final = 16
"""Bytes of the GCM authentication tag that ends every sealed blob."""

INLINE_LIMIT: Final = 1024 * 1024
"""Payloads up to this size are sealed in one call by the async twins (well under a
millisecond); larger ones in chunks of :data:`CHUNK_SIZE` with a checkpoint after each,
and joined in a worker thread."""

CHUNK_SIZE: Final = 256 * 1024
"""Bytes sealed or opened per step above :data:`INLINE_LIMIT`."""

# RFC 8018 caps dkLen at (2**32 - 1) * hLen; SHA-256 gives 32-byte blocks.
_MAX_DERIVED_LENGTH: Final = (2**32 - 1) * 32
# hashlib's PBKDF2 (OpenSSL's) takes at most INT_MAX iterations, else OverflowError.
_MAX_ITERATIONS: Final = 2**31 - 1

# Building an AESGCM object costs about as much as sealing 1 KiB, so recently used keys
# keep theirs. The cache holds nothing the caller's own key variable does not.
_CACHE_SIZE: Final = 32
_aead_cache: dict[bytes, AESGCM] = {}
_cache_lock = threading.Lock()

# cryptography's one-shot AEAD refuses more; the chunked path keeps the same limit so
# that whatever aencrypt seals, decrypt can open.
_MAX_ONE_SHOT: Final = 2**31 - 1
_TOO_LONG: Final = "plaintext and associated data must each be under 2 GiB"

# Parts (of CHUNK_SIZE) freed per step by afree(): 4 MiB.
_FREE_STEP: Final = 16

# Above this, decrypt passes memoryviews instead of slices to avoid copying the blob.
_SLICE_LIMIT: Final = 64 * 1024

_DECRYPT_FAILED: Final = (
    "decryption failed: the ciphertext was tampered with or truncated, or it was sealed "
    "with a different key or associated data"
)


# -- argument checks --------------------------------------------------------------------


_Buffer = bytes | bytearray | memoryview
_BUFFERS: Final = (bytes, bytearray, memoryview)


def _bytes_like(value: object, name: str) -> _Buffer:
    if isinstance(value, bytes | bytearray | memoryview):
        return value
    raise CryptoTypeError(f"{name} must be bytes, not {type(value).__name__}")


def _optional_bytes(value: object, name: str) -> _Buffer | None:
    return None if value is None else _bytes_like(value, name)


def _flat(value: object, name: str) -> memoryview:
    """A flat byte view of a bytes-like argument; refuses non-contiguous views."""
    view = memoryview(_bytes_like(value, name))
    if not view.c_contiguous:
        raise CryptoTypeError(
            f"{name} must be a contiguous buffer; this memoryview has gaps (a strided "
            "slice): pass bytes(view) instead"
        )
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _noncontiguous(*values: object) -> bool:
    return any(type(v) is memoryview and not v.c_contiguous for v in values)


def _buffer_type_error(plaintext: object, associated_data: object) -> CryptoTypeError:
    name = "plaintext" if _noncontiguous(plaintext) else "associated_data"
    return CryptoTypeError(
        f"{name} must be a contiguous buffer; this memoryview has gaps (a strided slice): "
        "pass bytes(view) instead"
    )


def _check_key(key: object) -> bytes:
    raw = bytes(_bytes_like(key, "key"))
    if len(raw) != KEY_SIZE:
        raise CryptoValueError(
            f"key must be {KEY_SIZE} bytes for AES-256-GCM, got {len(raw)} bytes; "
            "use derive_key() or secure_random_bytes(32) to make one"
        )
    return raw


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CryptoTypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def _aead_for(key: object) -> AESGCM:
    """The AESGCM object for ``key``, from the cache when possible; validates the key."""
    if type(key) is bytes:
        aead = _aead_cache.get(key)  # only valid keys are ever cached
        if aead is not None:
            return aead
    raw = _check_key(key)
    aead = AESGCM(raw)
    with _cache_lock:
        while len(_aead_cache) >= _CACHE_SIZE:
            del _aead_cache[next(iter(_aead_cache))]  # oldest first
        _aead_cache[raw] = aead
    return aead


def _split(ciphertext: object) -> tuple[_Buffer, _Buffer]:
    """Split a blob into (nonce, ciphertext + tag), rejecting blobs that are too short."""
    if type(ciphertext) is bytes and len(ciphertext) <= _SLICE_LIMIT:
        # Small blobs: slicing bytes is cheaper than a memoryview round trip.
        blob: _Buffer = ciphertext
    else:
        blob = _flat(ciphertext, "ciphertext")
    if len(blob) < NONCE_SIZE + TAG_SIZE:
        raise DecryptionError(
            f"ciphertext is {len(blob)} bytes; an AES-256-GCM blob is at least "
            f"{NONCE_SIZE + TAG_SIZE} bytes (nonce + tag), so it is truncated or not a blob"
        )
    return blob[:NONCE_SIZE], blob[NONCE_SIZE:]


# -- AES-256-GCM ------------------------------------------------------------------------


def _seal(aead: AESGCM, data: object, aad: object) -> bytes:
    if not isinstance(data, _BUFFERS):
        raise CryptoTypeError(f"plaintext must be bytes, not {type(data).__name__}")
    if aad is not None and not isinstance(aad, _BUFFERS):
        raise CryptoTypeError(f"associated_data must be bytes, not {type(aad).__name__}")
    nonce = os.urandom(NONCE_SIZE)
    try:
        return nonce + aead.encrypt(nonce, data, aad)
    except OverflowError:
        raise CryptoValueError(_TOO_LONG) from None
    except BufferError:
        raise _buffer_type_error(data, aad) from None


def _open(aead: AESGCM, ciphertext: object, aad: object) -> bytes:
    nonce, body = _split(ciphertext)
    if aad is not None and not isinstance(aad, _BUFFERS):
        raise CryptoTypeError(f"associated_data must be bytes, not {type(aad).__name__}")
    if _noncontiguous(aad):
        raise _buffer_type_error(None, aad)
    try:
        return aead.decrypt(nonce, body, aad)
    except InvalidTag:
        raise DecryptionError(_DECRYPT_FAILED) from None


def encrypt(plaintext: bytes, key: bytes, associated_data: bytes | None = None) -> bytes:
    """Encrypt plaintext with AES-256-GCM.

    Args:
        plaintext: Data to encrypt.
        key: 32-byte encryption key.
        associated_data: Optional authenticated associated data (not encrypted).

    Returns:
        nonce (12 bytes) + ciphertext + tag (16 bytes), concatenated.

    Raises:
        CryptoTypeError: If an argument is not bytes-like.
        CryptoValueError: If the key is not 32 bytes.
    """
    # The hot path is written out inline: at 1 KiB every function call shows.
    aead = _aead_cache.get(key) if type(key) is bytes else None
    if aead is None:
        aead = _aead_for(key)
    if not isinstance(plaintext, _BUFFERS):
        raise CryptoTypeError(f"plaintext must be bytes, not {type(plaintext).__name__}")
    if associated_data is not None and not isinstance(associated_data, _BUFFERS):
        raise CryptoTypeError(
            f"associated_data must be bytes, not {type(associated_data).__name__}"
        )
    nonce = os.urandom(NONCE_SIZE)
    try:
        return nonce + aead.encrypt(nonce, plaintext, associated_data)
    except OverflowError:
        raise CryptoValueError(_TOO_LONG) from None
    except BufferError:
        raise _buffer_type_error(plaintext, associated_data) from None


def decrypt(ciphertext: bytes, key: bytes, associated_data: bytes | None = None) -> bytes:
    """Decrypt AES-256-GCM ciphertext.

    Args:
        ciphertext: nonce (12 bytes) + encrypted data + tag (16 bytes).
        key: 32-byte decryption key.
        associated_data: Same as used for encryption, if any.

    Returns:
        Decrypted plaintext.

    Raises:
        CryptoTypeError: If an argument is not bytes-like.
        CryptoValueError: If the key is not 32 bytes.
        DecryptionError: If the ciphertext is truncated, was tampered with, or was sealed
            with another key or other associated data.
    """
    aead = _aead_cache.get(key) if type(key) is bytes else None
    if aead is None:
        aead = _aead_for(key)
    if (
        type(ciphertext) is bytes
        and NONCE_SIZE + TAG_SIZE <= len(ciphertext) <= _SLICE_LIMIT
        and (associated_data is None or type(associated_data) is bytes)
    ):  # the common case, inline
        try:
            return aead.decrypt(ciphertext[:NONCE_SIZE], ciphertext[NONCE_SIZE:], associated_data)
        except InvalidTag:
            raise DecryptionError(_DECRYPT_FAILED) from None
    return _open(aead, ciphertext, associated_data)


async def aencrypt(plaintext: bytes, key: bytes, associated_data: bytes | None = None) -> bytes:
    """Async :func:`encrypt`: same arguments, same blob layout, same errors.

    Payloads up to :data:`INLINE_LIMIT` are sealed in one call (well under a
    millisecond); larger ones by :func:`aseal_parts`, which never holds the event loop
    for more than one :data:`CHUNK_SIZE` step.
    """
    aead = _aead_for(key)
    if not isinstance(plaintext, _BUFFERS) or memoryview(plaintext).nbytes <= INLINE_LIMIT:
        return _seal(aead, plaintext, associated_data)  # also raises the type errors
    aad = None if associated_data is None else _flat(associated_data, "associated_data")
    return await aseal_parts(_check_key(key), (plaintext,), aad)


async def adecrypt(ciphertext: bytes, key: bytes, associated_data: bytes | None = None) -> bytes:
    """Async :func:`decrypt`: same arguments, result and errors.

    Large blobs are opened by :func:`aopen_parts` and joined by :func:`ajoin`; no
    plaintext is returned unless the tag verifies.
    """
    aead = _aead_for(key)
    sealed = _split(ciphertext)[1]
    if len(sealed) - TAG_SIZE <= INLINE_LIMIT:
        return _open(aead, ciphertext, associated_data)
    aad = None if associated_data is None else _flat(associated_data, "associated_data")
    return await ajoin(await aopen_parts(_check_key(key), ciphertext, aad))


async def aseal_parts(
    key: bytes,
    parts: Sequence[_Buffer],
    associated_data: _Buffer | None,
    prefix: bytes = b"",
) -> bytes:
    """``prefix + encrypt(b"".join(parts), key, associated_data)``, without stalling.

    The plaintext comes in parts and is never joined. It is sealed
    :data:`CHUNK_SIZE` bytes at a time on the event loop, with a checkpoint after each
    step; the sealed chunks are joined by :func:`ajoin`. Nothing runs in a worker
    thread while holding the GIL for long: ``cryptography`` holds it for a whole call,
    and a worker thread that the OS preempts while holding it would stall the loop
    for as long as the machine is busy.

    Raises:
        CryptoTypeError: For a non-contiguous buffer.
        CryptoValueError: If the plaintext or associated data is 2 GiB or more.
    """
    views = [_flat(part, "plaintext") for part in parts]
    if sum(len(v) for v in views) > _MAX_ONE_SHOT or (
        associated_data is not None and len(associated_data) > _MAX_ONE_SHOT
    ):
        raise CryptoValueError(_TOO_LONG)
    nonce = os.urandom(NONCE_SIZE)
    encryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    if associated_data is not None:
        encryptor.authenticate_additional_data(associated_data)
    out: list[bytes] = [prefix, nonce]
    for view in views:
        for start in range(0, len(view), CHUNK_SIZE):
            out.append(encryptor.update(view[start : start + CHUNK_SIZE]))
            await anyio.lowlevel.checkpoint()
    out.append(encryptor.finalize())
    out.append(encryptor.tag)
    return await ajoin(out)


async def aopen_parts(
    key: bytes, ciphertext: _Buffer, associated_data: _Buffer | None
) -> list[bytes]:
    """:func:`decrypt` a chunk at a time with a checkpoint after each: the plaintext's parts.

    Nothing is returned unless the tag verifies. Join the parts with :func:`ajoin` (or
    only those needed).

    Raises:
        DecryptionError: If the blob is truncated, tampered with, or sealed with another
            key or associated data.
    """
    nonce, sealed = _split(ciphertext)
    body = memoryview(sealed)[:-TAG_SIZE]
    decryptor = Cipher(
        algorithms.AES(key), modes.GCM(bytes(nonce), bytes(sealed[-TAG_SIZE:]))
    ).decryptor()
    if associated_data is not None:
        decryptor.authenticate_additional_data(associated_data)
    parts: list[bytes] = []
    for start in range(0, len(body), CHUNK_SIZE):
        parts.append(decryptor.update(body[start : start + CHUNK_SIZE]))
        await anyio.lowlevel.checkpoint()
    try:
        parts.append(decryptor.finalize())
    except InvalidTag:
        await afree(parts)  # unauthenticated plaintext never leaves this function
        raise DecryptionError(_DECRYPT_FAILED) from None
    return parts


async def ajoin(parts: list[bytes]) -> bytes:
    """``b"".join(parts)`` off the loop, then ``parts`` emptied without stalling it.

    ``bytes.join`` releases the GIL while it copies more than a MiB (when every part is
    ``bytes``), so the copy, and the page faults of its fresh result, run in a worker
    thread while the loop goes on. Freeing the parts (many munmap calls for 64 MiB) is
    done on the loop in small steps, by :func:`afree`.
    """
    joined = await anyio.to_thread.run_sync(b"".join, parts)
    await afree(parts)
    return joined


async def afree(parts: list[bytes]) -> None:
    """Empty ``parts`` a few at a time, with a checkpoint between: freeing 64 MiB at once
    can take tens of milliseconds on a busy machine."""
    while parts:
        del parts[-_FREE_STEP:]
        await anyio.lowlevel.checkpoint()


# -- PBKDF2 -----------------------------------------------------------------------------


def _kdf_args(
    password: object, salt: object, length: object, iterations: object
) -> tuple[bytes, bytes, int, int]:
    if isinstance(password, str):
        secret = password.encode("utf-8", "surrogatepass")
    elif isinstance(password, bytes | bytearray | memoryview):
        secret = bytes(password)
    else:
        raise CryptoTypeError(f"password must be str, not {type(password).__name__}")
    salt_bytes = bytes(_bytes_like(salt, "salt"))
    if not salt_bytes:
        raise CryptoValueError("salt must not be empty; use secure_random_bytes(16)")
    length = _check_int(length, "length")
    if not 1 <= length <= _MAX_DERIVED_LENGTH:
        raise CryptoValueError(f"length must be between 1 and {_MAX_DERIVED_LENGTH}, got {length}")
    iterations = _check_int(iterations, "iterations")
    if not 1 <= iterations <= _MAX_ITERATIONS:
        raise CryptoValueError(
            f"iterations must be between 1 and {_MAX_ITERATIONS}, got {iterations}"
        )
    return secret, salt_bytes, length, iterations


def _pbkdf2(secret: bytes, salt: bytes, length: int, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret, salt, iterations, length)


def derive_key(password: str, salt: bytes, length: int = 32, iterations: int = 100000) -> bytes:
    """Derive a key from a password using PBKDF2-HMAC-SHA256.

    The result equals ``hashlib.pbkdf2_hmac("sha256", password.encode(), salt,
    iterations, length)``. OWASP currently recommends at least 600,000 iterations for
    PBKDF2-HMAC-SHA256; the default of 100,000 is kept for compatibility with existing
    derived keys.

    Args:
        password: The password to derive from (``str``, encoded as UTF-8; bytes are
            accepted too).
        salt: Random salt (at least 16 bytes recommended).
        length: Desired key length in bytes.
        iterations: Number of PBKDF2 iterations.

    Returns:
        Derived key bytes of the specified length.

    Raises:
        CryptoTypeError: If an argument has the wrong type.
        CryptoValueError: For an empty salt, a length below 1 or an iteration count
            outside 1 to 2,147,483,647 (OpenSSL's limit).
    """
    return _pbkdf2(*_kdf_args(password, salt, length, iterations))


async def aderive_key(
    password: str, salt: bytes, length: int = 32, iterations: int = 100000
) -> bytes:
    """Async :func:`derive_key`: runs PBKDF2 in a worker thread (one hop).

    hashlib releases the GIL while it hashes, so the event loop keeps running.
    """
    args = _kdf_args(password, salt, length, iterations)
    return await anyio.to_thread.run_sync(_pbkdf2, *args)


# -- random -----------------------------------------------------------------------------


def secure_random_bytes(n: int) -> bytes:
    """Generate cryptographically secure random bytes.

    Args:
        n: Number of bytes to generate.

    Returns:
        Random bytes of length n.

    Raises:
        CryptoTypeError: If ``n`` is not an int.
        CryptoValueError: If ``n`` is negative or larger than any buffer can be
            (``sys.maxsize``).
    """
    n = _check_int(n, "n")
    if n < 0:
        raise CryptoValueError(f"n must not be negative, got {n}")
    if n > sys.maxsize:  # os.urandom would raise OverflowError
        raise CryptoValueError(f"n must be at most sys.maxsize ({sys.maxsize}), got {n}")
    return os.urandom(n)

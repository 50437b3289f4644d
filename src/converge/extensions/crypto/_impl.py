"""AES-256-GCM, PBKDF2 and random bytes: the crypto extension's implementation."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Final

import anyio
import anyio.lowlevel
import anyio.to_thread
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from converge.errors import CryptoTypeError, CryptoValueError, DecryptionError

__all__ = [
    "INLINE_LIMIT",
    "KEY_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "adecrypt",
    "aderive_key",
    "aencrypt",
    "decrypt",
    "derive_key",
    "encrypt",
    "secure_random_bytes",
]

KEY_SIZE: Final = 32
"""Bytes in an AES-256 key."""

NONCE_SIZE: Final = 12
"""Bytes of the random nonce that starts every sealed blob."""

TAG_SIZE: Final = 16
"""Bytes of the GCM authentication tag that ends every sealed blob."""

INLINE_LIMIT: Final = 256 * 1024
"""Payloads up to this size are sealed in one call by the async twins (~0.1 ms);
larger ones in chunks of this size with a checkpoint between them."""

# RFC 8018 caps dkLen at (2**32 - 1) * hLen; SHA-256 gives 32-byte blocks.
_MAX_DERIVED_LENGTH: Final = (2**32 - 1) * 32

# Building an AESGCM object costs about as much as sealing 1 KiB, so recently used keys
# keep theirs. The cache holds nothing the caller's own key variable does not.
_CACHE_SIZE: Final = 32
_aead_cache: OrderedDict[bytes, AESGCM] = OrderedDict()
_cache_lock = threading.Lock()

# cryptography's one-shot AEAD refuses more; the chunked path keeps the same limit so
# that whatever aencrypt seals, decrypt can open.
_MAX_ONE_SHOT: Final = 2**31 - 1
_TOO_LONG: Final = "plaintext and associated data must each be under 2 GiB"

_DECRYPT_FAILED: Final = (
    "decryption failed: the ciphertext was tampered with or truncated, or it was sealed "
    "with a different key or associated data"
)


# -- argument checks --------------------------------------------------------------------


_Buffer = bytes | bytearray | memoryview


def _bytes_like(value: object, name: str) -> _Buffer:
    if isinstance(value, bytes | bytearray | memoryview):
        return value
    raise CryptoTypeError(f"{name} must be bytes, not {type(value).__name__}")


def _optional_bytes(value: object, name: str) -> _Buffer | None:
    return None if value is None else _bytes_like(value, name)


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


def _aead(key: bytes) -> AESGCM:
    with _cache_lock:
        aead = _aead_cache.get(key)
        if aead is not None:
            _aead_cache.move_to_end(key)
            return aead
    aead = AESGCM(key)
    with _cache_lock:
        _aead_cache[key] = aead
        if len(_aead_cache) > _CACHE_SIZE:
            _aead_cache.popitem(last=False)
    return aead


def _split(ciphertext: object) -> memoryview:
    view = memoryview(_bytes_like(ciphertext, "ciphertext")).cast("B")
    if len(view) < NONCE_SIZE + TAG_SIZE:
        raise DecryptionError(
            f"ciphertext is {len(view)} bytes; an AES-256-GCM blob is at least "
            f"{NONCE_SIZE + TAG_SIZE} bytes (nonce + tag), so it is truncated or not a blob"
        )
    return view


# -- AES-256-GCM ------------------------------------------------------------------------


def _seal(key: bytes, data: _Buffer, aad: _Buffer | None) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    try:
        return nonce + _aead(key).encrypt(nonce, data, aad)
    except OverflowError:
        raise CryptoValueError(_TOO_LONG) from None


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
    data = _bytes_like(plaintext, "plaintext")
    aad = _optional_bytes(associated_data, "associated_data")
    return _seal(_check_key(key), data, aad)


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
    view = _split(ciphertext)
    aad = _optional_bytes(associated_data, "associated_data")
    aead = _aead(_check_key(key))
    try:
        return aead.decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], aad)
    except InvalidTag:
        raise DecryptionError(_DECRYPT_FAILED) from None


async def aencrypt(plaintext: bytes, key: bytes, associated_data: bytes | None = None) -> bytes:
    """Async :func:`encrypt`: same arguments, same blob layout, same errors.

    Payloads up to :data:`INLINE_LIMIT` are sealed in one call; larger ones in chunks
    with a checkpoint between chunks, so other tasks keep running.
    """
    data = _bytes_like(plaintext, "plaintext")
    aad = _optional_bytes(associated_data, "associated_data")
    raw_key = _check_key(key)
    size = memoryview(data).nbytes
    if size <= INLINE_LIMIT:
        return _seal(raw_key, data, aad)
    if size > _MAX_ONE_SHOT:
        raise CryptoValueError(_TOO_LONG)
    nonce = os.urandom(NONCE_SIZE)
    encryptor = Cipher(algorithms.AES(raw_key), modes.GCM(nonce)).encryptor()
    if aad is not None:
        encryptor.authenticate_additional_data(aad)
    view = memoryview(data).cast("B")
    parts = [nonce]
    for start in range(0, size, INLINE_LIMIT):
        parts.append(encryptor.update(view[start : start + INLINE_LIMIT]))
        await anyio.lowlevel.checkpoint()
    parts.append(encryptor.finalize())
    parts.append(encryptor.tag)
    return b"".join(parts)


async def adecrypt(ciphertext: bytes, key: bytes, associated_data: bytes | None = None) -> bytes:
    """Async :func:`decrypt`: same arguments, result and errors.

    Large blobs are opened in chunks with a checkpoint between chunks; no plaintext is
    returned unless the tag verifies.
    """
    view = _split(ciphertext)
    aad = _optional_bytes(associated_data, "associated_data")
    raw_key = _check_key(key)
    body = view[NONCE_SIZE:-TAG_SIZE]
    if len(body) <= INLINE_LIMIT:
        try:
            return _aead(raw_key).decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], aad)
        except InvalidTag:
            raise DecryptionError(_DECRYPT_FAILED) from None
    decryptor = Cipher(
        algorithms.AES(raw_key), modes.GCM(bytes(view[:NONCE_SIZE]), bytes(view[-TAG_SIZE:]))
    ).decryptor()
    if aad is not None:
        decryptor.authenticate_additional_data(aad)
    parts: list[bytes] = []
    for start in range(0, len(body), INLINE_LIMIT):
        parts.append(decryptor.update(body[start : start + INLINE_LIMIT]))
        await anyio.lowlevel.checkpoint()
    try:
        parts.append(decryptor.finalize())
    except InvalidTag:
        parts.clear()  # unauthenticated plaintext never leaves this function
        raise DecryptionError(_DECRYPT_FAILED) from None
    return b"".join(parts)


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
    if iterations < 1:
        raise CryptoValueError(f"iterations must be at least 1, got {iterations}")
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
            below 1.
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
        CryptoValueError: If ``n`` is negative.
    """
    n = _check_int(n, "n")
    if n < 0:
        raise CryptoValueError(f"n must not be negative, got {n}")
    return os.urandom(n)

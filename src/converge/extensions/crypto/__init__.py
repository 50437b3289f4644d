"""Crypto extension: symmetric encryption, key derivation, secure random.

* :func:`encrypt` / :func:`decrypt`: AES-256-GCM. A sealed blob is
  ``nonce (12 bytes) + ciphertext + tag (16 bytes)``, which any standard AES-GCM
  implementation opens given the key (and the associated data, if any).
* :func:`derive_key`: PBKDF2-HMAC-SHA256, byte for byte equal to
  :func:`hashlib.pbkdf2_hmac`.
* :func:`secure_random_bytes`: bytes from the operating system's CSPRNG.

The async twins :func:`aencrypt`, :func:`adecrypt` and :func:`aderive_key` keep the event
loop responsive: PBKDF2 runs in a worker thread (hashlib releases the GIL while it
hashes), and payloads above :data:`INLINE_LIMIT` are processed in chunks with a
checkpoint between them. A worker thread would not help there: ``cryptography`` holds the
GIL for the whole of an AES-GCM call, so the loop would stall just the same, and the hop
would add its own ~100 µs.

Errors are converge's: :class:`~converge.errors.CryptoTypeError` (a ``TypeError``) for a
non-bytes argument, :class:`~converge.errors.CryptoValueError` (a ``ValueError``) for a
wrong key length or a negative size, and :class:`~converge.errors.DecryptionError` for a
tampered, truncated or wrong-key ciphertext. No message ever contains key material or
plaintext.
"""

from __future__ import annotations

from converge.extensions.crypto._impl import (
    CHUNK_SIZE,
    INLINE_LIMIT,
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    adecrypt,
    aderive_key,
    aencrypt,
    decrypt,
    derive_key,
    encrypt,
    secure_random_bytes,
)

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
    "encrypt",
    "secure_random_bytes",
]

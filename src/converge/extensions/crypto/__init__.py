"""Crypto extension: symmetric encryption, key derivation, secure random.

* :func:`encrypt` / :func:`decrypt`: AES-256-GCM. A sealed blob is
  ``nonce (12 bytes) + ciphertext + tag (16 bytes)``, which any standard AES-GCM
  implementation opens given the key (and the associated data, if any).
* :func:`derive_key`: PBKDF2-HMAC-SHA256, byte for byte equal to
  :func:`hashlib.pbkdf2_hmac`.
* :func:`secure_random_bytes`: bytes from the operating system's CSPRNG.

The async twins :func:`aencrypt`, :func:`adecrypt` and :func:`aderive_key` keep the event
loop responsive: PBKDF2 runs in a worker thread (hashlib releases the GIL while it
hashes), and payloads above :data:`INLINE_LIMIT` are processed in chunks of
:data:`CHUNK_SIZE` with a checkpoint after each, then joined in a worker thread
(``bytes.join`` releases the GIL while it copies). The AES steps stay on the loop:
``cryptography`` holds the GIL for the whole of each call, so a worker thread would not
free the loop, and one preempted while holding the GIL would stall it. Up to 64 MiB, the
loop is never held for 20 ms (a test measures it).

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

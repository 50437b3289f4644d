"""Ed25519 agent identities: sign, verify, and save encrypted to disk."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import anyio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from converge import _sync
from converge._paths import check_path
from converge.errors import IdentityError, UsageError, WrongPasswordError

__all__ = ["Identity"]

_BYTES = (bytes, bytearray, memoryview)
_MAX_PASSWORD = 1023  # OpenSSL refuses longer passwords for PEM encryption


class Identity:
    """An Ed25519 keypair that names an agent.

    Args:
        private_key: An existing key; a new one is generated when omitted.
    """

    __slots__ = ("_private_key", "_public_bytes")

    def __init__(self, private_key: Ed25519PrivateKey | None = None) -> None:
        if private_key is None:
            private_key = Ed25519PrivateKey.generate()
        if not isinstance(private_key, Ed25519PrivateKey):
            raise UsageError("private_key must be an Ed25519PrivateKey")
        self._private_key = private_key
        self._public_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> Identity:
        """Create an identity with a fresh random keypair."""
        return cls()

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The public half of the keypair."""
        return self._private_key.public_key()

    @property
    def public_key_bytes(self) -> bytes:
        """The 32 raw bytes of the public key."""
        return self._public_bytes

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the raw public key: a stable id for this identity."""
        return hashlib.sha256(self._public_bytes).hexdigest()

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``data``."""
        if not isinstance(data, _BYTES):
            raise UsageError(f"sign() takes bytes, not {type(data).__name__}")
        return self._private_key.sign(bytes(data))

    def verify(self, data: bytes, signature: bytes) -> bool:
        """Return True if ``signature`` is this identity's signature of ``data``.

        Raises:
            UsageError: If ``data`` or ``signature`` is not bytes (an int would have read
                as that many zero bytes).
        """
        if not isinstance(data, _BYTES) or not isinstance(signature, _BYTES):
            raise UsageError("verify() takes bytes for data and signature")
        try:
            self.public_key.verify(bytes(signature), bytes(data))
        except (InvalidSignature, TypeError, ValueError):
            return False
        return True

    # -- persistence -------------------------------------------------------------------

    def to_pem(self, password: str | bytes) -> bytes:
        """Serialize as PEM-encoded, password-encrypted PKCS#8."""
        return self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(_password_bytes(password)),
        )

    @classmethod
    def from_pem(cls, pem: bytes, password: str | bytes) -> Identity:
        """Load an identity from :meth:`to_pem` output.

        Raises:
            WrongPasswordError: If the password is wrong or the data is damaged.
            IdentityError: If the key is not an Ed25519 key.
            UsageError: If ``pem`` is not bytes.
        """
        if not isinstance(pem, _BYTES):
            raise UsageError(f"pem must be bytes, not {type(pem).__name__}")
        try:
            key = serialization.load_pem_private_key(pem, password=_password_bytes(password))
        except (ValueError, TypeError) as exc:
            raise WrongPasswordError(
                "could not open the identity: wrong password or damaged file"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError("the saved key is not an Ed25519 key")
        return cls(key)

    def save(self, path: str | os.PathLike[str], password: str | bytes) -> None:
        """Write the encrypted key to ``path`` atomically, readable by the owner only.

        Raises:
            IdentityError: If the file cannot be written (nothing is left behind).
            UsageError: For a password that is empty, not str or bytes, or over 1023
                bytes.
            SyncInEventLoopError: On an event-loop thread; ``await`` :meth:`asave`.
        """
        _sync.check_sync_allowed("Identity.asave")
        self._save(check_path(path, "path"), password)

    async def asave(self, path: str | os.PathLike[str], password: str | bytes) -> None:
        """Async form of :meth:`save` (key encryption and the file write leave the loop)."""
        await anyio.to_thread.run_sync(self._save, check_path(path, "path"), password)

    def _save(self, path: str | os.PathLike[str], password: str | bytes) -> None:
        target = Path(path)
        data = self.to_pem(password)
        try:
            self._write(target, data)
        except OSError as exc:
            raise IdentityError(f"cannot write identity file {str(path)!r}: {exc}") from exc

    @staticmethod
    def _write(target: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str], password: str | bytes) -> Identity:
        """Read an identity written by :meth:`save`.

        Raises:
            WrongPasswordError: If the password is wrong or the file is damaged.
            IdentityError: If the file cannot be read.
            SyncInEventLoopError: On an event-loop thread; ``await`` :meth:`aload`.
        """
        _sync.check_sync_allowed("Identity.aload")
        return cls._load(check_path(path, "path"), password)

    @classmethod
    async def aload(cls, path: str | os.PathLike[str], password: str | bytes) -> Identity:
        """Async form of :meth:`load` (the read and key decryption leave the loop)."""
        return await anyio.to_thread.run_sync(cls._load, check_path(path, "path"), password)

    @classmethod
    def _load(cls, path: str | os.PathLike[str], password: str | bytes) -> Identity:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read identity file {str(path)!r}: {exc}") from exc
        return cls.from_pem(pem, password)

    def __repr__(self) -> str:
        return f"Identity(fingerprint={self.fingerprint[:16]}...)"


def _password_bytes(password: str | bytes) -> bytes:
    if isinstance(password, str):
        try:
            password = password.encode()
        except UnicodeEncodeError:
            raise UsageError("password holds a lone surrogate: not valid Unicode") from None
    if not isinstance(password, bytes) or not password:
        raise UsageError("password must be a non-empty str or bytes")
    if len(password) > _MAX_PASSWORD:
        raise UsageError(f"password must be at most {_MAX_PASSWORD} bytes (OpenSSL's limit)")
    return password

"""The example's secrets, sealed in an :class:`~converge.extensions.storage.EncryptedStore`.

Three secrets: the GitHub webhook secret (verifies inbound requests), the chat target's
signing secret (signs outbound ones) and the triage agent's Ed25519 key (its identity:
the agent's decision records are kept under it, so a restarted process replays what the
killed one decided instead of deciding, and replying, again). Each comes from its
environment variable when set (and is then sealed, replacing the stored one), else from
the sealed store, else it is generated once and sealed; later starts need no variable at
all. Agent processes sharing one Redis store (``--role agents``) must share the agent key
too: set ``TRIAGE_AGENT_KEY`` to the same value on each.

The store's AES-256-GCM key: ``TRIAGE_SECRETS_KEY`` (32 bytes, base64) when set;
otherwise it is derived with :func:`~converge.extensions.crypto.derive_key` (PBKDF2,
600,000 iterations) from the passphrase in ``TRIAGE_PASSPHRASE`` and a random salt kept
beside the store (``secrets.salt``). Without either variable a demo passphrase is used
and a warning says so: fine on a laptop, never in production.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from converge.core import Identity
from converge.errors import ConfigurationError, DecryptionError
from converge.extensions.crypto import aderive_key, secure_random_bytes
from converge.extensions.storage import EncryptedStore, SQLiteStore

__all__ = [
    "AGENT_KEY_ENV",
    "CHAT_SECRET_ENV",
    "DEMO_PASSPHRASE",
    "GITHUB_SECRET_ENV",
    "KEY_ENV",
    "PASSPHRASE_ENV",
    "Secrets",
    "aload_secrets",
    "asecrets_key",
]

KEY_ENV = "TRIAGE_SECRETS_KEY"
PASSPHRASE_ENV = "TRIAGE_PASSPHRASE"
GITHUB_SECRET_ENV = "GITHUB_WEBHOOK_SECRET"
CHAT_SECRET_ENV = "CHAT_SIGNING_SECRET"
AGENT_KEY_ENV = "TRIAGE_AGENT_KEY"  # base64 of the agent's 32-byte Ed25519 private key
DEMO_PASSPHRASE = "converge-triage-demo-passphrase"
_ITERATIONS = 600_000  # OWASP's current advice for PBKDF2-HMAC-SHA256


@dataclass(frozen=True, slots=True)
class Secrets:
    """The example's secrets and where the sealing key came from.

    Attributes:
        github: The GitHub webhook secret.
        chat: The chat target's Standard Webhooks signing secret (``whsec_...``).
        agent: The triage agent's identity.
        key_source: How the sealing key was obtained (printed at start).
        warnings: Things the operator should fix (a demo passphrase, ...).
    """

    github: str
    chat: str
    agent: Identity
    key_source: str
    warnings: tuple[str, ...] = ()


def _key_bytes(text: str, name: str) -> bytes:
    """The 32 bytes ``text`` holds in base64 (``name`` says where it came from)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigurationError(f"{name} must be base64 of 32 bytes") from exc
    if len(raw) != 32:
        raise ConfigurationError(f"{name} must be base64 of 32 bytes, not {len(raw)}")
    return raw


def _identity(text: str) -> Identity:
    return Identity(Ed25519PrivateKey.from_private_bytes(_key_bytes(text, AGENT_KEY_ENV)))


async def asecrets_key(workdir: Path, env: Mapping[str, str]) -> tuple[bytes, str, list[str]]:
    """The sealing key, a description of its source, and warnings."""
    raw = env.get(KEY_ENV)
    if raw:
        return _key_bytes(raw, KEY_ENV), f"AES-256 key from ${KEY_ENV}", []
    warnings = []
    passphrase = env.get(PASSPHRASE_ENV)
    if not passphrase:
        passphrase = DEMO_PASSPHRASE
        warnings.append(f"sealing secrets with the demo passphrase: set {PASSPHRASE_ENV}")
    salt_file = anyio.Path(workdir / "secrets.salt")
    if not await salt_file.exists():
        await salt_file.write_bytes(secure_random_bytes(16))
    key = await aderive_key(passphrase, await salt_file.read_bytes(), iterations=_ITERATIONS)
    return key, f"derive_key(${PASSPHRASE_ENV}, salt in {salt_file.name}), PBKDF2", warnings


async def _secret(store: EncryptedStore, name: str, env_value: str | None, fresh: str) -> str:
    if env_value:
        await store.aput(name, env_value)
        return env_value
    found = await store.aget(name)
    if isinstance(found, str):
        return found
    await store.aput(name, fresh)
    return fresh


async def aload_secrets(workdir: Path, env: Mapping[str, str] | None = None) -> Secrets:
    """Open the sealed store in ``workdir`` and return the secrets (see the module doc).

    Raises:
        ConfigurationError: If the key does not open the stored secrets (a wrong
            passphrase or key) or ``TRIAGE_SECRETS_KEY`` is malformed.
    """
    env = os.environ if env is None else env
    key, source, warnings = await asecrets_key(workdir, env)
    store = EncryptedStore(SQLiteStore(workdir / "secrets.sqlite3"), keys={"triage": key})
    async with store:
        try:
            github = await _secret(
                store, "github", env.get(GITHUB_SECRET_ENV), secure_random_bytes(24).hex()
            )
            chat = await _secret(
                store,
                "chat",
                env.get(CHAT_SECRET_ENV),
                "whsec_" + base64.b64encode(secure_random_bytes(24)).decode(),
            )
            agent_env = env.get(AGENT_KEY_ENV)
            if agent_env:
                _identity(agent_env)  # refuse a malformed key before sealing it
            agent = await _secret(
                store, "agent", agent_env, base64.b64encode(secure_random_bytes(32)).decode()
            )
        except DecryptionError as exc:
            raise ConfigurationError(
                f"the sealed secrets in {workdir / 'secrets.sqlite3'} do not open with this key: "
                f"set the {PASSPHRASE_ENV} (or {KEY_ENV}) they were sealed with, or delete "
                "secrets.sqlite3 and secrets.salt to start over"
            ) from exc
    return Secrets(github, chat, _identity(agent), source, tuple(warnings))

"""Identity: Ed25519 keys, fingerprints, encrypted save/load."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from converge.core import Identity
from converge.errors import IdentityError, SyncInEventLoopError, UsageError, WrongPasswordError


def test_sign_and_verify() -> None:
    ident = Identity()
    sig = ident.sign(b"data")
    assert len(sig) == 64
    assert ident.verify(b"data", sig)
    assert not ident.verify(b"other", sig)
    assert not Identity().verify(b"data", sig)
    assert not ident.verify(b"data", b"garbage")


def test_fingerprint_is_stable_and_unique() -> None:
    a, b = Identity(), Identity()
    assert len(a.fingerprint) == 64
    assert a.fingerprint == a.fingerprint
    assert a.fingerprint != b.fingerprint


def test_save_and_load_round_trip_with_owner_only_file(tmp_path: Path) -> None:
    ident = Identity()
    path = tmp_path / "agent.pem"
    ident.save(path, "s3cret")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert b"ENCRYPTED" in path.read_bytes()
    loaded = Identity.load(path, "s3cret")
    assert loaded.fingerprint == ident.fingerprint
    assert ident.verify(b"x", loaded.sign(b"x"))


def test_wrong_password_raises_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.pem"
    Identity().save(path, "right")
    with pytest.raises(WrongPasswordError):
        Identity.load(path, "wrong")


def test_damaged_file_raises_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.pem"
    path.write_bytes(b"not a key at all")
    with pytest.raises(WrongPasswordError):
        Identity.load(path, "pw")


def test_missing_file_raises_identity_error(tmp_path: Path) -> None:
    with pytest.raises(IdentityError):
        Identity.load(tmp_path / "absent.pem", "pw")


def test_empty_password_is_refused() -> None:
    with pytest.raises(UsageError):
        Identity().to_pem("")


def test_non_bytes_to_sign_is_refused() -> None:
    with pytest.raises(UsageError):
        Identity().sign("text")  # type: ignore[arg-type]


def test_non_bytes_to_verify_are_refused() -> None:
    ident = Identity()
    signature = ident.sign(bytes(5))
    with pytest.raises(UsageError):
        ident.verify(5, signature)  # type: ignore[arg-type]  # read as 5 zero bytes: True
    with pytest.raises(UsageError):
        ident.verify(b"x", 10**30)  # type: ignore[arg-type]  # raised OverflowError
    with pytest.raises(UsageError):
        Identity.from_pem(ident.to_pem("pw").decode(), "pw")  # type: ignore[arg-type]


def test_a_password_with_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(UsageError, match="surrogate"):
        Identity().to_pem("pw\ud800")  # raised UnicodeEncodeError


def test_a_password_over_openssls_limit_is_refused_and_one_at_it_works() -> None:
    ident = Identity()
    with pytest.raises(UsageError, match="1023"):
        ident.to_pem("p" * 1024)  # raised cryptography's ValueError
    pem = ident.to_pem(b"p" * 1023)
    assert Identity.from_pem(pem, b"p" * 1023).fingerprint == ident.fingerprint


@pytest.mark.parametrize("where", ["a directory", "a missing directory"])
def test_a_file_that_cannot_be_written_raises_identity_error_and_leaves_nothing(
    tmp_path: Path, where: str
) -> None:
    target = tmp_path if where == "a directory" else tmp_path / "missing" / "id.pem"
    with pytest.raises(IdentityError, match="cannot write"):  # raised OSError
        Identity().save(target, "pw")
    assert list(tmp_path.iterdir()) == []


BAD_PATHS = [5, "", "a\x00b", "a\ud800b"]  # TypeError, ..., ValueError, UnicodeEncodeError


@pytest.mark.parametrize("path", BAD_PATHS)
def test_a_path_that_is_no_file_name_is_refused(path: object) -> None:
    with pytest.raises(UsageError, match="path"):
        Identity().save(path, "pw")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="path"):
        Identity.load(path, "pw")  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize("path", BAD_PATHS)
async def test_a_path_that_is_no_file_name_is_refused_before_the_thread_hop(path: object) -> None:
    with pytest.raises(UsageError, match="path"):
        await Identity().asave(path, "pw")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="path"):
        await Identity.aload(path, "pw")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_async_save_and_load_round_trip(tmp_path: Path) -> None:
    ident = Identity()
    await ident.asave(tmp_path / "a.pem", "pw")
    assert (await Identity.aload(tmp_path / "a.pem", "pw")).fingerprint == ident.fingerprint
    with pytest.raises(WrongPasswordError):
        await Identity.aload(tmp_path / "a.pem", "nope")


@pytest.mark.anyio
async def test_sync_save_and_load_on_event_loop_name_the_async_forms(tmp_path: Path) -> None:
    with pytest.raises(SyncInEventLoopError, match="asave"):
        Identity().save(tmp_path / "a.pem", "pw")
    with pytest.raises(SyncInEventLoopError, match="aload"):
        Identity.load(tmp_path / "a.pem", "pw")

"""FileStore: one file per key, atomic and durable writes, optional cross-process locks.

On-disk layout (format version 1), all inside ``base_path``:

* ``k<escaped key>``: one file per key. The key's UTF-8 bytes are kept as is when they
  are ``a-z``, ``0-9``, ``-`` or ``_`` and written as ``%xx`` (lowercase hex) otherwise,
  so names are portable (no separators, no ``..``, no upper case for case-insensitive
  file systems, never a name Windows reserves) and decode back to the exact key.
* ``h<sha-256 hex of the key>``: the file of a key whose escaped name would exceed 200
  characters; its full key is read from the file itself.
* ``.tmp-<pid>-<random>``: a write in progress (or left by a crash; swept by ``list``).
* ``.locks/<nn>``: lock files, with ``locking=True`` only.

Each file holds a header (magic ``CVFS``, version, serializer tag, expiry as a Unix
time, key length), the key, the serialized value, and a CRC-32 of all of it, so a damaged
file is reported as :class:`~converge.errors.StoreCorruptedError`, never decoded into
garbage.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import re
import secrets
import struct
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from typing import Any, Final, NamedTuple, TypeVar

import anyio.to_thread

from converge._paths import check_path
from converge._sorting import sort_yielding
from converge._sync import check_sync_allowed
from converge.core.store import (
    Store,
    UpdateFn,
    check_changes,
    split_change,
    validate_key,
    validate_prefix,
    validate_ttl,
)
from converge.errors import (
    ClosedError,
    StoreCorruptedError,
    StoreError,
    StoreLockTimeoutError,
    UsageError,
)
from converge.extensions.storage._codec import (
    SerializerName,
    check_bool,
    check_timeout,
    check_update,
    get_serializer,
    key_bytes,
    key_from_bytes,
)

if sys.platform != "win32":
    import fcntl

__all__ = ["FileStore"]

R = TypeVar("R")

_MAGIC: Final = b"CVFS"
_VERSION: Final = 1
# magic, version, serializer tag, expires_at (Unix seconds, 0.0 = never), key length
_HEADER: Final = struct.Struct(">4sBBdI")
_CRC: Final = struct.Struct(">I")
_NAME_LIMIT: Final = 200  # file names are limited to 255 bytes almost everywhere
_STRIPES: Final = 64
_TMP_PREFIX: Final = ".tmp-"
_LOCK_DIR: Final = ".locks"
_PEEK: Final = 512
_FIRST_READ: Final = 64 * 1024
# A temp file is a crash leftover when its writer is gone and it is older than this.
_TMP_GRACE: Final = 10.0
# ... or, whoever wrote it, when it is older than this.
_TMP_MAX_AGE: Final = 3600.0
_O_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
_O_BINARY: Final = getattr(os, "O_BINARY", 0)
_UNREADABLE: Final = frozenset(
    {errno.EACCES, errno.EPERM, errno.EISDIR, errno.EIO, errno.EINVAL, errno.ELOOP}
)

_SAFE_BYTES: Final = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")
_ESCAPE: Final = tuple(chr(b) if b in _SAFE_BYTES else f"%{b:02x}" for b in range(256))
_PLAIN_NAME: Final = re.compile(r"[a-z0-9_-]+")
_ESCAPED_NAME: Final = re.compile(r"(?:[a-z0-9_-]|%[0-9a-f]{2})+")
_HASHED_NAME: Final = re.compile(r"h[0-9a-f]{64}")


# -- key <-> file name ------------------------------------------------------------------


def _name_for(key: str) -> str:
    """The file name for ``key``: ``k`` + escaped key, or ``h`` + SHA-256 if too long."""
    if len(key) < _NAME_LIMIT and _PLAIN_NAME.fullmatch(key):
        return "k" + key
    raw = key_bytes(key)
    escaped = "".join([_ESCAPE[b] for b in raw])
    if len(escaped) < _NAME_LIMIT:
        return "k" + escaped
    return "h" + hashlib.sha256(raw).hexdigest()


def _key_for(name: str) -> str | None:
    """The key a ``k`` file name stands for, or None if it is not one of ours."""
    body = name[1:]
    if not name.startswith("k") or not _ESCAPED_NAME.fullmatch(body):
        return None
    if "%" not in body:
        return body
    parts = body.split("%")
    raw = bytearray(parts[0].encode("ascii"))
    for part in parts[1:]:
        raw.append(int(part[:2], 16))
        raw += part[2:].encode("ascii")
    try:
        key = key_from_bytes(bytes(raw))
    except UnicodeDecodeError:
        return None
    # Only the canonical spelling counts: "%61" is not another name for "a".
    return key if _name_for(key) == name else None


# -- file contents ----------------------------------------------------------------------


class _Parsed(NamedTuple):
    expires_at: float
    tag: int
    raw_key: bytes
    payload: memoryview


def _parse(key: str | None, blob: bytes, *, full: bool = True) -> _Parsed:
    """Decode a file; ``key`` (when known) names the file in errors and must match.

    With ``full=False`` only the header and key are checked (``blob`` may be a prefix).
    """
    label = key if key is not None else "<unknown>"
    size = len(blob)
    if size < _HEADER.size + (_CRC.size if full else 0):
        raise StoreCorruptedError(label, f"file is truncated ({size} bytes)")
    magic, version, tag, expires_at, key_len = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        raise StoreCorruptedError(label, "not a converge FileStore file (bad magic)")
    if version != _VERSION:
        raise StoreCorruptedError(label, f"unsupported file format version {version}")
    view = memoryview(blob)
    key_end = _HEADER.size + key_len
    body_end = size - _CRC.size if full else size
    if key_end > body_end:
        raise StoreCorruptedError(label, "file is truncated")
    if full and zlib.crc32(view[:body_end]) != _CRC.unpack_from(blob, body_end)[0]:
        raise StoreCorruptedError(label, "checksum mismatch (damaged or truncated file)")
    raw_key = blob[_HEADER.size : key_end]
    if key is not None and raw_key != key_bytes(key):
        try:
            other = repr(key_from_bytes(raw_key))
        except UnicodeDecodeError:
            other = "another key"
        raise StoreCorruptedError(key, f"file holds key {other} instead")
    if expires_at != expires_at or expires_at < 0:  # NaN or negative
        raise StoreCorruptedError(label, "invalid expiry time")
    return _Parsed(expires_at, tag, raw_key, view[key_end:body_end])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


# -- in-process locks, shared by every FileStore on one directory -------------------------


class _StripeLocks:
    """Per-directory thread locks; key ``k`` uses stripe ``crc32(name) % 64``."""

    def __init__(self) -> None:
        self.stripes = [threading.Lock() for _ in range(_STRIPES)]


_registry: weakref.WeakValueDictionary[tuple[int, int], _StripeLocks] = (
    weakref.WeakValueDictionary()
)
_registry_lock = threading.Lock()


def _locks_for(path: str) -> _StripeLocks:
    st = os.stat(path)
    with _registry_lock:
        locks = _registry.get((st.st_dev, st.st_ino))
        if locks is None:
            locks = _registry[(st.st_dev, st.st_ino)] = _StripeLocks()
        return locks


def _reset_locks_in_child() -> None:
    # Threads that held these locks at fork time do not exist in the child.
    global _registry_lock
    _registry_lock = threading.Lock()
    for locks in list(_registry.values()):
        locks.stripes = [threading.Lock() for _ in range(_STRIPES)]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_locks_in_child)


# -- the store --------------------------------------------------------------------------


class FileStore(Store):
    """File-based storage using pickle.

    Keys are encoded to safe filenames to avoid path traversal and accidental directory
    escaping. Writes are atomic via temp-file + replace.

    Every write goes to a temporary file in ``base_path``, is fsynced, renamed over the
    key's file with ``os.replace``, and the directory is fsynced: after a crash (even
    SIGKILL mid-write) a key holds its old value or its new one, never a torn one, and
    a write that returned survives a power cut.

    Concurrency: every method is safe from any number of threads and tasks, and
    ``put_if_absent`` is atomic among them. With ``locking=True``, writes also take a
    ``flock`` on one of 64 lock files under ``base_path/.locks``, which makes
    ``put_if_absent``, expiry and every write atomic across *processes* sharing the
    directory (on a local file system). Without it, other processes may read, and even
    race ``put_if_absent`` on an absent key safely (it uses ``os.link``), but only one
    process should write.

    The async methods take one worker-thread hop per operation (open, read, verify and
    decode together); the sync methods run the same code directly and refuse to run on
    an event-loop thread.

    Args:
        base_path: Directory holding the store; created if missing.
        locking: Coordinate writers in several processes with file locks.
        serializer: ``"pickle"`` (any Python object) or ``"json"`` (JSON values only,
            the safe choice for a directory that others can write: reading a pickle can
            run arbitrary code).
        lock_timeout: Seconds to wait for a lock before raising
            :class:`~converge.errors.StoreLockTimeoutError`.

    Raises:
        UsageError: If an argument is invalid or ``base_path`` is not a directory.
    """

    atomic_put_if_absent = True
    supports_locking = True

    def __init__(
        self,
        base_path: str | os.PathLike[str],
        *,
        locking: bool = False,
        serializer: SerializerName = "pickle",
        lock_timeout: float = 10.0,
    ) -> None:
        path = check_path(base_path, "base_path")
        self._locking = check_bool(locking, "locking")
        if self._locking and sys.platform == "win32":
            raise UsageError("FileStore(locking=True) needs POSIX file locks (not Windows)")
        self._serializer = get_serializer(serializer)
        self._lock_timeout = check_timeout(lock_timeout, "lock_timeout")
        self._dir = os.path.abspath(path)
        try:
            os.makedirs(self._dir, exist_ok=True)
            if self._locking:
                os.makedirs(os.path.join(self._dir, _LOCK_DIR), exist_ok=True)
        except FileExistsError:
            raise UsageError(f"base_path {self._dir!r} exists and is not a directory") from None
        except OSError as exc:
            raise StoreError(
                exc.errno, f"cannot create FileStore directory {self._dir!r}: {exc.strerror}"
            ) from exc
        self._locks = _locks_for(self._dir)
        self._closed = False

    @property
    def base_path(self) -> str:
        """The store's directory (absolute)."""
        return self._dir

    @property
    def locking(self) -> bool:
        """True when writes are coordinated across processes with file locks."""
        return self._locking

    @property
    def serializer(self) -> SerializerName:
        """``"pickle"`` or ``"json"``."""
        return self._serializer.name

    def __repr__(self) -> str:
        return (
            f"FileStore({self._dir!r}, locking={self._locking}, "
            f"serializer={self._serializer.name!r})"
        )

    # -- locking -----------------------------------------------------------------------

    @staticmethod
    def _stripe(name: str) -> int:
        return zlib.crc32(name.encode("ascii")) % _STRIPES

    @contextmanager
    def _locked(self, *names: str, blocking: bool = True) -> Iterator[bool]:
        """Hold the stripe locks of files ``names``: thread locks, then flocks if locking.

        Stripes are taken in ascending order, so callers never deadlock each other.
        Yields False (holding nothing) when ``blocking`` is False and a lock is busy.
        """
        stripes = sorted({self._stripe(name) for name in names})
        deadline = time.monotonic() + self._lock_timeout
        with ExitStack() as stack:
            for stripe in stripes:
                lock = self._locks.stripes[stripe]
                wait = max(deadline - time.monotonic(), 0.0)
                if not (lock.acquire(timeout=wait) if blocking else lock.acquire(blocking=False)):
                    if not blocking:
                        yield False
                        return
                    raise StoreLockTimeoutError(
                        f"no lock on {self._dir!r} within {self._lock_timeout} s (busy thread)"
                    )
                stack.callback(lock.release)
            if self._locking:
                for stripe in stripes:
                    fd = self._open_lock_file(stripe)
                    stack.callback(os.close, fd)  # closing releases the flock
                    if not self._flock(fd, deadline, blocking):
                        yield False
                        return
            yield True

    def _open_lock_file(self, stripe: int) -> int:
        path = os.path.join(self._dir, _LOCK_DIR, f"{stripe:02d}")
        flags = os.O_RDWR | os.O_CREAT | _O_CLOEXEC
        try:
            return os.open(path, flags, 0o666)
        except FileNotFoundError:  # someone removed .locks; recreate it
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return os.open(path, flags, 0o666)

    def _flock(self, fd: int, deadline: float, blocking: bool) -> bool:
        delay = 0.0002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            if not blocking:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreLockTimeoutError(
                    f"no file lock on {self._dir!r} within {self._lock_timeout} s; "
                    "another process holds it"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.01)

    # -- file primitives ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self!r} was closed")

    def _read(self, key: str | None, path: str, limit: int = -1) -> bytes | None:
        """Read a whole file (or its first ``limit`` bytes); None if it does not exist."""
        try:
            fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | _O_BINARY)
        except FileNotFoundError:
            if os.path.islink(path):
                # Something put a link here whose target is gone: not an absent key.
                label = key if key is not None else "<unknown>"
                raise StoreCorruptedError(
                    label, "its file is a symbolic link whose target does not exist"
                ) from None
            return None
        except OSError as exc:
            raise self._read_error(key, exc) from exc
        try:
            if limit >= 0:
                return os.read(fd, limit)
            # Most values fit the first read; no fstat needed to size it.
            data = os.read(fd, _FIRST_READ)
            if len(data) < _FIRST_READ:
                return data
            parts = [data]
            size = os.fstat(fd).st_size
            while chunk := os.read(fd, max(size - len(data), _FIRST_READ)):
                parts.append(chunk)
            return b"".join(parts)
        except OSError as exc:
            raise self._read_error(key, exc) from exc
        finally:
            os.close(fd)

    def _read_error(self, key: str | None, exc: OSError) -> StoreError:
        if exc.errno in _UNREADABLE:
            label = key if key is not None else "<unknown>"
            return StoreCorruptedError(label, f"file is unreadable ({exc.strerror})")
        return StoreError(exc.errno, f"cannot read from {self._dir!r}: {exc.strerror}")

    def _write(self, path: str, parts: tuple[bytes, ...], *, exclusive: bool) -> bool:
        """Durably write ``parts`` to ``path``: temp file, fsync, rename/link, fsync dir.

        With ``exclusive`` the file is only created if absent (``os.link`` fails if it
        exists, atomically, across processes too); returns False if it existed.
        """
        tmp = os.path.join(self._dir, f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
        leftover: str | None = tmp  # removed on the way out unless renamed into place
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_BINARY, 0o666)
        try:
            try:
                _write_all(fd, parts)
                os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                        raise
                    # No hard links here (FAT, some network file systems): the stripe
                    # lock we hold makes check-then-replace atomic among our writers.
                    if os.path.lexists(path):
                        return False
                    os.replace(tmp, path)
                    leftover = None
            else:
                os.replace(tmp, path)
                leftover = None
            self._fsync_dir()
            return True
        finally:
            if leftover is not None:
                with suppress(FileNotFoundError):
                    os.unlink(leftover)

    def _fsync_dir(self) -> None:
        if os.name == "nt":  # directories cannot be fsynced there; NTFS journals renames
            return
        fd = os.open(self._dir, os.O_RDONLY | _O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _encode(self, key: str, value: Any, ttl: float | None) -> tuple[bytes, ...]:
        payload = self._serializer.dumps(key, value)
        raw_key = key_bytes(key)
        expires_at = 0.0 if ttl is None else time.time() + ttl
        header = _HEADER.pack(_MAGIC, _VERSION, self._serializer.tag, expires_at, len(raw_key))
        crc = zlib.crc32(payload, zlib.crc32(raw_key, zlib.crc32(header)))
        return header, raw_key, payload, _CRC.pack(crc)

    def _remove_if_expired(self, name: str) -> None:
        """Best-effort removal of an expired file, if it still is expired under its lock.

        Writers hold the same lock (across processes with ``locking=True``), so a value
        written since we read the expired one is seen here and kept. The whole file is
        checked first: a damaged expiry field must never get a file deleted.
        """
        path = os.path.join(self._dir, name)
        try:
            with self._locked(name, blocking=False) as held:
                if not held:
                    return  # busy: a later reader retries
                blob = self._read(None, path)
                if blob is None:
                    return
                expires_at = _parse(None, blob).expires_at  # verifies the checksum
                if expires_at and expires_at <= time.time():
                    os.unlink(path)
        except (OSError, StoreCorruptedError):
            pass  # gone already, damaged (kept, for get() to report), or not ours

    # -- the blocking core (sync methods call it directly, async ones in a thread) -------

    def _get(self, key: str) -> Any | None:
        self._check_open()
        name = _name_for(key)
        got = self._read(key, os.path.join(self._dir, name))
        if got is None:
            return None
        parsed = _parse(key, got)
        if parsed.expires_at and parsed.expires_at <= time.time():
            self._remove_if_expired(name)
            return None
        return self._serializer.loads(key, parsed.tag, parsed.payload)

    def _put(self, key: str, value: Any, ttl: float | None) -> None:
        self._check_open()
        name = _name_for(key)
        parts = self._encode(key, value, ttl)
        with self._writing(key), self._locked(name):
            self._write(os.path.join(self._dir, name), parts, exclusive=False)

    def _put_if_absent(self, key: str, value: Any, ttl: float | None) -> bool:
        self._check_open()
        name = _name_for(key)
        path = os.path.join(self._dir, name)
        parts = self._encode(key, value, ttl)
        with self._writing(key), self._locked(name):
            got = self._read(key, path)
            if got is None:
                return self._write(path, parts, exclusive=True)
            expires_at = _parse(key, got).expires_at
            if not expires_at or expires_at > time.time():
                return False
            # Expired: replace it. Every writer holds this stripe lock (across processes
            # with locking=True), so nobody can have written it since we read it.
            return self._write(path, parts, exclusive=False)

    def _delete(self, key: str) -> None:
        self._check_open()
        name = _name_for(key)
        with self._writing(key), self._locked(name):
            try:
                os.unlink(os.path.join(self._dir, name))
            except FileNotFoundError:
                return
            self._fsync_dir()

    def _update(self, keys: builtins.list[str], fn: UpdateFn[R], ttl: float | None) -> R:
        self._check_open()
        names = {key: _name_for(key) for key in keys}
        with self._writing(keys[0] if keys else "<none>"), self._locked(*names.values()):
            current = {key: self._get(key) for key in keys}
            changes, result = fn(current)
            check_changes(keys, changes)
            # Encode everything first: a value that does not serialize changes nothing.
            writes = {}
            for key, change in changes.items():
                value, key_ttl = split_change(change, ttl)
                writes[key] = None if value is None else self._encode(key, value, key_ttl)
            for key, parts in writes.items():
                path = os.path.join(self._dir, names[key])
                if parts is not None:
                    self._write(path, parts, exclusive=False)
                    continue
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                self._fsync_dir()
        return result

    def _list(self, prefix: str) -> builtins.list[str]:
        # The live keys starting with ``prefix``, unsorted.
        self._check_open()
        now = time.time()
        keys: builtins.list[str] = []
        try:
            with os.scandir(self._dir) as entries:
                names = [entry.name for entry in entries]
        except OSError as exc:
            raise StoreError(exc.errno, f"cannot list {self._dir!r}: {exc.strerror}") from exc
        for name in names:
            if name.startswith("k"):
                key = _key_for(name)
                if key is None or not key.startswith(prefix):
                    continue
                if self._live(key, name, now) is not None:
                    keys.append(key)
            elif name.startswith("h") and _HASHED_NAME.fullmatch(name):
                key = self._live(None, name, now)
                if key is not None and key.startswith(prefix):
                    keys.append(key)
            elif name.startswith(_TMP_PREFIX):
                self._sweep_temp(name)
        return keys

    def _live(self, key: str | None, name: str, now: float) -> str | None:
        """The key of file ``name`` if it is live (or unreadable but named), else None."""
        path = os.path.join(self._dir, name)
        try:
            head = self._read(key, path, _PEEK)
            if head is None:
                return None
            key_len = _HEADER.unpack_from(head)[4] if len(head) >= _HEADER.size else 0
            if _HEADER.size + key_len > len(head):  # a long key: read the whole header
                try:
                    size = os.path.getsize(path)
                except FileNotFoundError:
                    return None  # deleted meanwhile
                except OSError as exc:
                    raise self._read_error(key, exc) from exc
                if _HEADER.size + key_len + _CRC.size > size:
                    # A damaged length field: never size a read by it.
                    raise StoreCorruptedError(key or "<unknown>", "file is truncated")
                head = self._read(key, path, _HEADER.size + key_len)
                if head is None:
                    return None
            parsed = _parse(key, head, full=False)
        except StoreCorruptedError:
            # A damaged file under a readable name is listed, so that get() reports it
            # and delete() can remove it; a damaged hashed file cannot be named.
            return key
        if parsed.expires_at and parsed.expires_at <= now:
            # The header was read without its checksum: before trusting the expiry,
            # check the whole file. A damaged one stays listed so get() reports it.
            try:
                blob = self._read(key, path)
                if blob is None:
                    return None
                _parse(key, blob)
            except StoreCorruptedError:
                return key
            self._remove_if_expired(name)
            return None
        if key is not None:
            return key
        try:
            stored = key_from_bytes(parsed.raw_key)
        except UnicodeDecodeError:
            return None
        # A hashed file must belong under its name (not copied from elsewhere).
        return stored if _name_for(stored) == name else None

    def _sweep_temp(self, name: str) -> None:
        path = os.path.join(self._dir, name)
        try:
            age = time.time() - os.stat(path).st_mtime
            pid_text = name[len(_TMP_PREFIX) :].split("-", 1)[0]
            pid = int(pid_text) if pid_text.isdigit() else 0
            dead = pid != os.getpid() and not _pid_alive(pid)
            if age > _TMP_MAX_AGE or (dead and age > _TMP_GRACE):
                os.unlink(path)
        except OSError:
            pass  # finished and renamed meanwhile, or not ours to remove

    @contextmanager
    def _writing(self, key: str) -> Iterator[None]:
        """Map OS errors of a write to StoreError naming the key and the directory."""
        try:
            yield
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(
                exc.errno, f"cannot write key {key!r} in {self._dir!r}: {exc.strerror}"
            ) from exc

    # -- sync surface ------------------------------------------------------------------

    def get(self, key: str) -> Any | None:
        """Retrieve a value."""
        validate_key(key)
        check_sync_allowed("FileStore.aget")
        return self._get(key)

    def put(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store a value."""
        validate_key(key)
        seconds = validate_ttl(ttl)
        check_sync_allowed("FileStore.aput")
        self._put(key, value, seconds)

    def delete(self, key: str) -> None:
        """Delete a value."""
        validate_key(key)
        check_sync_allowed("FileStore.adelete")
        self._delete(key)

    def list(self, prefix: str = "") -> builtins.list[str]:
        """List keys starting with prefix."""
        validate_prefix(prefix)
        check_sync_allowed("FileStore.alist")
        keys = self._list(prefix)
        keys.sort()
        return keys

    def put_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Store value only if key is absent. Return True if stored, False if key existed.

        Atomic across threads, and across processes when ``locking=True``. An expired
        key counts as absent.
        """
        validate_key(key)
        seconds = validate_ttl(ttl)
        check_sync_allowed("FileStore.aput_if_absent")
        return self._put_if_absent(key, value, seconds)

    def update(self, keys: Sequence[str], fn: UpdateFn[R], *, ttl: float | None = None) -> R:
        """Atomic read-modify-write (sync form of :meth:`aupdate`)."""
        names = check_update(keys, fn)
        seconds = validate_ttl(ttl)
        check_sync_allowed("FileStore.aupdate")
        return self._update(names, fn, seconds)

    def close(self) -> None:
        """Mark the store closed (it holds no open files between calls). Idempotent."""
        self._closed = True

    # -- async surface -----------------------------------------------------------------

    async def aget(self, key: str) -> Any | None:
        """Return the value under ``key``, or None if absent or expired.

        Raises:
            StoreCorruptedError: If the key's file is damaged or unreadable.
        """
        validate_key(key)
        return await anyio.to_thread.run_sync(self._get, key)

    async def aput(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Atomically and durably store ``value`` under ``key``."""
        validate_key(key)
        seconds = validate_ttl(ttl)
        await anyio.to_thread.run_sync(self._put, key, value, seconds)

    async def adelete(self, key: str) -> None:
        """Delete ``key``; deleting an absent key is not an error."""
        validate_key(key)
        await anyio.to_thread.run_sync(self._delete, key)

    async def alist(self, prefix: str = "") -> builtins.list[str]:
        """Return the live keys starting with ``prefix``, sorted.

        Also removes expired files and temp files left by crashed writers.
        """
        validate_prefix(prefix)
        # Sorted on the loop in steps: a sort in the worker thread would hold the GIL.
        return await sort_yielding(await anyio.to_thread.run_sync(self._list, prefix))

    async def aput_if_absent(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent or expired; atomic (see class doc)."""
        validate_key(key)
        seconds = validate_ttl(ttl)
        return await anyio.to_thread.run_sync(self._put_if_absent, key, value, seconds)

    async def aupdate(self, keys: Sequence[str], fn: UpdateFn[R], *, ttl: float | None = None) -> R:
        """Atomically read ``keys``, let ``fn`` compute changes, and write them.

        The keys' stripe locks are held throughout (file locks too with ``locking=True``,
        making it atomic across processes); ``fn`` runs in the worker thread. Each written
        key is atomic and durable on its own: a crash in the middle of a multi-key
        update can leave some keys written and others not. Readers do not lock, so they
        may see some keys of an update before the others.

        Returns:
            The ``result`` part of ``fn``'s return value.
        """
        names = check_update(keys, fn)
        seconds = validate_ttl(ttl)
        return await anyio.to_thread.run_sync(self._update, names, fn, seconds)

    async def aclose(self) -> None:
        """Mark the store closed. Idempotent."""
        self._closed = True


def _write_all(fd: int, parts: tuple[bytes, ...]) -> None:
    if hasattr(os, "writev"):
        total = sum(len(p) for p in parts)
        written = os.writev(fd, parts)
        if written == total:
            return
        data = memoryview(b"".join(parts))[written:]
    else:
        data = memoryview(b"".join(parts))
    while data:
        data = data[os.write(fd, data) :]

"""The event log: inbound events and outbound deliveries as operators see them.

An :class:`EventLog` reads the connector's durable queues (the inbox's records are the
*events*, the outbox's are the *deliveries*) and offers what the CLI, the admin API and
the inspector page show: listings with filters, one record with its attempts (signature
headers redacted), replay, purge of dead letters, and a bound on how many finished
records are kept (:meth:`EventLog.atrim`).
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio

from converge._numbers import check_positive
from converge._pacing import Spread, check_spread
from converge._repr import safe_repr
from converge._sorting import in_pieces, sort_yielding
from converge.durable import STATUSES as _STATUSES
from converge.durable import Attempt, DurableQueue, Record
from converge.errors import FormatError, UsageError
from converge.extensions.connectors.logs import redact_headers

__all__ = [
    "SECTIONS",
    "EventLog",
    "RecordQueue",
    "Section",
    "as_record",
    "iso_time",
    "last_result",
    "parse_since",
    "record_section",
    "record_view",
]

#: What an event log lists: inbound events, outbound deliveries, dead letters of both.
SECTIONS = ("events", "deliveries", "dead-letters")
Section = Literal["events", "deliveries", "dead-letters"]

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])\Z")
_UNIT_SEC = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DONE_OR_DEAD = ("acknowledged", "delivered", "dead")
# Records replayed at once, or purged one by one, between two turns of the event loop
# (about 2 ms on a MemoryStore, which never yields by itself).
_STEP = 32


class RecordQueue(Protocol):
    """What the event log needs of a queue (:class:`converge.durable.DurableQueue` fits)."""

    async def aget(self, record_id: str) -> Record | None:
        """The record with this id, or None."""

    async def alist(
        self,
        *,
        status: str | None = None,
        key: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Record]:
        """Records, newest first."""

    async def areplay(self, record_id: str) -> Record | None:
        """Make a done or dead record pending again."""

    async def apurge(self, record_id: str) -> Record | None:
        """Delete a record for good."""


def iso_time(unix: float | None) -> str | None:
    """``2026-01-31T12:00:00.123Z`` for a Unix time (None stays None)."""
    if unix is None:
        return None
    moment = _dt.datetime.fromtimestamp(unix, _dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_since(text: str, *, now: float | None = None) -> float:
    """A point in time given as ``15m``/``2h``/``7d`` ago, an ISO 8601 time or Unix seconds.

    Args:
        text: ``"30s"``, ``"15m"``, ``"2h"``, ``"1d"``, ``"1w"``; ``"2026-01-31T12:00"``
            (UTC unless it names an offset); or ``"1767182400"``.
        now: The current Unix time (``time.time()`` by default).

    Returns:
        Unix seconds.

    Raises:
        UsageError: If ``text`` is none of these.
    """
    text = text.strip()
    relative = _RELATIVE.match(text)
    if relative:
        current = time.time() if now is None else now
        return current - float(relative.group(1)) * _UNIT_SEC[relative.group(2)]
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(value) and value >= 0:
            return value
    try:
        moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"cannot read the time {text!r}: use 15m, 2h, 7d, an ISO time "
            "(2026-01-31T12:00Z) or Unix seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.UTC)
    return moment.timestamp()


def _redacted(value: Any) -> Any:
    """``value`` with every mapping under a ``headers`` key passed through redaction."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "headers" and isinstance(item, Mapping):
                out[key] = redact_headers({str(k): str(v) for k, v in item.items()})
            else:
                out[key] = _redacted(item)
        return out
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def last_result(record: Record) -> str:
    """A short account of the latest attempt: ``"HTTP 200"``, ``"HTTP 503 timeout"``, ...

    A finished record shows how it finished, not an error from before a replay.
    """
    last = record.attempts[-1] if record.attempts else None
    error = None if record.status in ("acknowledged", "delivered") else record.last_error
    if last is not None:
        error = last.error if last.error else error
        if record.status in ("acknowledged", "delivered"):
            error = None
    parts = []
    if last is not None and last.status_code is not None:
        parts.append(f"HTTP {last.status_code}")
        if error == f"status {last.status_code}":
            error = None
    if error:
        parts.append(error)
    return " ".join(parts)


def record_section(record: Record) -> str:
    """``"events"`` for an inbound record, ``"deliveries"`` for an outbound one."""
    return "events" if record.kind == "inbound" else "deliveries"


def record_view(
    record: Record, *, section: str | None = None, data: bool = False
) -> dict[str, Any]:
    """The JSON form operators see of a record (CLI ``--json``, admin API).

    Args:
        record: The record.
        section: ``"events"`` or ``"deliveries"`` (from the record's kind when None).
        data: Include the record's data, signature and authorization headers redacted.

    Returns:
        A JSON-compatible dict: id, section, kind, key, status, times (Unix and ISO),
        attempt count, last error, last status code, every kept attempt.
    """
    last = record.attempts[-1] if record.attempts else None
    view: dict[str, Any] = {
        "id": record.id,
        "section": section or record_section(record),
        "kind": record.kind,
        "key": record.key,
        "status": record.status,
        "created": record.created,
        "created_at": iso_time(record.created),
        "updated": record.updated,
        "updated_at": iso_time(record.updated),
        "attempt_count": record.attempt_count,
        "last_error": record.last_error,
        "last_status_code": last.status_code if last else None,
        "last_latency_ms": last.latency_ms if last else None,
        "last_result": last_result(record),
        "attempts": [
            {**attempt.to_dict(), "at_iso": iso_time(attempt.at)} for attempt in record.attempts
        ],
    }
    if data:
        view["data"] = _redacted(record.data)
    return view


def as_record(found: Any, kind: str = "outbound") -> Record:
    """A :class:`~converge.durable.Record` for a queue item of another shape.

    The outbox keeps its own record class whose ``to_dict()`` has the durable record's
    fields (``status``, ``key``, ``data``, ``attempts``, ...): it is read through that.

    Raises:
        UsageError: If ``found`` has no record shape.
    """
    if isinstance(found, Record):
        return found
    try:
        data = found.to_dict()
        attempts = tuple(
            Attempt(
                at=float(a.get("at") or 0.0),
                status_code=a.get("status_code"),
                error=a.get("error") or None,
                latency_ms=a.get("latency_ms"),
                outcome=str(a.get("outcome") or "retry"),
            )
            for a in data.get("attempts") or ()
        )
        counted = data.get("attempt_count")
        inner = data.get("data")
        if not isinstance(counted, int) and isinstance(inner, Mapping):
            counted = inner.get("counted")
        return Record(
            id=str(data["id"]),
            kind=str(data.get("kind") or kind),
            status=str(data["status"]),
            key=str(data.get("key") or ""),
            data=dict(inner) if isinstance(inner, Mapping) else {},
            created=float(data.get("created") or 0.0),
            updated=float(data.get("updated") or data.get("created") or 0.0),
            attempts=attempts,
            attempt_count=max(len(attempts), counted if isinstance(counted, int) else 0),
            lease_owner=data.get("lease_owner"),
            last_error=data.get("last_error") or None,
        )
    except (AttributeError, KeyError, TypeError, ValueError, FormatError) as exc:
        raise UsageError(f"not a queue record: {type(found).__name__}") from exc


class _Adapted:
    """A queue whose items are not :class:`Record` objects, read as records."""

    def __init__(self, queue: Any, kind: str, statuses: tuple[str, ...]) -> None:
        self._queue = queue
        self._kind = kind
        self._statuses = statuses
        # The durable queue behind it (an Outbox's), for batched trimming.
        self.durable: DurableQueue | None = getattr(queue, "queue", None)

    async def aget(self, record_id: str) -> Record | None:
        found = await self._queue.aget(record_id)
        return None if found is None else as_record(found, self._kind)

    async def alist(
        self,
        *,
        status: str | None = None,
        key: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Record]:
        if status is not None and status not in self._statuses:
            return []
        found = await self._queue.alist(status=status, key=key, since=since, limit=limit)
        return [as_record(item, self._kind) for item in found]

    async def areplay(self, record_id: str) -> Record | None:
        found = await self._queue.areplay(record_id)
        return None if found is None else as_record(found, self._kind)

    async def apurge(self, record_id: str) -> Record | None:
        before = await self.aget(record_id)
        result = await self._queue.apurge(record_id)
        if result is None or result is False:
            return None
        return as_record(result, self._kind) if result is not True else before


def _of_queue(name: str, found: list[tuple[float, str]]) -> list[tuple[float, str, str]]:
    """``(created, id)`` pairs of the queue ``name`` as ``(created, id, name)``."""
    return [(created, record_id, name) for created, record_id in found]


def _finished_stamps(records: list[Record]) -> list[tuple[float, str]]:
    """``(updated, id)`` of the finished records among ``records``."""
    return [(r.updated, r.id) for r in records if r.status in _DONE_OR_DEAD]


def _durable(queue: RecordQueue) -> DurableQueue | None:
    """The durable queue behind ``queue``: itself, or the one an adapted outbox holds."""
    durable = queue if isinstance(queue, DurableQueue) else getattr(queue, "durable", None)
    return durable if isinstance(durable, DurableQueue) else None


@dataclass(frozen=True, slots=True)
class _Found:
    section: str
    record: Record


class EventLog:
    """Listings, lookups, replays and purges over the connector's durable queues.

    Args:
        events: The inbound queue (the inbox), or None.
        deliveries: The outbound queue (the outbox), or None.
        max_records: Finished records (acknowledged, delivered, dead) kept per queue at
            most; :meth:`atrim` deletes the oldest beyond it. The retention period of
            the queues bounds them in time as well.
        keys: The providers (``"events"``) and targets (``"deliveries"``) to offer as
            filters; None: the keys found in the records.

    Raises:
        UsageError: For invalid arguments.
    """

    def __init__(
        self,
        *,
        events: RecordQueue | None = None,
        deliveries: RecordQueue | None = None,
        max_records: int = 10_000,
        keys: Mapping[str, list[str]] | None = None,
    ) -> None:
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
            raise UsageError("max_records must be an integer >= 1")
        if keys is not None and (
            not isinstance(keys, Mapping)
            or not all(
                isinstance(names, list | tuple) and all(isinstance(n, str) for n in names)
                for names in keys.values()
            )
        ):
            raise UsageError("keys must map a section to a list of names, or be None")
        self._queues: dict[str, RecordQueue] = {}
        if events is not None:
            self._queues["events"] = events
        if deliveries is not None:
            self._queues["deliveries"] = deliveries
        self.max_records = max_records
        self._keys = {section: sorted(names) for section, names in (keys or {}).items()}

    @classmethod
    def for_connector(cls, connector: Any, *, max_records: int = 10_000) -> EventLog:
        """The event log of a :class:`~converge.extensions.connectors.WebhookConnector`.

        Uses ``connector.inbox`` for events and ``connector.outbox_queue`` (or
        ``connector.outbox`` once it is a durable queue) for deliveries, where present.
        """

        def queue(*names: str) -> RecordQueue | None:
            for name in names:
                found = getattr(connector, name, None)
                if found is None or not all(
                    callable(getattr(found, m, None)) for m in ("aget", "alist", "areplay")
                ):
                    continue
                if isinstance(found, DurableQueue):
                    return found
                # The outbox's own records (same fields, their own class).
                return _Adapted(found, "outbound", ("pending", "leased", "delivered", "dead"))
            return None

        profiles = getattr(getattr(connector, "security", None), "profiles", {}) or {}
        targets = getattr(connector, "targets", {}) or {}
        return cls(
            events=queue("inbox"),
            deliveries=queue("outbox_queue", "outbox"),
            max_records=max_records,
            keys={
                "events": list(profiles),
                "deliveries": list(targets),
                "dead-letters": sorted({*profiles, *targets}),
            },
        )

    async def akeys(self, section: str) -> list[str]:
        """The providers or targets of a section, for filters (configured ones if known)."""
        known = self._keys.get(section)
        if known is not None:
            return list(known)
        return sorted({r.key for r in await self.alist(section, limit=1000)})

    @property
    def sections(self) -> tuple[str, ...]:
        """The sections this log can list (``events``, ``deliveries``, ``dead-letters``)."""
        return (*self._queues, "dead-letters") if self._queues else ()

    def _queue(self, section: str) -> RecordQueue:
        if section not in SECTIONS:
            raise UsageError(f"section must be one of {SECTIONS}, not {safe_repr(section)}")
        found = self._queues.get(section)
        if found is None:
            raise UsageError(f"this gateway keeps no {section} (its connector has no such queue)")
        return found

    async def alist(
        self,
        section: str,
        *,
        key: str | None = None,
        status: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[Record]:
        """Records of a section, newest first.

        Args:
            section: ``"events"``, ``"deliveries"`` or ``"dead-letters"`` (both kinds).
            key: Only this provider (events) or target (deliveries).
            status: Only this status.
            since: Only records created at or after this Unix time.
            limit: Most records returned.

        Raises:
            UsageError: For an unknown section or status, or a bad limit.
        """
        if status is not None and status not in _STATUSES:
            raise UsageError(f"status must be one of {_STATUSES}, not {safe_repr(status)}")
        if section == "dead-letters":
            if status not in (None, "dead"):
                return []
            found: list[Record] = []
            for queue in self._queues.values():
                found += await queue.alist(status="dead", key=key, since=since, limit=limit)
            found.sort(key=lambda r: (r.created, r.id), reverse=True)
            return found[:limit]
        return await self._queue(section).alist(status=status, key=key, since=since, limit=limit)

    def _names(self, section: str) -> list[str]:
        """The queues a section reads: every one for ``dead-letters``, else its own
        (a UsageError for an unknown section, or one this log does not keep)."""
        if section == "dead-letters":
            return list(self._queues)
        self._queue(section)  # validates the section
        return [section]

    async def _find(self, record_id: str, section: str | None) -> _Found | None:
        names = list(self._queues) if section is None else self._names(section)
        for name in names:
            record = await self._queues[name].aget(record_id)
            if record is not None:
                if section == "dead-letters" and record.status != "dead":
                    continue
                return _Found(name, record)
        return None

    async def aget(self, record_id: str, section: str | None = None) -> Record | None:
        """The record with this id (in ``section``, or in any queue when None)."""
        found = await self._find(record_id, section)
        return found.record if found else None

    async def areplay(self, record_id: str, section: str | None = None) -> Record | None:
        """Hand a finished or dead record to its consumer again (pending, due now).

        An event is handed on again (to its bus subscriber or forward target); a
        delivery is sent again, with a fresh attempt budget.

        Returns:
            The pending record, or None if there is no such finished or dead record.
        """
        found = await self._find(record_id, section)
        if found is None or found.record.status not in _DONE_OR_DEAD:
            return None
        return await self._queues[found.section].areplay(record_id)

    async def areplay_since(
        self,
        since: float,
        *,
        section: str = "events",
        key: str | None = None,
        limit: int | None = None,
    ) -> list[Record]:
        """Replay every finished or dead record of ``section`` created since ``since``.

        Args:
            since: Unix time.
            section: ``events``, ``deliveries`` or ``dead-letters``.
            key: Only records of this provider or target.
            limit: Only the newest ``limit`` records since ``since`` (None: all of them).

        Returns:
            The records replayed (oldest first).
        """
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise UsageError("limit must be an integer >= 1 (or None: all of them)")
        found: list[tuple[float, str, str]] = []
        for name in self._names(section):
            finished = await self._finished(name, key, since, section)
            found += await in_pieces(finished, functools.partial(_of_queue, name))
        found = await sort_yielding(found)  # oldest first, in steps (100,000 in one: 20 ms)
        chosen = found[-limit:] if limit is not None else found
        replayed: list[Record] = []
        for start in range(0, len(chosen), _STEP):
            replayed += await self._replay_step(chosen[start : start + _STEP])
        return replayed

    async def _replay_step(self, step: list[tuple[float, str, str]]) -> list[Record]:
        """Replay ``step``'s records at once (their order kept in the result): a store
        with group commit (SQLite) writes them in one transaction and one sync, where
        10,000 replays one by one took 8.5 s; and the event loop turns between steps on
        any store (10,000 replays in a row held it for 0.7 s on a MemoryStore). The
        first error, in order, is raised once every replay of the step has ended."""
        results: list[Record | Exception | None] = [None] * len(step)

        async def replay(i: int, record_id: str, name: str) -> None:
            try:
                results[i] = await self._queues[name].areplay(record_id)
            except Exception as exc:
                results[i] = exc

        async with anyio.create_task_group() as tg:
            for i, (_, record_id, name) in enumerate(step):
                tg.start_soon(replay, i, record_id, name)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return [result for result in results if isinstance(result, Record)]

    async def _finished(
        self, name: str, key: str | None, since: float, section: str
    ) -> list[tuple[float, str]]:
        """``(created, id)`` of a queue's finished records since ``since`` (its dead
        ones only, for ``dead-letters``); a durable queue's without building them
        (10,000 records built at once held the event loop for 100 ms)."""
        queue = self._queues[name]
        if not isinstance(queue, DurableQueue):
            every = await queue.alist(key=key, since=since, limit=2**31 - 1)
            wanted = ("dead",) if section == "dead-letters" else _DONE_OR_DEAD
            return [(r.created, r.id) for r in every if r.status in wanted]
        statuses = ["dead"]
        if section != "dead-letters":
            statuses.append(queue.transitions.done_status)
        return [
            found
            for status in statuses
            for found in await queue.alisted(status=status, key=key, since=since)
        ]

    async def apurge_dead(self, record_id: str) -> Record | None:
        """Delete a dead letter for good (other records are left alone).

        Returns:
            The deleted dead letter, or None if there is no dead letter with this id.
        """
        found = await self._find(record_id, "dead-letters")
        if found is None:
            return None
        return await self._queues[found.section].apurge(record_id)

    async def atrim(self, *, spread_sec: float = 0.0) -> int:
        """Delete the oldest finished records beyond ``max_records`` in each queue.

        On a durable queue (the connector's inbox and outbox) this is
        :meth:`DurableQueue.atrim_finished`: two key listings while within the bound,
        else batched deletes (and reads of the records finished elsewhere since).
        Another :class:`RecordQueue` has every record read and each old one purged on
        its own. Run it now and then (:meth:`run_trimmer`), never per request.

        Args:
            spread_sec: Spread the trim's deletes over about this many seconds (see
                :meth:`DurableQueue.atrim_finished`): the queues take turns, each
                spreading its own over an equal share of what is left of the span, so
                that one with nothing to delete leaves its share to the next; 0 (the
                default): at full speed.

        Returns:
            How many records were deleted.
        """
        end = anyio.current_time() + check_spread(spread_sec)
        deleted = 0
        queues = list(self._queues.values())
        for turn, queue in enumerate(queues):
            spread = max(0.0, end - anyio.current_time()) / (len(queues) - turn)
            durable = _durable(queue)
            if durable is not None:
                deleted += await durable.atrim_finished(self.max_records, spread_sec=spread)
                continue
            # Picked out and sorted in steps: at once, 100,000 held the loop 77-134 ms.
            finished = await sort_yielding(
                await in_pieces(await queue.alist(limit=2**31 - 1), _finished_stamps)
            )
            old = finished[: max(0, len(finished) - self.max_records)]
            pace = Spread(len(old), _STEP, spread)
            for n, (_, record_id) in enumerate(old, 1):
                if await queue.apurge(record_id) is not None:
                    deleted += 1
                if n % _STEP == 0:
                    await pace.step()
        return deleted

    async def arecount(self, section: str) -> int:
        """Recount the open records of ``events`` or ``deliveries`` and repair the
        counters that bound ``max_pending`` (:meth:`DurableQueue.arecount`): after a
        crash on a FileStore, with the queue quiet.

        Returns:
            How many records are open.

        Raises:
            UsageError: For another section, or a queue that keeps no counters.
        """
        durable = _durable(self._queue(section))
        if durable is None:
            raise UsageError(f"the {section} queue keeps no counters to recount")
        return await durable.arecount()

    async def run_trimmer(self, interval_sec: float = 60.0) -> None:
        """Call :meth:`atrim` every ``interval_sec`` seconds until cancelled.

        Each trim spreads its deletes over half the interval (``spread_sec``): beside a
        busy SQLite gateway, deletes at full speed raised the requests' p99 by about 40%
        while they lasted. The next trim starts an interval after one ends. A
        failed trim (say, the store is briefly down) is retried at the next interval.

        Raises:
            UsageError: If ``interval_sec`` is not a finite number above 0.
        """
        import logging

        interval_sec = check_positive("interval_sec", interval_sec)

        log = logging.getLogger("converge.gateway")
        while True:
            try:
                trimmed = await self.atrim(spread_sec=interval_sec / 2)
            except Exception as exc:  # a sweep must never take the gateway down
                log.warning("event log trim failed: %s", exc)
            else:
                if trimmed:
                    log.info("event log: %d old records deleted (max_records)", trimmed)
            await anyio.sleep(interval_sec)

"""``converge events|deliveries|dead-letters``: the event log from the command line.

They open the store the gateway configuration names (SQLite, file or Redis) and read
the same durable records the gateway writes, so they work while the gateway runs: a
replayed record becomes pending and the running gateway hands it on at its next poll.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from converge.durable import STATUSES as _STATUSES
from converge.durable import Record
from converge.errors import UsageError

__all__ = ["add_parsers", "format_table", "run"]

_KEY_HEADER = {"events": "PROVIDER", "deliveries": "TARGET", "dead-letters": "PROVIDER/TARGET"}


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned columns under ``header`` (two spaces between columns)."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="gateway TOML file")
    parser.add_argument("--store", help="override [gateway] store")
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")


def _filters(parser: argparse.ArgumentParser, key: str) -> None:
    parser.add_argument(f"--{key}", dest="key", help=f"only this {key}")
    parser.add_argument("--status", choices=_STATUSES, help="only this status")
    parser.add_argument("--since", help="only records since: 15m, 2h, 7d, an ISO time, Unix s")
    parser.add_argument("--limit", type=int, default=50, help="most records shown (default 50)")


def add_parsers(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the ``events``, ``deliveries`` and ``dead-letters`` subcommands.

    Args:
        commands: The ``converge`` subparsers object.
        command: ``(subparsers, name, summary, description)`` making one subcommand.
    """
    for section, key, noun in (
        ("events", "provider", "inbound events"),
        ("deliveries", "target", "outbound deliveries"),
    ):
        parser = command(
            commands,
            section,
            f"list, show and replay {noun}",
            f"The event log's {noun}, read from the store the gateway config names\n"
            "(works while the gateway runs). Signature headers are redacted.",
        )
        actions = parser.add_subparsers(dest="what", required=True, metavar="ACTION")
        listing = command(
            actions,
            "list",
            f"list {noun}, newest first",
            f"List {noun}, newest first, as an aligned table (or --json).",
        )
        _common(listing)
        _filters(listing, key)
        show = command(
            actions,
            "show",
            f"show one of the {noun} with its attempts",
            f"Show one of the {noun}: status, every attempt (time, HTTP status, error,\n"
            "latency) and its data, with signature and authorization headers redacted.",
        )
        _common(show)
        show.add_argument("id", help="record id")
        replay = command(
            actions,
            "replay",
            f"hand {noun} to their consumer again",
            f"Replay one of the {noun} by id, or every finished one since a time\n"
            f"(--since, optionally --{key}): it becomes pending and is handed on again.",
        )
        _common(replay)
        replay.add_argument("id", nargs="?", help="record id (or --since)")
        replay.add_argument("--since", help="replay every finished record since this time")
        replay.add_argument(f"--{key}", dest="key", help=f"with --since: only this {key}")
        recount = command(
            actions,
            "recount",
            f"count the open {noun} again and repair the counters",
            f"List the open {noun} and set the counters that bound max_pending and feed\n"
            "the backlog gauge from that listing. A FileStore can leave them low after a\n"
            "crash. Run it with the gateway stopped: what is accepted or finished while\n"
            "it lists is not counted.",
        )
        _common(recount)
    dead = command(
        commands,
        "dead-letters",
        "list, replay or purge dead letters",
        "Dead letters: inbound events and outbound deliveries that were given up.\n"
        "Replay one (with a fresh attempt budget) or purge it for good.",
    )
    actions = dead.add_subparsers(dest="what", required=True, metavar="ACTION")
    listing = command(actions, "list", "list dead letters", "List dead letters, newest first.")
    _common(listing)
    listing.add_argument("--key", dest="key", help="only this provider or target")
    listing.add_argument("--since", help="only since: 15m, 2h, 7d, an ISO time, Unix s")
    listing.add_argument("--limit", type=int, default=50, help="most shown (default 50)")
    replay = command(
        actions, "replay", "replay a dead letter", "Hand a dead letter to its consumer again."
    )
    _common(replay)
    replay.add_argument("id", help="dead letter id")
    purge = command(
        actions,
        "purge",
        "delete dead letters for good",
        "Delete a dead letter (or, with --all, every dead letter) for good.",
    )
    _common(purge)
    purge.add_argument("id", nargs="?", help="dead letter id (or --all)")
    purge.add_argument("--all", action="store_true", help="purge every dead letter")


def _row(record: Record) -> list[str]:
    from converge.extensions.connectors.server.eventlog import iso_time, last_result

    result = last_result(record)
    return [
        record.id,
        record.key,
        record.status,
        iso_time(record.created) or "",
        str(record.attempt_count),
        result[:60],
    ]


def _show(record: Record, section: str) -> str:
    from converge.extensions.connectors.server.eventlog import iso_time, record_view

    view = record_view(record, section=section, data=True)
    lines = [
        f"id:        {record.id}",
        f"{_KEY_HEADER[section].lower() + ':':<10} {record.key}",
        f"status:    {record.status}",
        f"received:  {iso_time(record.created)}",
        f"updated:   {iso_time(record.updated)}",
        f"attempts:  {record.attempt_count}",
    ]
    if record.last_error:
        lines.append(f"error:     {record.last_error}")
    for attempt in record.attempts:
        parts = [iso_time(attempt.at) or "", attempt.outcome]
        if attempt.status_code is not None:
            parts.append(f"HTTP {attempt.status_code}")
        if attempt.latency_ms is not None:
            parts.append(f"{attempt.latency_ms:.1f} ms")
        if attempt.error:
            parts.append(attempt.error)
        lines.append("  - " + "  ".join(parts))
    lines.append("data:")
    lines.append(json.dumps(view["data"], indent=2, sort_keys=True, default=str))
    return "\n".join(lines)


async def _arun(args: argparse.Namespace) -> int:
    import dataclasses

    from converge.cli.config import build_gateway, check_gateway_settings, load_config, open_store
    from converge.extensions.connectors.server.eventlog import EventLog, parse_since, record_view

    config = load_config(args.config, warn=False)
    if args.store:
        config = dataclasses.replace(config, store=args.store)
        check_gateway_settings(config)
    store = open_store(config.store, config.base_dir, password=config.store_password)
    connector = build_gateway(config, store).connector
    section = args.command
    try:
        log = EventLog.for_connector(connector)
        if section not in log.sections:
            raise UsageError(f"this gateway keeps no {section} in its store")
        what = args.what
        if what == "list":
            if args.limit < 1:
                raise UsageError("--limit must be 1 or more")
            since = parse_since(args.since) if args.since else None
            records = await log.alist(
                section,
                key=args.key,
                status=getattr(args, "status", None),
                since=since,
                limit=args.limit,
            )
            if args.json:
                print(json.dumps([record_view(r) for r in records], indent=2))
            elif not records:
                print(f"no {section.replace('-', ' ')}")
            else:
                header = ["ID", _KEY_HEADER[section], "STATUS", "RECEIVED", "ATTEMPTS", "LAST"]
                print(format_table(header, [_row(r) for r in records]))
            return 0
        if what == "show":
            record = await log.aget(args.id, section)
            if record is None:
                print(f"error: no {section} record {args.id}", file=sys.stderr)
                return 1
            kind = "events" if record.kind == "inbound" else "deliveries"
            if args.json:
                print(json.dumps(record_view(record, data=True), indent=2))
            else:
                print(_show(record, kind if section == "dead-letters" else section))
            return 0
        if what == "replay":
            if getattr(args, "since", None):
                if args.id:
                    raise UsageError("give an id or --since, not both")
                done = await log.areplay_since(
                    parse_since(args.since), section=section, key=args.key
                )
                _print_ids(args, "replayed", [r.id for r in done])
                return 0
            if not args.id:
                raise UsageError("give the id to replay (or --since)")
            record = await log.areplay(args.id, section)
            if record is None:
                print(f"error: no finished or dead record {args.id}", file=sys.stderr)
                return 1
            _print_ids(args, "replayed", [record.id])
            return 0
        if what == "recount":
            count = await log.arecount(section)
            if args.json:
                print(json.dumps({"status": "recounted", "open": count}))
            else:
                print(f"{count} open {section}")
            return 0
        # purge
        if args.all == bool(args.id):
            raise UsageError("give a dead letter id or --all")
        ids = [args.id] if args.id else [r.id for r in await log.alist(section, limit=2**31 - 1)]
        purged = [i for i in ids if await log.apurge_dead(i) is not None]
        if args.id and not purged:
            print(f"error: no dead letter {args.id}", file=sys.stderr)
            return 1
        _print_ids(args, "purged", purged)
        return 0
    finally:
        with anyio.CancelScope(shield=True):
            await connector.aclose()
            await store.aclose()


def _print_ids(args: argparse.Namespace, verb: str, ids: list[str]) -> None:
    if args.json:
        print(json.dumps({"status": verb, "count": len(ids), "ids": ids}))
        return
    for record_id in ids:
        print(f"{verb} {record_id}")
    if len(ids) != 1:
        print(f"{verb} {len(ids)} record{'s' if len(ids) != 1 else ''}")


def run(args: argparse.Namespace) -> int:
    """Run an ``events``, ``deliveries`` or ``dead-letters`` command.

    Returns:
        The exit status: 0, or 1 when the record asked for does not exist.
    """
    result: int = anyio.run(_arun, args)
    return result

"""The admin API and the inspector page, under ``/admin/``, as a pure ASGI app.

Off unless an admin token is configured; separate from the ``/outbound`` token. Every
request must carry ``Authorization: Bearer <admin token>`` (compared in constant time)
or the session cookie the inspector's sign-in form sets (an HMAC of the token, never the
token itself; ``HttpOnly``, ``SameSite=Strict``, path ``/admin``).

JSON API (``SECTION`` is ``events``, ``deliveries`` or ``dead-letters``):

* ``GET /admin/api/SECTION?key=&status=&since=&limit=``: records, newest first
  (``provider=`` and ``target=`` are aliases of ``key=``; ``since`` is ``15m``, ``2h``,
  an ISO time or Unix seconds);
* ``GET /admin/api/SECTION/ID``: one record with its attempts and data (signature and
  authorization headers redacted);
* ``POST /admin/api/SECTION/ID/replay``: hand it to its consumer again;
* ``POST /admin/api/SECTION/replay?since=&key=``: replay every finished record since;
* ``DELETE /admin/api/dead-letters/ID``: purge a dead letter.

The inspector: ``GET /admin/`` (``?view=SECTION&key=&status=``), ``GET
/admin/SECTION/ID``, and the forms it posts (``/admin/login``, ``/admin/logout``,
``/admin/replay``, ``/admin/purge``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from converge._sorting import in_pieces
from converge.durable import STATUSES as _STATUSES
from converge.durable import Record
from converge.errors import ConfigurationError, StoreError, UsageError
from converge.extensions.connectors.server import inspector
from converge.extensions.connectors.server.eventlog import SECTIONS as _SECTIONS
from converge.extensions.connectors.server.eventlog import (
    EventLog,
    parse_since,
    record_section,
    record_view,
)

__all__ = ["ADMIN_PREFIX", "AdminApp"]

_log = logging.getLogger("converge.gateway")

#: The URL path the admin app answers under.
ADMIN_PREFIX = "/admin"
_COOKIE = "converge_admin"
_MIN_TOKEN = 16
_MAX_FORM = 16 * 1024
_MAX_LIMIT = 1000
# Records turned into an answer between two turns of the event loop (a few ms).
_STEP = 128

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]


class _Reply(Exception):
    """Answer with this status and JSON reason (raised from deep inside a handler)."""

    def __init__(self, status: int, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.detail = status, reason, detail


T = TypeVar("T")


async def _drain(records: list[Record], each: Callable[[Record], T]) -> list[T]:
    """``each`` of every record, in order, emptying ``records`` as it goes (each slice
    is freed once done) and giving the event loop back after every ``_STEP``: 1,000
    views built at once held the loop for 15 ms, 10,000 replayed records freed at once
    for 17 ms."""
    return await in_pieces(records, lambda part: [each(r) for r in part], _STEP, consume=True)


def _json(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), default=str).encode()


class AdminApp:
    """Serves the admin API and the inspector page of an :class:`EventLog`.

    Mount it under ``/admin`` (``GatewayApp`` does when its ``admin`` attribute is
    set; ``converge gateway`` sets it when ``admin_token_env`` names a set variable).

    Args:
        event_log: What to show.
        token: The admin bearer token (16 characters or more).
        on_replay: Called with each replayed record's section and id (e.g. to wake the
            dispatcher at once instead of at its next poll).

    Raises:
        ConfigurationError: For a missing or short token.
    """

    def __init__(
        self,
        event_log: EventLog,
        *,
        token: str,
        on_replay: Callable[[str, str], None] | None = None,
    ) -> None:
        if not isinstance(event_log, EventLog):
            raise ConfigurationError("event_log must be an EventLog")
        if not isinstance(token, str) or len(token) < _MIN_TOKEN:
            raise ConfigurationError(f"the admin token must have {_MIN_TOKEN} characters or more")
        self.event_log = event_log
        self._token = token.encode()
        # The cookie carries a value derived from the token, so the token never sits in
        # a browser's cookie jar.
        self._session = hmac.new(self._token, b"converge-admin-session", hashlib.sha256).hexdigest()
        self._on_replay = on_replay

    # -- entry point -------------------------------------------------------------------

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """The ASGI 3 entry point (HTTP only)."""
        if scope.get("type") != "http":
            return
        root = str(scope.get("root_path", ""))
        path = str(scope.get("path", "/"))
        if root and path.startswith(root) and path != root:
            path = path[len(root) :]
        base = root + ADMIN_PREFIX
        rest = path[len(ADMIN_PREFIX) :] if path.startswith(ADMIN_PREFIX) else path
        method = str(scope.get("method", "GET")).upper()
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())
        }
        query = {
            k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()
        }
        try:
            if rest.startswith("/api/") or rest == "/api":
                await self._api(rest[len("/api") :], method, headers, query, send)
            else:
                await self._page(rest, method, headers, query, base, receive, send)
        except _Reply as reply:
            await self._reply(send, reply.status, reply.reason, reply.detail)
        except UsageError as exc:
            await self._reply(send, 400, "bad_request", str(exc))
        except StoreError as exc:
            _log.warning("admin: store failed: %s", exc)
            await self._reply(send, 503, "store_unavailable")

    # -- authentication ----------------------------------------------------------------

    def _bearer_ok(self, headers: dict[str, str]) -> bool:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self._token
        )

    def _cookie_ok(self, headers: dict[str, str]) -> bool:
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == _COOKIE and hmac.compare_digest(value.encode(), self._session.encode()):
                return True
        return False

    @staticmethod
    def _same_origin(headers: dict[str, str]) -> bool:
        """Cookie-authenticated forms must come from this origin (with SameSite=Strict)."""
        origin = headers.get("origin")
        if origin is None or origin == "null":
            return origin is None
        return urlsplit(origin).netloc == headers.get("host", "")

    # -- JSON API ----------------------------------------------------------------------

    @staticmethod
    def _filters(query: dict[str, str]) -> dict[str, Any]:
        key = query.get("key") or query.get("provider") or query.get("target") or None
        status = query.get("status") or None
        if status is not None and status not in _STATUSES:
            raise _Reply(400, "bad_status", f"status must be one of {list(_STATUSES)}")
        since = parse_since(query["since"]) if query.get("since") else None
        try:
            limit = int(query.get("limit", "100"))
        except ValueError:
            raise _Reply(400, "bad_limit", "limit must be an integer") from None
        if not 1 <= limit <= _MAX_LIMIT:
            raise _Reply(400, "bad_limit", f"limit must be 1-{_MAX_LIMIT}")
        return {"key": key, "status": status, "since": since, "limit": limit}

    def _section(self, name: str) -> str:
        if name not in _SECTIONS or name not in self.event_log.sections:
            raise _Reply(404, "not_found", f"sections: {list(self.event_log.sections)}")
        return name

    async def _api(
        self,
        rest: str,
        method: str,
        headers: dict[str, str],
        query: dict[str, str],
        send: _Send,
    ) -> None:
        if not (self._bearer_ok(headers) or self._cookie_ok(headers)):
            await self._reply(send, 401, "unauthorized", extra={"www-authenticate": "Bearer"})
            return
        parts = [p for p in rest.split("/") if p]
        if not parts:
            await self._send_json(send, 200, {"sections": list(self.event_log.sections)})
            return
        section = self._section(parts[0])
        log = self.event_log
        if len(parts) == 1:
            self._allow(method, "GET")
            filters = self._filters(query)
            views = await _drain(await log.alist(section, **filters), record_view)
            await self._send_json(send, 200, {"section": section, "records": views})
        elif len(parts) == 2 and parts[1] == "replay":
            self._allow(method, "POST")
            if not query.get("since"):
                raise _Reply(400, "since_required", "give ?since=15m (or an ISO time)")
            filters = self._filters(query)
            # Every finished record since, unless a limit is asked for (listings show a
            # page by default; a replay that left records out would not say which).
            limit = filters["limit"] if "limit" in query else None
            done = await log.areplay_since(
                filters["since"], section=section, key=filters["key"], limit=limit
            )
            ids = await _drain(done, self._notify)
            await self._send_json(send, 200, {"status": "replayed", "count": len(ids), "ids": ids})
        elif len(parts) == 2:
            record_id = parts[1]
            if method == "DELETE" and section == "dead-letters":
                purged = await log.apurge_dead(record_id)
                if purged is None:
                    raise _Reply(404, "not_found")
                await self._send_json(send, 200, {"status": "purged", "id": record_id})
                return
            self._allow(method, "GET")
            found = await log.aget(record_id, section)
            if found is None:
                raise _Reply(404, "not_found")
            await self._send_json(send, 200, record_view(found, data=True))
        elif len(parts) == 3 and parts[2] == "replay":
            self._allow(method, "POST")
            again = await log.areplay(parts[1], section)
            if again is None:
                raise _Reply(404, "not_found", "no finished or dead record with this id")
            self._notify(again)
            await self._send_json(send, 200, {"status": "replayed", "record": record_view(again)})
        else:
            raise _Reply(404, "not_found")

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed and not (method == "HEAD" and "GET" in allowed):
            raise _Reply(405, "method_not_allowed")

    def _notify(self, record: Record) -> str:
        """Tell ``on_replay`` that ``record`` was replayed; return its id."""
        if self._on_replay is not None:
            try:
                self._on_replay(record_section(record), record.id)
            except Exception:  # a wake-up is an optimisation: the poll finds it anyway
                _log.exception("admin: on_replay failed")
        return record.id

    # -- inspector page ----------------------------------------------------------------

    async def _page(
        self,
        rest: str,
        method: str,
        headers: dict[str, str],
        query: dict[str, str],
        base: str,
        receive: _Receive,
        send: _Send,
    ) -> None:
        if (
            rest in ("", "/")
            and method in ("GET", "HEAD")
            and not query
            and not (self._cookie_ok(headers) or self._bearer_ok(headers))
        ):
            await self._html(send, 200, inspector.render_login(base=base))
            return
        if rest == "/login":
            self._allow(method, "POST")
            form = await self._form(receive, headers)
            token = form.get("token", "").encode()
            if not hmac.compare_digest(token, self._token):
                await self._html(
                    send, 401, inspector.render_login(base=base, error="That token is not valid.")
                )
                return
            cookie = f"{_COOKIE}={self._session}; Path={base}; HttpOnly; SameSite=Strict" + (
                "; Secure" if headers.get("x-forwarded-proto") == "https" else ""
            )
            await self._redirect(send, f"{base}/", cookie=cookie)
            return
        if rest == "/logout":
            self._allow(method, "POST")
            await self._redirect(
                send, f"{base}/", cookie=f"{_COOKIE}=; Path={base}; Max-Age=0; HttpOnly"
            )
            return
        authed = self._cookie_ok(headers) or self._bearer_ok(headers)
        if not authed:
            if method in ("GET", "HEAD"):
                await self._redirect(send, f"{base}/")
            else:
                await self._reply(send, 401, "unauthorized")
            return
        if rest in ("", "/"):
            self._allow(method, "GET")
            await self._list_page(query, base, send)
            return
        if rest in ("/replay", "/purge"):
            self._allow(method, "POST")
            if not self._same_origin(headers):
                raise _Reply(403, "cross_origin")
            form = await self._form(receive, headers)
            await self._form_action(rest[1:], form, base, send)
            return
        parts = [p for p in rest.split("/") if p]
        if len(parts) == 2 and parts[0] in _SECTIONS:
            self._allow(method, "GET")
            section = self._section(parts[0])
            record = await self.event_log.aget(parts[1], section)
            if record is None:
                raise _Reply(404, "not_found")
            view = record_view(record, data=True)
            await self._html(send, 200, inspector.render_detail(view, base=base))
            return
        raise _Reply(404, "not_found")

    async def _list_page(self, query: dict[str, str], base: str, send: _Send) -> None:
        sections = self.event_log.sections
        section = query.get("view") or (sections[0] if sections else "events")
        section = self._section(section)
        filters = self._filters(query)
        records = await self.event_log.alist(section, **filters)
        keys = await self.event_log.akeys(section)
        if filters["key"] and filters["key"] not in keys:
            keys.append(filters["key"])
        statuses = ["dead"] if section == "dead-letters" else list(_STATUSES)
        message = None
        if query.get("replayed"):
            message = f"Replayed {query['replayed']}: it is pending again."
        elif query.get("purged"):
            message = f"Purged {query['purged']}."
        back_query = {k: v for k, v in query.items() if k in ("view", "key", "status", "since")}
        back = f"{base}/?{urlencode(back_query or {'view': section})}"
        rows = await _drain(
            records, lambda r: inspector.render_row(record_view(r), section, base=base, back=back)
        )
        html = inspector.render_list(
            section,
            rows,
            base=base,
            keys=keys,
            statuses=statuses,
            key=filters["key"],
            status=filters["status"],
            back=back,
            message=message,
        )
        await self._html(send, 200, html)

    async def _form_action(self, action: str, form: dict[str, str], base: str, send: _Send) -> None:
        record_id = form.get("id", "")
        section = form.get("section") or None
        back = form.get("back", "")
        if not back.startswith(base + "/"):  # only ever redirect within the inspector
            back = f"{base}/"
        if action == "replay":
            record = await self.event_log.areplay(record_id, section)
            if record is None:
                raise _Reply(404, "not_found", "no finished or dead record with this id")
            self._notify(record)
        else:
            if await self.event_log.apurge_dead(record_id) is None:
                raise _Reply(404, "not_found", "no dead letter with this id")
        joiner = "&" if "?" in back else "?"
        done = "replayed" if action == "replay" else "purged"
        await self._redirect(send, f"{back}{joiner}{done}={quote(record_id)}")

    # -- plumbing ----------------------------------------------------------------------

    @staticmethod
    async def _form(receive: _Receive, headers: dict[str, str]) -> dict[str, str]:
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/x-www-form-urlencoded":
            raise _Reply(415, "unsupported_media_type")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Reply(400, "disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > _MAX_FORM:
                raise _Reply(413, "payload_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        text = b"".join(chunks).decode("utf-8", "replace")
        return {k: v[-1] for k, v in parse_qs(text).items()}

    @staticmethod
    async def _respond(send: _Send, status: int, headers: dict[str, str], body: bytes) -> None:
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    async def _send_json(self, send: _Send, status: int, body: Any) -> None:
        headers = {"content-type": "application/json", "cache-control": "no-store"}
        await self._respond(send, status, headers, _json(body))

    async def _reply(
        self,
        send: _Send,
        status: int,
        reason: str,
        detail: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        body: dict[str, Any] = {"status": "rejected" if status < 500 else "unavailable"}
        body["reason"] = reason
        if detail:
            body["detail"] = detail
        headers = {"content-type": "application/json", "cache-control": "no-store"}
        await self._respond(send, status, {**headers, **(extra or {})}, _json(body))

    async def _html(self, send: _Send, status: int, html: str) -> None:
        headers = {
            "content-type": "text/html; charset=utf-8",
            "cache-control": "no-store",
            # No script runs on the page; nothing is loaded from elsewhere.
            "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            "x-content-type-options": "nosniff",
            "referrer-policy": "same-origin",
        }
        await self._respond(send, status, headers, html.encode())

    async def _redirect(self, send: _Send, location: str, *, cookie: str | None = None) -> None:
        headers = {"location": location, "cache-control": "no-store"}
        if cookie:
            headers["set-cookie"] = cookie
        await self._respond(send, 303, headers, b"")

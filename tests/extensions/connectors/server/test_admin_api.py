"""The admin API over real HTTP: off without a token, bearer-only, list/show/replay/purge."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from eventlog_helpers import Filled, fill
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.extensions.connectors import WebhookConnector, WebhookGateway
from converge.extensions.connectors.server import AdminApp, parse_since
from converge.extensions.storage import MemoryStore, SQLiteStore
from loop_stall import ticks_during
from loopback import UvicornThread

TOKEN = "admin-token-0123456789"
OUTBOUND = "outbound-token-0123456789"


def gateway_app(admin: AdminApp | None):  # type: ignore[no-untyped-def]
    connector = WebhookConnector(provider_profiles={}, secrets={}, store=MemoryStore())
    app = WebhookGateway(connector, outbound_token=OUTBOUND).asgi_app(run_dispatcher=False)
    app.admin = admin
    return app


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Filled]]:
    store = SQLiteStore(tmp_path / "log.sqlite3", serializer="json")

    async def make() -> Filled:
        return await fill(store)

    filled = anyio.run(make)
    server = UvicornThread(gateway_app(AdminApp(filled.log, token=TOKEN))).start()
    try:
        yield server.url, filled
    finally:
        server.stop()
        store.close()


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_admin_is_off_without_a_token() -> None:
    server = UvicornThread(gateway_app(None)).start()
    try:
        for path in ("/admin/", "/admin/api/events"):
            response = httpx.get(server.url + path, headers=auth())
            assert response.status_code == 404
            assert response.json() == {"status": "rejected", "reason": "not_found"}
    finally:
        server.stop()


@pytest.mark.parametrize(
    "headers",
    [{}, auth("wrong-token-0123456789"), auth(OUTBOUND), {"authorization": TOKEN}],
    ids=["none", "wrong", "outbound-token", "not-bearer"],
)
def test_the_api_needs_the_admin_bearer_token(
    served: tuple[str, Filled], headers: dict[str, str]
) -> None:
    url, _ = served
    response = httpx.get(f"{url}/admin/api/events", headers=headers)
    assert response.status_code == 401
    assert response.json()["reason"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{url}/admin/api/events/evt_ok/replay", headers=headers).status_code == 401


def test_list_with_filters(served: tuple[str, Filled]) -> None:
    url, _ = served
    body = httpx.get(f"{url}/admin/api/events", headers=auth()).json()
    assert body["section"] == "events"
    assert [r["id"] for r in body["records"]] == ["evt_open", "evt_dead", "evt_ok"]
    only = httpx.get(
        f"{url}/admin/api/events",
        params={"provider": "stripe", "status": "pending"},
        headers=auth(),
    ).json()
    assert [r["id"] for r in only["records"]] == ["evt_open"]
    dead = httpx.get(f"{url}/admin/api/dead-letters", headers=auth()).json()["records"]
    assert sorted(r["id"] for r in dead) == ["dlv_dead", "evt_dead"]
    assert "data" not in dead[0]  # listings leave the payloads out
    sections = httpx.get(f"{url}/admin/api", headers=auth()).json()
    assert sections == {"sections": ["events", "deliveries", "dead-letters"]}


def test_show_has_attempts_and_redacts_signatures(served: tuple[str, Filled]) -> None:
    url, _ = served
    body = httpx.get(f"{url}/admin/api/deliveries/dlv_dead", headers=auth()).json()
    assert [a["status_code"] for a in body["attempts"]] == [503, 404]
    assert body["data"] == {"body": {"order": 2}}
    event = httpx.get(f"{url}/admin/api/events/evt_ok", headers=auth()).json()
    assert event["data"]["headers"]["webhook-signature"] == "[redacted]"


def test_replay_one_and_since(served: tuple[str, Filled]) -> None:
    url, _ = served
    response = httpx.post(f"{url}/admin/api/deliveries/dlv_dead/replay", headers=auth())
    assert response.status_code == 200
    assert response.json()["record"]["status"] == "pending"
    again = httpx.post(f"{url}/admin/api/deliveries/dlv_dead/replay", headers=auth())
    assert again.status_code == 404  # pending now: nothing finished to replay
    bulk = httpx.post(
        f"{url}/admin/api/events/replay",
        params={"since": "1h", "provider": "stripe"},
        headers=auth(),
    )
    assert bulk.json() == {"status": "replayed", "count": 1, "ids": ["evt_ok"]}
    assert httpx.post(f"{url}/admin/api/events/replay", headers=auth()).status_code == 400


def test_replay_since_replays_every_finished_event_unless_a_limit_is_given(
    tmp_path: Path,
) -> None:
    # A page of a listing is 100 records by default; a replay "since" stopped there too,
    # and silently left the older ones out.
    store = SQLiteStore(tmp_path / "many.sqlite3", serializer="json")

    async def make() -> Filled:
        filled = await fill(store)  # evt_ok and evt_dead are finished, evt_open is not
        for n in range(150):
            record = await filled.events.aadd(
                {"n": n},
                id=f"evt_{n:03d}",
                key="stripe",
                status="leased",
                lease_owner="t",
                lease_sec=30,
            )
            await filled.events.aack(record.id, record.lease_token)
        return filled

    filled = anyio.run(make)
    server = UvicornThread(gateway_app(AdminApp(filled.log, token=TOKEN))).start()
    try:
        url = f"{server.url}/admin/api/events/replay"
        newest = httpx.post(url, params={"since": "1h", "limit": "20"}, headers=auth()).json()
        assert newest["ids"] == [f"evt_{n:03d}" for n in range(130, 150)]  # oldest first
        rest = httpx.post(url, params={"since": "1h"}, headers=auth()).json()
        assert rest["count"] == 152 - 20
        assert {"evt_ok", "evt_dead", "evt_000", "evt_129"} <= set(rest["ids"])
    finally:
        server.stop()
        store.close()


def test_purge_a_dead_letter(served: tuple[str, Filled]) -> None:
    url, _ = served
    assert httpx.delete(f"{url}/admin/api/dead-letters/evt_ok", headers=auth()).status_code == 404
    response = httpx.delete(f"{url}/admin/api/dead-letters/evt_dead", headers=auth())
    assert response.json() == {"status": "purged", "id": "evt_dead"}
    assert httpx.get(f"{url}/admin/api/events/evt_dead", headers=auth()).status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "params", "status", "reason"),
    [
        ("GET", "/admin/api/nope", {}, 404, "not_found"),
        ("GET", "/admin/api/events", {"status": "bogus"}, 400, "bad_status"),
        ("GET", "/admin/api/events", {"limit": "0"}, 400, "bad_limit"),
        ("GET", "/admin/api/events", {"limit": "x"}, 400, "bad_limit"),
        ("GET", "/admin/api/events", {"since": "yesterday"}, 400, "bad_request"),
        ("POST", "/admin/api/events", {}, 405, "method_not_allowed"),
        ("GET", "/admin/api/events/evt_ok/replay", {}, 405, "method_not_allowed"),
        ("GET", "/admin/api/events/evt_ok/x/y", {}, 404, "not_found"),
        ("GET", "/admin/api/events/no%20such", {}, 400, "bad_request"),
    ],
)
def test_bad_requests_get_4xx_with_a_json_reason(
    served: tuple[str, Filled], method: str, path: str, params: dict, status: int, reason: str
) -> None:
    url, _ = served
    response = httpx.request(method, url + path, params=params, headers=auth())
    assert response.status_code == status, response.text
    assert response.json()["reason"] == reason


def test_the_session_cookie_is_not_the_token_and_cross_site_forms_are_refused(
    served: tuple[str, Filled],
) -> None:
    url, _ = served
    assert "Sign in" in httpx.get(f"{url}/admin/").text
    bad = httpx.post(f"{url}/admin/login", data={"token": "x" * 20})
    assert bad.status_code == 401
    assert "set-cookie" not in bad.headers
    login = httpx.post(f"{url}/admin/login", data={"token": TOKEN})
    assert login.status_code == 303
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert TOKEN not in cookie
    session = cookie.split(";", 1)[0]
    page = httpx.get(f"{url}/admin/?view=deliveries", headers={"cookie": session})
    assert page.status_code == 200
    assert 'data-id="dlv_dead"' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    form = {"id": "dlv_dead", "section": "deliveries", "back": "/admin/?view=deliveries"}
    evil = httpx.post(
        f"{url}/admin/replay",
        data=form,
        headers={"cookie": session, "origin": "http://evil.example"},
    )
    assert evil.status_code == 403
    assert evil.json()["reason"] == "cross_origin"
    ok = httpx.post(f"{url}/admin/replay", data=form, headers={"cookie": session, "origin": url})
    assert ok.status_code == 303
    assert ok.headers["location"] == "/admin/?view=deliveries&replayed=dlv_dead"
    api = httpx.get(f"{url}/admin/api/deliveries/dlv_dead", headers={"cookie": session})
    assert api.json()["status"] == "pending"
    out = httpx.post(f"{url}/admin/logout", headers={"cookie": session})
    assert "Max-Age=0" in out.headers["set-cookie"]


# -- fuzzing: whatever an operator's client sends, never a 5xx --------------------------

_IDS = ["evt_ok", "evt_dead", "evt_open", "dlv_ok", "dlv_dead", "replay", "..", "%2e%2e", "x" * 300]
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_SEGMENT = st.one_of(st.sampled_from(_IDS), _TEXT)
_VALUES = st.one_of(
    st.sampled_from(
        ["1", "0", "-1", "1000000", "x", "15m", "1h", "0s", "-5m", "2026-12-01T00:00:00Z"]
    ),
    st.sampled_from(["pending", "dead", "delivered", "stripe", "/admin/", "//evil.example/"]),
    _TEXT,
)
# Each filter present or not, with a value valid or not: the checks behind a route are
# reached in most examples, not in one of thousands.
_QUERY = st.fixed_dictionaries(
    {},
    optional={
        name: _VALUES
        for name in ("since", "limit", "provider", "target", "key", "status", "view", "back")
    },
)
_METHODS = st.sampled_from(["GET", "HEAD", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"])
_BODIES = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.fixed_dictionaries({}, optional={n: _VALUES for n in ("token", "id", "section", "back")}),
)


async def call(app: Any, method: str, path: str, query: str) -> tuple[int, Any]:
    """One request to ``app`` on this event loop: (status, JSON body, or the page)."""
    answer: dict[str, Any] = {"body": b""}
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query.encode(),
        "headers": [(b"authorization", f"Bearer {TOKEN}".encode())],
        "client": ("127.0.0.1", 50000),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        else:
            answer["body"] += message["body"]

    await app(scope, receive, send)
    body = answer["body"]
    return answer["status"], body if body.startswith(b"<") else json.loads(body)


@pytest.mark.anyio
async def test_long_answers_give_the_event_loop_back() -> None:
    # A page of 1,000 views was built in one go (15 ms on the loop on a MemoryStore, which
    # never yields; the inspector's page of them 26 ms), and a bulk replay freed its
    # records in one go (17 ms for 10,000).
    async def many() -> Filled:
        filled = await fill(MemoryStore())
        for n in range(1_000):
            await filled.events.aadd({"n": n}, id=f"evt_{n:04d}", key="shop", status="acknowledged")
        return filled

    # The same calls on a twin log, without the answer around them: the turns they take.
    twin, filled = await many(), await many()
    app = gateway_app(AdminApp(filled.log, token=TOKEN))
    # The answer's own turns, one per 128 records: 8 here (6-10 measured, none without;
    # trio's scheduling moves the counts by a turn or two).
    steps = 1_000 // 128 // 2

    _, listing = await ticks_during(twin.log.alist("events", key="shop", limit=1_000))
    (status, body), during = await ticks_during(
        call(app, "GET", "/admin/api/events", "key=shop&limit=1000")
    )
    assert (status, len(body["records"])) == (200, 1_000)
    assert during >= listing + steps

    _, page_reads = await ticks_during(twin.log.akeys("events"))
    (status, page), during = await ticks_during(
        call(app, "GET", "/admin/", "view=events&key=shop&limit=1000")
    )
    assert (status, page.count(b'<tr class="record"')) == (200, 1_000)
    assert during >= listing + page_reads + steps

    _, replay = await ticks_during(twin.log.areplay_since(parse_since("1h"), key="shop"))
    (status, body), during = await ticks_during(
        call(app, "POST", "/admin/api/events/replay", "since=1h&key=shop")
    )
    assert (status, body["count"]) == (200, 1_000)
    assert during >= replay + steps


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A served admin API over a filled SQLite log, and a signed-in session cookie."""
    store = SQLiteStore(tmp_path_factory.mktemp("fuzz") / "log.sqlite3", serializer="json")
    filled = anyio.run(fill, store)
    server = UvicornThread(gateway_app(AdminApp(filled.log, token=TOKEN))).start()
    try:
        login = httpx.post(f"{server.url}/admin/login", data={"token": TOKEN})
        yield server.url, login.headers["set-cookie"].split(";", 1)[0]
    finally:
        server.stop()
        store.close()


def send(
    url: str,
    method: str,
    segments: list[str],
    query: dict[str, str],
    headers: dict[str, str],
    body: bytes | dict[str, str] | None,
) -> httpx.Response:
    """The request, answered under 500; an API error carries a JSON reason."""
    path = "/admin/" + "/".join(urllib.parse.quote(s, safe="%") for s in segments)
    form = body if isinstance(body, dict) else None
    raw = body if isinstance(body, bytes) else None
    response = httpx.request(
        method, url + path, params=query, headers=headers, data=form, content=raw
    )
    assert response.status_code < 500, (method, path, query, response.text)
    if path.startswith("/admin/api") and response.status_code >= 400 and method != "HEAD":
        assert isinstance(response.json()["reason"], str)
    return response


_FUZZ = settings(max_examples=150, deadline=None)


@_FUZZ
@given(
    method=st.sampled_from(["GET", "GET", "POST", "POST", "DELETE", "HEAD", "PUT"]),
    section=st.sampled_from(["events", "deliveries", "dead-letters", "nope"]),
    rest=st.one_of(st.just([]), st.lists(_SEGMENT, min_size=1, max_size=2)),
    query=_QUERY,
    body=_BODIES,
)
def test_random_api_requests_never_5xx_and_errors_are_json(
    fuzzed: tuple[str, str],
    method: str,
    section: str,
    rest: list[str],
    query: dict[str, str],
    body: bytes | dict[str, str] | None,
) -> None:
    url, _ = fuzzed
    send(url, method, ["api", section, *rest], query, auth(), body)


@_FUZZ
@given(query=_QUERY)
def test_random_inspector_filters_never_5xx(fuzzed: tuple[str, str], query: dict[str, str]) -> None:
    url, session = fuzzed
    send(url, "GET", [""], query, {"cookie": session}, None)


@_FUZZ
@given(
    action=st.sampled_from(["replay", "purge"]),
    body=_BODIES,
    content_type=st.sampled_from(
        [None, "application/x-www-form-urlencoded", "multipart/form-data", "text/plain"]
    ),
)
def test_random_inspector_forms_never_5xx(
    fuzzed: tuple[str, str],
    action: str,
    body: bytes | dict[str, str] | None,
    content_type: str | None,
) -> None:
    url, session = fuzzed
    headers = {"cookie": session, "origin": url}
    if content_type is not None:
        headers["content-type"] = content_type
    send(url, "POST", [action], {}, headers, body)


@_FUZZ
@given(
    method=_METHODS,
    segments=st.lists(_SEGMENT, max_size=4),
    query=_QUERY,
    credential=st.sampled_from(["bearer", "cookie", "cross-site cookie", "wrong", "none"]),
    body=_BODIES,
)
def test_random_admin_requests_never_5xx(
    fuzzed: tuple[str, str],
    method: str,
    segments: list[str],
    query: dict[str, str],
    credential: str,
    body: bytes | dict[str, str] | None,
) -> None:
    url, session = fuzzed
    headers = {
        "bearer": auth(),
        "cookie": {"cookie": session, "origin": url},
        "cross-site cookie": {"cookie": session, "origin": "http://evil.example"},
        "wrong": auth("wrong-token-0123456789"),
        "none": {},
    }[credential]
    send(url, method, segments, query, headers, body)

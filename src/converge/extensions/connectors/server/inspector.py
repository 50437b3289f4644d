"""The inspector page: plain server-rendered HTML, no script, no build step, no CDN.

Pure functions from record views (see :func:`~.eventlog.record_view`) to HTML strings;
:class:`~.admin.AdminApp` serves them. Every value is escaped. The CSS is inline, the
layout turns tables into cards on narrow screens, and forms post back to the server, so
the page works offline and on a phone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any
from urllib.parse import urlencode

__all__ = ["render_detail", "render_list", "render_login", "render_row"]

_TITLES = {"events": "Events", "deliveries": "Deliveries", "dead-letters": "Dead letters"}
_KEY_LABEL = {"events": "provider", "deliveries": "target", "dead-letters": "provider/target"}

_CSS = """
:root{--fg:#1d2430;--muted:#5b6472;--line:#d9dee5;--bg:#f6f7f9;--card:#fff;--accent:#2457c5}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}
header{display:flex;flex-wrap:wrap;gap:.5rem 1.25rem;align-items:center;
padding:.75rem 1rem;background:#1d2430;color:#fff}
header h1{font-size:1.05rem;margin:0}
header nav{display:flex;flex-wrap:wrap;gap:.25rem}
header nav a{color:#dfe6f3;text-decoration:none;padding:.35rem .7rem;border-radius:6px}
header nav a.current{background:#3a4558;color:#fff}
header form{margin-left:auto}
main{padding:1rem;max-width:1200px;margin:0 auto}
.flash{background:#e7f5ea;border:1px solid #a8d8b3;padding:.6rem .8rem;border-radius:6px;
margin-bottom:1rem}
.error{background:#fdecec;border-color:#f0b4b4}
form.filters{display:flex;flex-wrap:wrap;gap:.5rem;align-items:end;margin-bottom:1rem}
label{display:flex;flex-direction:column;font-size:.8rem;color:var(--muted);gap:.2rem}
select,input{font:inherit;padding:.4rem .5rem;border:1px solid var(--line);border-radius:6px;
background:#fff;min-width:9rem}
button{font:inherit;padding:.42rem .9rem;border-radius:6px;border:1px solid var(--accent);
background:var(--accent);color:#fff;cursor:pointer}
button.secondary{background:#fff;color:var(--accent)}
button.danger{background:#fff;color:#b3261e;border-color:#b3261e}
table{width:100%;border-collapse:collapse;background:var(--card);border:1px solid var(--line);
border-radius:8px;overflow:hidden}
th,td{text-align:left;padding:.5rem .6rem;border-bottom:1px solid var(--line);
vertical-align:top}
th{font-size:.8rem;color:var(--muted);font-weight:600;background:#fafbfc}
td.id a{font-family:ui-monospace,monospace;font-size:.85rem;color:var(--accent);
word-break:break-all}
.badge{display:inline-block;padding:.1rem .5rem;border-radius:999px;font-size:.8rem;
background:#eef1f5}
.badge.delivered,.badge.acknowledged{background:#e2f4e6;color:#1e6b34}
.badge.pending,.badge.leased{background:#fff4d6;color:#7a5a00}
.badge.dead{background:#fde3e1;color:#a3221a}
details summary{cursor:pointer;color:var(--muted)}
ol.attempts{margin:.3rem 0 0;padding-left:1.2rem;font-size:.85rem}
td.actions form{display:inline-block;margin:0 .35rem .35rem 0}
pre{background:#fff;border:1px solid var(--line);border-radius:8px;padding:.75rem;
overflow:auto;font-size:.85rem}
.empty{color:var(--muted);padding:1rem 0}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.3rem 1rem}
dt{color:var(--muted)}
td.time{white-space:nowrap;font-variant-numeric:tabular-nums}
dd{margin:0;word-break:break-all}
@media (max-width:700px){
 table,thead,tbody,tr,td{display:block;width:100%}
 thead{display:none}
 table{border:none;background:none}
 tr.record{background:var(--card);border:1px solid var(--line);border-radius:8px;
 margin-bottom:.75rem;padding:.4rem .2rem}
 td{border:none;padding:.25rem .6rem}
 td::before{content:attr(data-label);display:block;font-size:.72rem;color:var(--muted)}
 header form{margin-left:0}
 select,input{min-width:0;width:100%}
 form.filters label{flex:1 1 40%}
}
"""


def _page(title: str, body: str, *, base: str, section: str | None = None) -> str:
    nav = ""
    if section is not None:
        links = "".join(
            f'<a id="nav-{name}" href="{escape(base)}/?{urlencode({"view": name})}"'
            f"{' class=current' if name == section else ''}>{label}</a>"
            for name, label in _TITLES.items()
        )
        nav = (
            f"<nav>{links}</nav>"
            f'<form method="post" action="{escape(base)}/logout">'
            '<button class="secondary" type="submit">Sign out</button></form>'
        )
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="same-origin">'
        f"<title>{escape(title)} · converge</title><style>{_CSS}</style></head>"
        f"<body><header><h1>converge inspector</h1>{nav}</header><main>{body}</main>"
        "</body></html>\n"
    )


def render_login(*, base: str, error: str | None = None) -> str:
    """The sign-in page: one field for the admin token (kept in a session cookie)."""
    flash = f'<p class="flash error">{escape(error)}</p>' if error else ""
    body = (
        f"{flash}<h2>Sign in</h2>"
        f'<form method="post" action="{escape(base)}/login" class="filters">'
        '<label>Admin token<input id="token" name="token" type="password" '
        'autocomplete="current-password" required></label>'
        '<button id="sign-in" type="submit">Sign in</button></form>'
        "<p class=empty>The token is the value of the variable named by "
        "<code>admin_token_env</code> in the gateway's configuration.</p>"
    )
    return _page("Sign in", body, base=base)


def _attempts(view: Mapping[str, Any]) -> str:
    attempts = view.get("attempts") or []
    if not attempts:
        return "<span class=empty>none</span>"
    items = []
    for attempt in attempts:
        parts = [escape(str(attempt.get("at_iso") or "")), escape(str(attempt.get("outcome")))]
        if attempt.get("status_code") is not None:
            parts.append(f"HTTP {int(attempt['status_code'])}")
        if attempt.get("latency_ms") is not None:
            parts.append(f"{float(attempt['latency_ms']):.1f} ms")
        if attempt.get("error"):
            parts.append(escape(str(attempt["error"])))
        items.append("<li>" + " · ".join(parts) + "</li>")
    count = int(view.get("attempt_count") or len(attempts))
    return (
        f"<details><summary>{count} attempt{'s' if count != 1 else ''}</summary>"
        f'<ol class="attempts">{"".join(items)}</ol></details>'
    )


def _action(base: str, action: str, view: Mapping[str, Any], section: str, back: str) -> str:
    css = "danger" if action == "purge" else ""
    return (
        f'<form method="post" action="{escape(base)}/{action}">'
        f'<input type="hidden" name="id" value="{escape(str(view["id"]))}">'
        f'<input type="hidden" name="section" value="{escape(section)}">'
        f'<input type="hidden" name="back" value="{escape(back)}">'
        f'<button type="submit" class="{action} {css}">{action.capitalize()}</button></form>'
    )


def render_row(view: Mapping[str, Any], section: str, *, base: str, back: str) -> str:
    """One record's row of :func:`render_list`'s table.

    Args:
        view: The record (a :func:`~.eventlog.record_view` dict).
        section: The section listed.
        base: URL path of the admin root (``/admin``).
        back: The list page's URL (its forms come back to it).
    """
    label = _KEY_LABEL.get(section, "key")
    record_section = str(view.get("section") or section)
    detail = f"{base}/{record_section}/{view['id']}"
    actions = ""
    if view["status"] in ("acknowledged", "delivered", "dead"):
        actions += _action(base, "replay", view, record_section, back)
    if view["status"] == "dead":
        actions += _action(base, "purge", view, record_section, back)
    last = str(view.get("last_result") or "")
    received = escape(str(view.get("created_at") or ""))
    return (
        f'<tr class="record" data-id="{escape(str(view["id"]))}">'
        f'<td class="id" data-label="id"><a href="{escape(detail)}">'
        f"{escape(str(view['id']))}</a></td>"
        f'<td class="key" data-label="{escape(label)}">{escape(str(view["key"]))}</td>'
        f'<td class="status" data-label="status"><span class="badge '
        f'{escape(str(view["status"]))}">{escape(str(view["status"]))}</span></td>'
        f'<td class="time" data-label="received">{received}</td>'
        f'<td class="attempts" data-label="attempts">{_attempts(view)}</td>'
        f'<td data-label="last">{escape(last)}</td>'
        f'<td class="actions" data-label="">{actions}</td></tr>'
    )


def render_list(
    section: str,
    rows: Sequence[str],
    *,
    base: str,
    keys: Sequence[str],
    statuses: Sequence[str],
    key: str | None = None,
    status: str | None = None,
    back: str = "",
    message: str | None = None,
) -> str:
    """A section's records as a table (cards on a phone), with filters and actions.

    Args:
        section: ``"events"``, ``"deliveries"`` or ``"dead-letters"``.
        rows: The records' rows (:func:`render_row`), newest first: a caller on an event
            loop renders a long list a slice at a time between turns of the loop.
        base: URL path of the admin root (``/admin``).
        keys: Providers or targets to offer in the filter.
        statuses: Statuses to offer in the filter.
        key: The selected provider or target.
        status: The selected status.
        back: This page's URL (forms come back to it).
        message: A notice to show above the table (after a replay).
    """
    label = _KEY_LABEL.get(section, "key")

    def options(values: Sequence[str], selected: str | None) -> str:
        out = ['<option value="">any</option>']
        for value in values:
            mark = " selected" if value == selected else ""
            out.append(f'<option value="{escape(value)}"{mark}>{escape(value)}</option>')
        return "".join(out)

    filters = (
        f'<form id="filters" class="filters" method="get" action="{escape(base)}/">'
        f'<input type="hidden" name="view" value="{escape(section)}">'
        f'<label>{escape(label)}<select name="key" id="filter-key">{options(keys, key)}'
        "</select></label>"
        f'<label>status<select name="status" id="filter-status">{options(statuses, status)}'
        "</select></label>"
        '<button id="apply-filters" type="submit">Filter</button></form>'
    )
    flash = f'<p class="flash" id="flash">{escape(message)}</p>' if message else ""
    if not rows:
        table = '<p class="empty" id="no-records">No records match.</p>'
    else:
        table = (
            f'<table id="records"><thead><tr><th>id</th><th>{escape(label)}</th><th>status</th>'
            "<th>received</th><th>attempts</th><th>last result</th><th></th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
    title = _TITLES.get(section, section)
    body = f"{flash}<h2>{escape(title)}</h2>{filters}{table}"
    return _page(title, body, base=base, section=section)


def render_detail(view: Mapping[str, Any], *, base: str) -> str:
    """One record: its fields, its attempts and its data (headers redacted)."""
    section = str(view.get("section") or "events")
    labels = (
        ("id", "id"),
        ("key", _KEY_LABEL.get(section, "key")),
        ("status", "status"),
        ("created_at", "received"),
        ("updated_at", "updated"),
        ("attempt_count", "attempts"),
        ("last_result", "last result"),
    )
    fields = "".join(
        f"<dt>{escape(label)}</dt><dd>{escape(str(view.get(name) or '-'))}</dd>"
        for name, label in labels
    )
    data = json.dumps(view.get("data"), indent=2, sort_keys=True, default=str)
    back = f"{base}/?{urlencode({'view': section})}"
    actions = ""
    if view["status"] in ("acknowledged", "delivered", "dead"):
        actions += _action(base, "replay", view, section, back)
    body = (
        f'<p><a href="{escape(back)}">&larr; {escape(_TITLES.get(section, section))}</a></p>'
        f"<h2>{escape(str(view['id']))}</h2><dl>{fields}</dl>"
        f"<h3>Attempts</h3>{_attempts(view).replace('<details>', '<details open>', 1)}"
        f"{actions}"
        f"<h3>Data</h3><pre>{escape(data)}</pre>"
    )
    return _page(str(view["id"]), body, base=base, section=section)

"""Plays GitHub: signed ``issues`` webhooks, as GitHub sends them.

:func:`issue_request` builds one request (body and headers: ``X-GitHub-Event:
issues``, ``X-GitHub-Delivery``, ``X-Hub-Signature-256``); :func:`asend_issues` posts a
burst of them to the gateway, sending again (as GitHub redelivers) any that got no
``2xx``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import httpx2

from converge.extensions.connectors import sign_webhook

__all__ = ["SAMPLE_ISSUES", "asend_issues", "issue_request"]

#: (title, body) of the demo issues, cycled.
SAMPLE_ISSUES = [
    ("App crashes on startup", "Since 2.3 it fails with an error when the config is empty."),
    ("Docs: typo in the README", "The install section says `pip instal`."),
    ("Dashboard is slow", "Loading the dashboard takes 9 s and 2 GB of memory."),
    ("How do I rotate the signing secret?", "Is there a way without downtime?"),
    ("Dark mode", "Would be nice to have."),
]


def issue_request(
    number: int,
    secret: str,
    *,
    repo: str = "octo-org/octo-app",
    delivery: str | None = None,
    action: str = "opened",
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of GitHub's ``issues`` webhook for issue ``number``."""
    title, text = SAMPLE_ISSUES[(number - 1) % len(SAMPLE_ISSUES)]
    payload: dict[str, Any] = {
        "action": action,
        "issue": {
            "id": uuid.uuid4().int >> 80,  # GitHub's ids differ for every issue
            "number": number,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "title": title,
            "body": text,
            "user": {"login": f"user{number}"},
            "html_url": f"https://github.com/{repo}/issues/{number}",
        },
        "repository": {"full_name": repo},
        "sender": {"login": f"user{number}"},
    }
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = sign_webhook("github", secret, body, event_id=delivery or str(uuid.uuid4()))
    headers["X-GitHub-Event"] = "issues"
    headers["Content-Type"] = "application/json"
    return body, headers


async def asend_issues(
    url: str,
    secret: str,
    numbers: list[int],
    *,
    concurrency: int = 8,
    retry_sec: float = 0.5,
    interval_sec: float = 0.0,
    deadline_sec: float = 60.0,
    on_answer: Callable[[int, int], None] | None = None,
) -> dict[int, int]:
    """POST ``issues`` webhooks for ``numbers`` to ``url``; resend until each gets a 2xx.

    Each issue keeps its ``X-GitHub-Delivery`` across resends, as GitHub's redelivery
    does. ``interval_sec`` spaces the first sends (a burst spread over time). Returns the
    final status per issue number (0: no answer before the deadline).
    """
    requests = {n: issue_request(n, secret) for n in numbers}
    status: dict[int, int] = dict.fromkeys(numbers, 0)
    limit = anyio.Semaphore(concurrency)

    async def one(client: httpx2.AsyncClient, number: int) -> None:
        body, headers = requests[number]
        while True:
            async with limit:
                try:
                    answer = await client.post(url, content=body, headers=headers)
                    code = answer.status_code
                except httpx2.HTTPError:
                    code = 0
            status[number] = code
            if on_answer is not None:
                on_answer(number, code)
            if 200 <= code < 300 or 400 <= code < 500:
                return
            await anyio.sleep(retry_sec)

    with anyio.move_on_after(deadline_sec):
        async with httpx2.AsyncClient(timeout=5.0) as client, anyio.create_task_group() as tg:
            for number in numbers:
                tg.start_soon(one, client, number)
                if interval_sec:
                    await anyio.sleep(interval_sec)
    return status

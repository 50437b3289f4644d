"""The triage agent: an ``LLMAgent`` with two tools, and the model it asks.

* ``lookup_labels(title, body)`` reads the label rules (keywords, owners) kept in a store
  and returns the labels that match and who owns them.
* ``draft_reply(number, author, labels, owners)`` writes the reply text.

The model decides in three steps per issue: call ``lookup_labels``, call ``draft_reply``
with what came back, then send one message on :data:`OUTBOUND_TOPIC` whose payload
``{"target": "chat", "body": {...}}`` the connector turns into a signed outbound webhook.

Offline (the default) a :class:`~converge.extensions.llm.testing.FunctionProvider` plays
the model with :func:`scripted_model`: deterministic, no network. With
``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY`` or ``MISTRAL_API_KEY`` set, a real model
decides (see :func:`select_provider`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import anyio

from converge.core import Identity, ToolRegistry
from converge.core.events import EventEmitter
from converge.core.store import Store
from converge.extensions.connectors.connector import OUTBOUND_TOPIC
from converge.extensions.llm import LLMAgent
from converge.extensions.llm.testing import FunctionProvider

__all__ = [
    "DEFAULT_RULES",
    "KEY_ENV",
    "RULES_PREFIX",
    "SYSTEM_PROMPT",
    "TARGET",
    "build_agent",
    "scripted_model",
    "seed_rules",
    "select_provider",
]

#: The outbound target (the chat service) every reply goes to.
TARGET = "chat"
#: Store key prefix of the label rules.
RULES_PREFIX = "triage:label:"
#: Label -> keywords and owners, written to the store on first start.
DEFAULT_RULES: dict[str, dict[str, list[str]]] = {
    "bug": {"keywords": ["crash", "error", "bug", "broken", "fails"], "owners": ["@ada"]},
    "performance": {"keywords": ["slow", "latency", "memory", "cpu"], "owners": ["@grace"]},
    "docs": {"keywords": ["docs", "documentation", "typo", "readme"], "owners": ["@linus"]},
    "question": {"keywords": ["how do i", "how to", "question", "?"], "owners": ["@margaret"]},
}
_FALLBACK = ("needs-triage", "@triage-team")
_KEEP_CALLS = 32
#: Environment variables that select a real model, in order of preference.
KEY_ENV = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MISTRAL_API_KEY")

SYSTEM_PROMPT = f"""You triage GitHub issues for a small team.
Each message you get is a GitHub webhook: payload.subject is the GitHub event name and
payload.payload is GitHub's body. For an "issues" event whose action is "opened":
1. invoke the tool lookup_labels with the issue's title and body;
2. then invoke draft_reply with the issue number, the author's login and the labels
   and owners lookup_labels returned;
3. then send exactly one message with topics ["{OUTBOUND_TOPIC}"] and the payload
   {{"target": "{TARGET}", "body": {{"issue": <number>, "repo": <full repository name>,
   "labels": [...], "owners": [...], "text": <the drafted reply>}}}}.
For any other event or action, answer [] (nothing to do)."""


async def seed_rules(store: Store, rules: Mapping[str, Mapping[str, list[str]]]) -> None:
    """Write the label rules to ``store`` unless some are there already."""
    if await store.alist(RULES_PREFIX):
        return
    for label, rule in rules.items():
        await store.aput(RULES_PREFIX + label, dict(rule))


def build_tools(store: Store) -> ToolRegistry:
    """The agent's two tools, reading the label rules from ``store``."""
    tools = ToolRegistry()

    @tools.tool
    async def lookup_labels(title: str, body: str) -> dict[str, list[str]]:
        """Labels whose keywords appear in an issue, and the people who own them.

        Args:
            title: The issue title.
            body: The issue text.
        """
        text = f"{title}\n{body}".lower()
        labels: list[str] = []
        owners: list[str] = []
        for key in sorted(await store.alist(RULES_PREFIX)):
            rule = await store.aget(key)
            if not isinstance(rule, dict):
                continue
            if any(word in text for word in rule.get("keywords", ())):
                labels.append(key[len(RULES_PREFIX) :])
                owners.extend(o for o in rule.get("owners", ()) if o not in owners)
        if not labels:
            labels, owners = [_FALLBACK[0]], [_FALLBACK[1]]
        return {"labels": labels, "owners": owners}

    @tools.tool
    def draft_reply(number: int, author: str, labels: list[str], owners: list[str]) -> str:
        """The reply to post for an issue.

        Args:
            number: The issue number.
            author: The login of the issue's author.
            labels: Labels given to the issue.
            owners: Who looks at it.
        """
        who = ", ".join(owners) or "the team"
        return (
            f"Thanks for #{number}, @{author}! Labelled {', '.join(labels) or 'for triage'}; "
            f"{who} will take a look."
        )

    return tools


def _issue(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The GitHub event in the latest user turn, or None."""
    for turn in reversed(messages):
        if turn.get("role") != "user" or not isinstance(turn.get("content"), str):
            continue
        try:
            doc = json.loads(turn["content"])
        except ValueError:
            return None
        for message in doc.get("messages", ()):
            event = message.get("payload", {})
            if isinstance(event, dict) and isinstance(event.get("payload"), dict):
                return event
        return None
    return None


def _tool_result(content: str) -> Any:
    # A tool's result comes back as JSON text, a string result as the string itself.
    try:
        return json.loads(content)
    except ValueError:
        return content


def scripted_model(messages: list[dict[str, Any]], **_: Any) -> str:
    """A deterministic stand-in for the model: the three steps of :data:`SYSTEM_PROMPT`.

    Reads the issue from the user turn and the tool results from the ``tool`` messages,
    and answers the next step's decisions as JSON.
    """
    event = _issue(messages)
    github = event.get("payload", {}) if event else {}
    issue = github.get("issue")
    if not event or event.get("subject") != "issues" or github.get("action") != "opened":
        return "[]"
    if not isinstance(issue, dict):
        return "[]"
    results = {
        m.get("name"): _tool_result(m["content"])
        for m in messages
        if m.get("role") == "tool" and isinstance(m.get("content"), str)
    }
    if "lookup_labels" not in results:
        params = {"title": issue.get("title", ""), "body": issue.get("body") or ""}
        return json.dumps([{"type": "InvokeTool", "tool_name": "lookup_labels", "params": params}])
    found = results["lookup_labels"]
    if "draft_reply" not in results:
        params = {
            "number": issue.get("number", 0),
            "author": (issue.get("user") or {}).get("login", "someone"),
            "labels": found["labels"],
            "owners": found["owners"],
        }
        return json.dumps([{"type": "InvokeTool", "tool_name": "draft_reply", "params": params}])
    body = {
        "issue": issue.get("number"),
        "repo": (github.get("repository") or {}).get("full_name", ""),
        "labels": found["labels"],
        "owners": found["owners"],
        "text": results["draft_reply"],
    }
    send = {"topics": [OUTBOUND_TOPIC], "payload": {"target": TARGET, "body": body}}
    return json.dumps([{"type": "SendMessage", "message": send}])


def select_provider(
    env: Mapping[str, str] | None = None, *, model: str | None = None, delay_sec: float = 0.0
) -> tuple[Any, str]:
    """The provider to use and a short description of it.

    The first of ``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``, ``MISTRAL_API_KEY`` that is
    set selects that vendor's provider (``model`` overrides its default model);
    otherwise the offline :func:`scripted_model`, taking ``delay_sec`` per call (to
    play a model's latency).
    """
    env = os.environ if env is None else env
    for name in KEY_ENV:
        key = env.get(name)
        if not key:
            continue
        options: dict[str, Any] = {"model": model} if model else {}
        if name == "OPENAI_API_KEY":
            from converge.extensions.llm import OpenAIProvider

            provider: Any = OpenAIProvider(key, **options)
        elif name == "ANTHROPIC_API_KEY":
            from converge.extensions.llm import AnthropicProvider

            provider = AnthropicProvider(key, **options)
        else:
            from converge.extensions.llm import MistralProvider

            provider = MistralProvider(key, **options)
        return provider, f"{type(provider).__name__} ({name} is set)"

    async def offline(messages: list[dict[str, Any]], **kwargs: Any) -> str:
        if delay_sec:
            await anyio.sleep(delay_sec)
        del scripted.calls[:-_KEEP_CALLS]  # a long run keeps only the latest calls
        return scripted_model(messages, **kwargs)

    scripted = FunctionProvider(offline, model="scripted")
    return scripted, "scripted offline model (no API key set)"


def build_agent(
    provider: Any, store: Store, events: EventEmitter, identity: Identity | None = None
) -> LLMAgent:
    """The triage agent, its tools reading the label rules from ``store``.

    ``identity`` names it (a fresh one if None): the runner keeps its decision records
    under that name, so a process restarted with the same identity replays them.
    """
    return LLMAgent(
        identity if identity is not None else Identity(),
        provider,
        SYSTEM_PROMPT,
        build_tools(store),
        name="triage",
        events=events,
    )

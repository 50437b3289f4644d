"""The triage example's parts: provider selection, the scripted model, the chat stand-in,
the hop display, the sealed secrets."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import anyio
import httpx
import pytest
from examples.triage.agent import DEFAULT_RULES, build_agent, seed_rules, select_provider
from examples.triage.app import process_bus
from examples.triage.hops import Hop, HopDisplay
from examples.triage.secrets import AGENT_KEY_ENV, KEY_ENV, aload_secrets
from triage_helpers import CHAT_SECRET, Chat

from converge.core import Message
from converge.core.decisions import InvokeTool, SendMessage
from converge.core.events import EventEmitter
from converge.errors import ConfigurationError
from converge.extensions.connectors import sign_webhook
from converge.extensions.connectors.connector import INBOUND_TOPIC, OUTBOUND_TOPIC
from converge.extensions.llm import AnthropicProvider, MistralProvider, OpenAIProvider
from converge.extensions.llm.testing import FunctionProvider
from converge.extensions.rate_limit import RateLimiter, TokenBucketConfig
from converge.extensions.storage import MemoryStore


@pytest.mark.parametrize(
    ("env", "kind"),
    [
        ({}, FunctionProvider),
        ({"OPENAI_API_KEY": "sk-test"}, OpenAIProvider),
        ({"ANTHROPIC_API_KEY": "sk-ant-test"}, AnthropicProvider),
        ({"MISTRAL_API_KEY": "test"}, MistralProvider),
        ({"MISTRAL_API_KEY": "m", "OPENAI_API_KEY": "o"}, OpenAIProvider),
    ],
)
def test_an_api_key_selects_its_provider_else_the_scripted_model(
    env: dict[str, str], kind: type
) -> None:
    provider, text = select_provider(env)  # constructing a provider sends nothing
    assert isinstance(provider, kind)
    assert ("offline" in text) == (kind is FunctionProvider)


@pytest.mark.anyio
async def test_the_scripted_model_triages_in_three_steps_with_the_tools() -> None:
    store = MemoryStore()
    await seed_rules(store, DEFAULT_RULES)
    provider, _ = select_provider({})
    agent = build_agent(provider, store, EventEmitter())
    issue = {"number": 3, "title": "Dashboard is slow", "body": "9 s", "user": {"login": "x"}}
    event = Message(
        sender="github",
        topics=[INBOUND_TOPIC],
        payload={
            "subject": "issues",
            "payload": {"action": "opened", "issue": issue, "repository": {"full_name": "o/r"}},
        },
    )
    observations: list[dict[str, object]] = []
    for tool in ("lookup_labels", "draft_reply"):
        (call,) = await agent.adecide([event], [], tool_observations=observations or None)
        assert isinstance(call, InvokeTool)
        assert call.tool_name == tool
        assert agent.tool_registry is not None
        result = await agent.tool_registry.ainvoke(call.tool_name, call.params)
        observations.append(
            {
                "tool_name": tool,
                "params": dict(call.params),
                "call_id": call.call_id,
                "result": result,
            }
        )
    (reply,) = await agent.adecide([event], [], tool_observations=observations)
    assert isinstance(reply, SendMessage)
    assert [t.name for t in reply.message.topics] == [OUTBOUND_TOPIC]
    body = reply.message.to_dict()["payload"]["body"]
    assert (body["issue"], body["labels"], body["owners"]) == (3, ["performance"], ["@grace"])
    closed = Message(
        sender="github",
        payload={"subject": "issues", "payload": {"action": "closed", "issue": issue}},
    )
    assert await agent.adecide([closed], []) == []


def test_the_chat_stand_in_checks_signatures_and_deduplicates() -> None:
    chat = Chat()
    try:
        body = json.dumps({"issue": 1, "text": "hi"}).encode()

        def post(headers: dict[str, str]) -> httpx.Response:
            return httpx.post(chat.url, content=body, headers=headers)

        good = sign_webhook("standard-webhooks", CHAT_SECRET, body, event_id="msg_1")
        assert post(good).json() == {"status": "ok"}
        assert post(good).json() == {"status": "duplicate"}
        forged = sign_webhook("standard-webhooks", "whsec_" + "A" * 32, body, event_id="msg_2")
        assert post(forged).status_code == 401
        stale = sign_webhook(
            "standard-webhooks",
            CHAT_SECRET,
            body,
            event_id="msg_3",
            timestamp=int(time.time()) - 600,
        )
        answer = post(stale)
        assert (answer.status_code, answer.json()["reason"]) == (401, "timestamp_outside_tolerance")
        assert post({}).status_code == 401
        summary = httpx.get(chat.url).json()
        assert (summary["requests"], summary["distinct"]) == (5, 1)
    finally:
        chat.stop()


def test_hop_display_redraws_on_a_terminal_and_prints_plain_lines_otherwise() -> None:
    for tty in (True, False):
        out = io.StringIO()
        display = HopDisplay(out, tty=tty)
        display(Hop(hop="verified", issue=1, detail="issues opened"))
        display(Hop(hop="delivered", issue=1, detail="200"))
        display.tick()
        text = out.getvalue()
        assert "verified  #1" in text
        assert "delivered #1" in text
        assert ("\r\x1b[K" in text) == tty
        assert display.counts["delivered"] == 1
        assert len(display.latencies_ms) == 1
    quiet = io.StringIO()
    display = HopDisplay(quiet, quiet=True, tty=False)
    display(Hop(hop="received", ref="abc"))
    assert quiet.getvalue() == ""
    display.close()
    assert "received 1" in quiet.getvalue()


@pytest.mark.anyio
async def test_the_agent_identity_is_sealed_once_and_kept_across_restarts(tmp_path: Path) -> None:
    # Its decision records are kept under the agent's id: a restarted process must have
    # the same one to replay them rather than decide (and reply) a second time.
    env = {KEY_ENV: base64.b64encode(b"k" * 32).decode()}
    first = await aload_secrets(tmp_path, env)
    again = await aload_secrets(tmp_path, env)
    assert first.agent.fingerprint == again.agent.fingerprint
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    assert (await aload_secrets(elsewhere, env)).agent.fingerprint != first.agent.fingerprint
    shared = {**env, AGENT_KEY_ENV: base64.b64encode(b"a" * 32).decode()}
    assert (await aload_secrets(tmp_path, shared)).agent.fingerprint == (
        await aload_secrets(elsewhere, shared)
    ).agent.fingerprint
    with pytest.raises(ConfigurationError, match=AGENT_KEY_ENV):
        await aload_secrets(tmp_path, {**env, AGENT_KEY_ENV: "c2hvcnQ="})
    # a malformed key was refused, not sealed: the shared one is still there
    assert (await aload_secrets(tmp_path, env)).agent.fingerprint == (
        await aload_secrets(tmp_path, shared)
    ).agent.fingerprint


@pytest.mark.anyio
async def test_a_reply_takes_one_token_of_the_deployments_rate_not_one_per_process() -> None:
    # Agents and gateway in processes of their own share one bucket (a store). The
    # gateway's bus used to throttle again the replies its bridge imported: each reply
    # took two tokens, so --rate 20 gave 10 replies/s, and the import stalled meanwhile.
    limiter = RateLimiter(
        store=MemoryStore(),
        global_config=TokenBucketConfig(capacity=1, refill_tokens_per_sec=0.001),
    )
    agents, gateway = process_bus(limiter, "agents"), process_bus(limiter, "gateway")
    reply = Message(sender="agent", topics=[OUTBOUND_TOPIC], payload={"text": "hi"})
    agents_out = agents.subscribe("out", topics=[OUTBOUND_TOPIC])
    gateway_out = gateway.subscribe("out", topics=[OUTBOUND_TOPIC])
    with anyio.fail_after(2):
        assert await agents.publish(reply) == 1  # the bucket's one token
        assert await gateway.publish(reply) == 1  # imported: no second token
        assert (await agents_out.receive()).id == (await gateway_out.receive()).id
    with anyio.move_on_after(0.3) as waited:
        await process_bus(limiter, "all").publish(reply)  # deciding: waits for a token
    assert waited.cancelled_caught

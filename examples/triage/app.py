"""``python -m examples.triage``: the whole edge in one program.

GitHub ``issues`` webhooks reach the gateway (signature verified), enter the durable
inbox, an :class:`~converge.extensions.llm.LLMAgent` with two tools decides, and its
reply leaves as a signed outbound webhook to a stand-in chat service, throttled by a
:class:`~converge.extensions.rate_limit.RateLimitHook`. Everything durable lives in one
SQLite file in the working directory (``--dir``); the secrets are sealed in an
:class:`~converge.extensions.storage.EncryptedStore` beside it. Each hop is printed as
it happens; the inspector page (``/admin/``, token printed at start) shows the same
events and deliveries. Kill the process at any moment and start it again on the same
``--dir``: every accepted issue still gets exactly one reply.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets as _secrets
import signal
import socket
import sys
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx2

from converge.cli.config import masked_store, open_store
from converge.core.events import EventEmitter
from converge.core.message import Message
from converge.errors import ConfigurationError, ConvergeError
from converge.extensions.connectors import (
    OutboundTarget,
    ProviderProfile,
    RetrySchedule,
    WebhookConnector,
    WebhookGateway,
)
from converge.extensions.connectors.connector import INBOUND_TOPIC, OUTBOUND_TOPIC
from converge.extensions.connectors.logs import configure_logging
from converge.extensions.connectors.server import AdminApp, EventLog
from converge.extensions.rate_limit import RateLimiter, RateLimitHook, TokenBucketConfig
from converge.runtime import AgentRunner, MessageBus
from examples.triage.agent import DEFAULT_RULES, TARGET, build_agent, seed_rules, select_provider
from examples.triage.hops import HopDisplay, HopTracker, TrackingSender, verified_listener
from examples.triage.receiver import ChatReceiver
from examples.triage.secrets import aload_secrets
from examples.triage.sender import asend_issues

__all__ = [
    "ADMIN_TOKEN_ENV",
    "REDIS_PASSWORD_ENV",
    "ThrottledReplies",
    "amain",
    "main",
    "parse_args",
    "process_bus",
]

ADMIN_TOKEN_ENV = "TRIAGE_ADMIN_TOKEN"
REDIS_PASSWORD_ENV = "TRIAGE_REDIS_PASSWORD"


class ThrottledReplies(RateLimitHook):
    """A :class:`RateLimitHook` that makes outbound replies *wait* for a token.

    The plain hook drops a message over the limit (egress and ingress); a reply must
    never be dropped, so here a message on :data:`OUTBOUND_TOPIC` waits
    (``acquire_message``) until the egress bucket admits it: the agent's publish, and so
    the agent, slows down to the rate. Every other message passes untouched, in both
    directions.
    """

    async def apre_send(self, message: Message) -> Message | None:
        """Wait for an egress token for a reply; pass anything else."""
        if any(topic.name == OUTBOUND_TOPIC for topic in message.topics):
            await self.rate_limiter.acquire_message(message, direction="egress")
        return message

    async def apost_receive(self, message: Message) -> Message | None:
        """Pass every message: inbound events wait in the durable inbox already (a
        hook dropping one would only make the connector publish it again later)."""
        return message


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (``python -m examples.triage --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.triage",
        description="GitHub issues -> verified -> durable inbox -> LLM agent -> signed reply.",
    )
    parser.add_argument("--dir", default="triage-data", help="working directory (SQLite files)")
    parser.add_argument(
        "--store",
        default="sqlite:triage.sqlite3",
        help="sqlite:PATH (in --dir) or redis://host:port/db (password: $TRIAGE_REDIS_PASSWORD)",
    )
    parser.add_argument(
        "--role",
        choices=("all", "gateway", "agents"),
        default="all",
        help="all in one process, or gateway / agent processes linked by Redis Streams",
    )
    parser.add_argument(
        "--claim-idle-sec", type=float, default=10.0, help="Redis: take over a dead agent's work"
    )
    parser.add_argument("--bind", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--port", type=int, default=8080, help="gateway port (0: a free one)")
    parser.add_argument(
        "--receiver-url",
        help="the chat service's URL; without it a stand-in is served on --receiver-port",
    )
    parser.add_argument("--receiver-port", type=int, default=0, help="stand-in's port (0: free)")
    parser.add_argument("--issues", type=int, default=5, help="demo issues to send (0: none)")
    parser.add_argument(
        "--exit-when-done", action="store_true", help="exit once the demo issues are answered"
    )
    parser.add_argument("--model", help="model name for a real provider")
    parser.add_argument(
        "--model-delay", type=float, default=0.0, help="seconds per offline model call"
    )
    parser.add_argument("--rate", type=float, default=20.0, help="replies per second at most")
    parser.add_argument("--burst", type=float, default=10.0, help="replies in one burst at most")
    parser.add_argument("--lease-sec", type=float, default=5.0, help="inbox lease (redelivery)")
    parser.add_argument(
        "--stop-grace-sec",
        type=float,
        default=5.0,
        help="on Ctrl-C / SIGTERM, seconds to finish the issues in hand (the rest wait)",
    )
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--quiet", action="store_true", help="only the status line")
    parser.add_argument("--log-level", default="warning", help="converge log level (info: more)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    return parser.parse_args(argv)


def _listen(bind: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot listen on {bind}:{port}: {exc.strerror} (try --port 0)") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def _serve(app: Any, sock: socket.socket, stop: anyio.Event, backend: str) -> None:
    """Serve ``app`` on ``sock`` until ``stop`` is set: uvicorn on asyncio, hypercorn on trio."""
    if backend == "trio":
        from hypercorn.config import Config
        from hypercorn.trio import serve

        config = Config()
        config.bind = [f"fd://{sock.fileno()}"]
        config.accesslog = None
        config.errorlog = None
        await serve(app, config, shutdown_trigger=stop.wait)
        return
    import uvicorn

    class Server(uvicorn.Server):
        # Signals are the app's (one handler for both servers), not uvicorn's.
        def capture_signals(self) -> Any:
            return contextlib.nullcontext()

    server = Server(
        uvicorn.Config(app, lifespan="on", log_config=None, access_log=False, log_level="warning")
    )
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            await stop.wait()
            server.should_exit = True

        tg.start_soon(watch)
        await server.serve(sockets=[sock])
        tg.cancel_scope.cancel()


async def _signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
        async for _ in received:
            stop.set()
            return


def process_bus(limiter: RateLimiter, role: str) -> MessageBus:
    """This process's bus: replies wait for the rate where they are decided, only there.

    A gateway process publishes again on its own bus the replies the agent processes
    sent it: throttling them there too would take a second token per reply from the
    deployment's one bucket (half the rate) and stall its outbox import meanwhile.
    """
    deciding = role in ("all", "agents")
    return MessageBus(hooks=[ThrottledReplies(limiter)] if deciding else [])


@contextlib.asynccontextmanager
async def _stopping_within(
    runner: contextlib.AbstractAsyncContextManager[Any], grace_sec: float
) -> AsyncIterator[None]:
    """Run ``runner`` for the block; at its end, let it finish what it holds for at most
    ``grace_sec``, then cancel it: what it did not finish is not acknowledged, and the
    inbox (or Redis) hands it out again on the next start."""
    with anyio.CancelScope() as stopping:
        async with runner:
            yield
            stopping.deadline = anyio.current_time() + grace_sec


def _bridge(
    bus: MessageBus, url: str | None, role: str, claim_idle_sec: float
) -> contextlib.AbstractAsyncContextManager[Any]:
    """The Redis Streams link between gateway and agent processes (none for ``all``)."""
    if role == "all":
        return contextlib.nullcontext()
    if url is None:
        raise ConfigurationError(f"--role {role} needs a redis:// --store shared by the roles")
    from converge.runtime.redis_streams import RedisStreamsBridge

    if role == "gateway":  # events out to the agents; their replies back into the outbox
        return RedisStreamsBridge(
            bus,
            url,
            export_topics=[INBOUND_TOPIC],
            import_topics=[OUTBOUND_TOPIC],
            group="triage-outbox",
            claim_idle_sec=claim_idle_sec,
        )
    return RedisStreamsBridge(
        bus,
        url,
        export_topics=[OUTBOUND_TOPIC],
        import_topics=[INBOUND_TOPIC],
        group="triage-agents",
        claim_idle_sec=claim_idle_sec,
    )


def _redis_url(spec: str) -> str | None:
    """The store's Redis URL with the password from the environment, or None."""
    if not spec.startswith(("redis://", "rediss://")):
        return None
    password = os.environ.get(REDIS_PASSWORD_ENV)
    if not password:
        return spec
    parts = urllib.parse.urlsplit(spec)
    user = urllib.parse.quote(parts.username or "", safe="")
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{parts.netloc.rsplit('@', 1)[-1]}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


async def amain(args: argparse.Namespace) -> int:
    """Run the example until interrupted (or done, with ``--exit-when-done``)."""
    configure_logging(args.log_level, args.log_format)
    workdir = Path(args.dir)
    sealed = await aload_secrets(workdir)
    events = EventEmitter()
    display = HopDisplay(quiet=args.quiet)
    events.subscribe(display)
    provider, provider_text = select_provider(model=args.model, delay_sec=args.model_delay)
    admin_token = os.environ.get(ADMIN_TOKEN_ENV) or _secrets.token_urlsafe(24)
    serving = args.role in ("all", "gateway")
    deciding = args.role in ("all", "agents")

    gateway_sock = _listen(args.bind, args.port) if serving else None
    gateway_url = f"http://{args.bind}:{gateway_sock.getsockname()[1]}" if gateway_sock else ""
    receiver: ChatReceiver | None = None
    receiver_sock: socket.socket | None = None
    if args.receiver_url:
        chat_url = args.receiver_url
    elif serving:
        receiver = ChatReceiver(sealed.chat)
        receiver_sock = _listen(args.bind, args.receiver_port)
        chat_url = f"http://{args.bind}:{receiver_sock.getsockname()[1]}/messages"
    else:
        chat_url = "http://127.0.0.1/messages"  # agents post nothing themselves

    redis_url = _redis_url(args.store)
    store = open_store(args.store, workdir, password=os.environ.get(REDIS_PASSWORD_ENV))
    # One bucket for the whole deployment when the store is shared (Redis).
    limiter = RateLimiter(
        store=store if redis_url else None,
        global_config=TokenBucketConfig(capacity=args.burst, refill_tokens_per_sec=args.rate),
    )
    bus = process_bus(limiter, args.role)
    stop = anyio.Event()
    async with store, httpx2.AsyncClient() as client:
        await seed_rules(store, DEFAULT_RULES)
        connector = WebhookConnector(
            provider_profiles={
                "github": ProviderProfile(name="github", secret_ref="github", scheme="github")
            },
            secrets={"github": sealed.github},
            store=store,
            connector_id="triage",
            targets=[OutboundTarget(name=TARGET, url=chat_url, signing_secret=sealed.chat)],
            outbound_sender=TrackingSender(events, client),
            # Retries ride out a chat outage; a dead process's leases pass on in seconds.
            retry_policy=RetrySchedule(
                delays_sec=(0.5, 1, 2, 5, 10, 30, 60, 300),
                request_timeout_sec=2.0,
                lease_margin_sec=1.0,
            ),
            breaker_recovery_timeout_sec=5.0,
            inbox_lease_sec=args.lease_sec,
        )
        connector.add_inbound_listener(verified_listener(events))
        gateway = WebhookGateway(connector)
        core = gateway.asgi_app(poll_interval_sec=0.2)
        core.admin = AdminApp(EventLog.for_connector(connector), token=admin_token)
        app = HopTracker(core, events)
        agent = build_agent(provider, store, events, sealed.agent)

        print(f"converge triage example ({args.role})", flush=True)
        if serving:
            print(f"  gateway    POST {gateway_url}/webhook/github  (GitHub issues webhooks)")
            print(f"  chat       POST {chat_url}  (signed replies)")
            print(f"  inspector  {gateway_url}/admin/  token: {admin_token}")
        print(f"  store      {masked_store(args.store)} in {workdir} (inbox, outbox, decisions)")
        print(f"  secrets    sealed in {workdir / 'secrets.sqlite3'}; key: {sealed.key_source}")
        if deciding:
            print(f"  model      {provider_text}")
            print(f"  replies    at most {args.rate:g}/s, bursts of {args.burst:g} (RateLimitHook)")
        print(f"  backend    {args.backend}", flush=True)
        for warning in sealed.warnings:
            print(f"  warning    {warning}", flush=True)

        runner = (
            AgentRunner(bus, [agent], topics={agent.id: [INBOUND_TOPIC]}, store=store, max_batch=1)
            if deciding
            else contextlib.nullcontext()
        )
        try:
            async with (
                _bridge(bus, redis_url, args.role, args.claim_idle_sec),
                _stopping_within(runner, args.stop_grace_sec),
            ):
                if serving:
                    connector.attach_bus(bus)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_signals, stop)
                    tg.start_soon(display.run)
                    if serving and args.issues > 0:
                        tg.start_soon(_demo, args, gateway_url, sealed.github, display, stop)
                    async with anyio.create_task_group() as servers:  # until stop is set
                        if receiver is not None and receiver_sock is not None:
                            servers.start_soon(_serve, receiver, receiver_sock, stop, args.backend)
                        if gateway_sock is not None:
                            servers.start_soon(_serve, app, gateway_sock, stop, args.backend)
                        else:
                            await stop.wait()
                    tg.cancel_scope.cancel()
                connector.attach_bus(None)
        finally:
            await connector.aclose()
            display.close()
    return 0


async def _demo(
    args: argparse.Namespace, url: str, secret: str, display: HopDisplay, stop: anyio.Event
) -> None:
    """Send the demo issues to our own gateway (as GitHub would), then maybe stop."""
    async with httpx2.AsyncClient() as probe:
        while True:  # until the gateway serves and its dispatcher runs
            try:
                if (await probe.get(f"{url}/readyz")).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            await anyio.sleep(0.05)
    answers = await asend_issues(f"{url}/webhook/github", secret, list(range(1, args.issues + 1)))
    accepted = sum(1 for code in answers.values() if code == 202)
    if not args.exit_when_done:
        return
    await display.wait_for("delivered", accepted)
    stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse the command line and run on the chosen backend."""
    args = parse_args(argv)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    try:
        return anyio.run(amain, args, backend=args.backend)
    except ConvergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

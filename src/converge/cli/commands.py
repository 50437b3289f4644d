"""Argument parsing and the commands behind ``converge`` (see :mod:`converge.cli`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converge.errors import ConfigurationError, MissingDependencyError, StoreError, UsageError

if TYPE_CHECKING:
    from converge.extensions.connectors import ProviderProfile

__all__ = ["main"]

_SCHEMES = ("hmac", "standard-webhooks", "svix", "stripe", "github", "slack")


def _command(commands: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` starts with ``description``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    from converge import __version__

    parser = argparse.ArgumentParser(
        prog="converge",
        description="converge: serve the webhook gateway, sign and send test webhooks, "
        "inspect and replay events.",
    )
    parser.add_argument("--version", action="version", version=f"converge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gateway = _command(
        commands,
        "gateway",
        "serve the webhook gateway",
        "Serve the webhook gateway a TOML file describes (uvicorn): verified inbound\n"
        "webhooks on /webhook/NAME, /outbound, /healthz, /readyz, /metrics and, with an\n"
        "admin token, /admin/. Stop it with Ctrl-C.",
    )
    gateway.add_argument("--config", required=True, type=Path, help="gateway TOML file")
    gateway.add_argument("--host", help="override [gateway] bind")
    gateway.add_argument("--port", type=int, help="override [gateway] port")
    gateway.add_argument(
        "--store", help="override [gateway] store (memory, file:P, sqlite:P, redis://host:port/db)"
    )
    gateway.add_argument(
        "--check", action="store_true", help="validate the config, print a summary, exit"
    )

    webhook = _command(
        commands,
        "webhook",
        "sign or send test webhook requests",
        "Make correctly signed test webhook requests, for a provider of a gateway config\n"
        "(--config, --provider) or for a scheme and secret given as flags.",
    )
    actions = webhook.add_subparsers(dest="action", required=True, metavar="ACTION")
    sign = _command(
        actions,
        "sign",
        "print a signed request's headers",
        "Print the headers of a correctly signed request (or the whole request as JSON,\n"
        "or a curl command line) without sending it.",
    )
    send = _command(
        actions,
        "send",
        "send a signed request and print the answer",
        "Send a correctly signed request and print the HTTP status and the answer.\n"
        "Exit status 0 on a 2xx answer, 1 otherwise, 2 for bad arguments.",
    )
    send.add_argument("url", nargs="?", help="where to POST (default: from --config)")
    for sub in (sign, send):
        source = sub.add_argument_group("sender (a provider from a gateway config, or flags)")
        source.add_argument("--config", type=Path, help="gateway TOML file")
        source.add_argument("--provider", help="provider name in the config")
        source.add_argument("--scheme", choices=_SCHEMES, help="signature scheme")
        source.add_argument("--secret", help="shared secret")
        source.add_argument("--secret-env", help="environment variable holding the secret")
        source.add_argument("--signature-header", default="X-Webhook-Signature")
        source.add_argument("--timestamp-header", default="X-Webhook-Timestamp")
        source.add_argument("--event-id-field", default="event_id")
        source.add_argument("--algorithm", default="sha256", help="hmac scheme digest")
        source.add_argument(
            "--canonicalization", default="raw_body", choices=("raw_body", "timestamp_body")
        )
        body = sub.add_argument_group("request")
        body.add_argument("--data", help="JSON object body (default: a fresh test event)")
        body.add_argument("--data-file", type=Path, help="read the body from a file")
        body.add_argument("--timestamp", type=int, help="Unix seconds (default: now)")
        body.add_argument("--id", dest="event_id", help="header event id (webhook-id, ...)")
    sign.add_argument("--format", choices=("headers", "json", "curl"), default="headers")
    sign.add_argument("--url", help="URL for --format curl")
    send.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")

    from converge.cli.events import add_parsers

    add_parsers(commands, _command)
    return parser


def _sender(args: argparse.Namespace) -> tuple[ProviderProfile, str, str | None]:
    from converge.cli.config import load_config
    from converge.cli.webhook import resolve_target

    if args.config is not None:
        config = load_config(args.config, warn=False)
        provider = args.provider
        if not provider:
            if len(config.providers) != 1:
                raise UsageError("--provider is required: the config has several providers")
            provider = next(iter(config.providers))
        return resolve_target(config, provider)
    if not args.scheme:
        raise UsageError("give --config (and --provider) or --scheme with --secret")
    secret = args.secret
    if args.secret_env:
        secret = os.environ.get(args.secret_env, "")
        if not secret:
            raise UsageError(f"environment variable {args.secret_env} is not set")
    if not isinstance(secret, str) or not secret:
        raise UsageError("--secret or --secret-env is required with --scheme")
    from converge.extensions.connectors import ProviderProfile

    profile = ProviderProfile(
        name="cli",
        secret_ref="cli",
        signature_header=args.signature_header,
        timestamp_header=args.timestamp_header,
        event_id_field=args.event_id_field,
        signature_algorithm=args.algorithm,
        canonicalization=args.canonicalization,
        scheme=args.scheme,
    )
    return profile, secret, None


def _body(args: argparse.Namespace) -> bytes | None:
    if args.data is not None and args.data_file is not None:
        raise UsageError("give --data or --data-file, not both")
    if args.data is not None:
        return str(args.data).encode()
    if args.data_file is not None:
        try:
            return Path(args.data_file).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {args.data_file}: {exc.strerror}") from exc
    return None


def _webhook(args: argparse.Namespace) -> int:
    from converge.cli.webhook import sign_request

    profile, secret, config_url = _sender(args)
    request = sign_request(
        profile, secret, body=_body(args), timestamp=args.timestamp, event_id=args.event_id
    )
    if args.action == "sign":
        if args.format == "json":
            print(json.dumps(request.to_dict(), indent=2))
        elif args.format == "curl":
            url = args.url or config_url
            if not url:
                raise UsageError("--format curl needs --url (or --config)")
            print(request.curl(url))
        else:
            for name, value in request.headers.items():
                print(f"{name}: {value}")
        return 0
    url = args.url or config_url
    if not url:
        raise UsageError("give the URL to send to (or --config)")
    import httpx2

    try:
        response = httpx2.post(
            url, headers=request.headers, content=request.body, timeout=args.timeout
        )
    except httpx2.InvalidURL as exc:  # not an HTTPError
        raise UsageError(f"{url!r} is not a URL to send to: {exc}") from None
    except httpx2.HTTPError as exc:
        print(f"error: could not reach {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"HTTP {response.status_code}")
    print(response.text)
    return 0 if response.is_success else 1


def _check_bind(host: str, port: int) -> None:
    """Fail in one line, before the server starts, if ``host:port`` cannot be bound.

    Raises:
        ConfigurationError: If the address is in use, not local, or not permitted.
    """
    import socket

    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    with socket.socket(family, kind, proto) as sock:
        # As the server binds: SO_REUSEADDR, so a port in TIME_WAIT is not "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            hint = " (is another gateway running? use --port)" if "in use" in reason else ""
            raise ConfigurationError(f"cannot listen on {host}:{port}: {reason}{hint}") from exc


def _gateway(args: argparse.Namespace) -> int:
    import dataclasses

    from converge.cli.config import load_config
    from converge.cli.serve import serve, summary
    from converge.extensions.connectors.logs import configure_logging

    # Parse quietly once to learn the log settings, then again with warnings shown.
    config = load_config(args.config, warn=False)
    configure_logging(config.log_level, "json" if config.log_format == "json" else "text")
    config = load_config(args.config)
    overrides = {
        key: value
        for key, value in (("bind", args.host), ("port", args.port), ("store", args.store))
        if value is not None
    }
    if overrides:
        from converge.cli.config import check_gateway_settings

        config = dataclasses.replace(config, **overrides)
        check_gateway_settings(config)
    if not config.providers:
        logging.getLogger("converge.gateway").warning(
            "%s configures no provider: every webhook is rejected (404 unknown_provider); "
            "add a [providers.NAME] table",
            args.config,
        )
    if args.check:
        from converge.cli.serve import make_app

        make_app(config)  # builds every object, so their validation runs too
        print(summary(config))
        return 0
    _check_bind(config.bind, config.port)
    serve(config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``converge`` command line.

    Args:
        argv: Arguments without the program name (``sys.argv[1:]`` when None).

    Returns:
        The exit status.
    """
    args = _parser().parse_args(argv)
    try:
        if args.command == "gateway":
            return _gateway(args)
        if args.command == "webhook":
            return _webhook(args)
        from converge.cli.events import run

        return run(args)
    except (ConfigurationError, UsageError, MissingDependencyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"error: the store failed: {exc}", file=sys.stderr)
        return 1

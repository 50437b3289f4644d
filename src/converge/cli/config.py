"""The gateway's TOML configuration: parsing, validation, and building the objects."""

from __future__ import annotations

import ipaddress
import logging
import os
import sqlite3
import tomllib
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converge._numbers import positive_float
from converge._redis_url import check_redis_url, masked_url
from converge.core.store import Store
from converge.errors import ConfigurationError
from converge.extensions.connectors import (
    OutboundTarget,
    ProviderProfile,
    RetrySchedule,
    WebhookConnector,
    WebhookGateway,
    WebhookRetryPolicy,
    WebhookSecurityPolicy,
)
from converge.extensions.connectors.outbound.retry import parse_duration

if TYPE_CHECKING:
    from converge.extensions.connectors.outbound.retry import RetryStrategy

__all__ = [
    "DEFAULT_RETENTION_SEC",
    "DEFAULT_STORE",
    "GatewayConfig",
    "ProviderConfig",
    "TargetConfig",
    "build_gateway",
    "check_gateway_settings",
    "load_config",
    "masked_store",
    "open_store",
    "parse_config",
]

_log = logging.getLogger("converge.gateway")

#: Store used when the config names none: an embedded SQLite file in the working directory.
DEFAULT_STORE = "sqlite:converge-gateway.sqlite3"

_GATEWAY_KEYS = {
    "bind",
    "port",
    "store",
    "store_password_env",
    "connector_id",
    "outbound_token_env",
    "max_in_flight",
    "log_level",
    "log_events",
    "log_format",
    "admin_token_env",
    "event_log_max",
    "event_retention_sec",
    "client_cert_header",
    "poll_interval_sec",
    # server limits (slow and idle clients) and proxies
    "trusted_proxies",
    "header_timeout_sec",
    "body_timeout_sec",
    "keep_alive_timeout_sec",
    "max_connections",
    "backlog",
    "max_header_bytes",
}
_PROFILE_KEYS = {f.name for f in fields(ProviderProfile)} - {"name", "secret_ref"}
_PROVIDER_KEYS = _PROFILE_KEYS | {"secret", "secret_env", "forward_to", "forward_format"}
_TARGET_KEYS = {"url", "signing_secret", "signing_secret_env", "max_concurrency"}
# [retry]: a delay schedule (the default) or the exponential WebhookRetryPolicy.
_SCHEDULE_KEYS = {"schedule", "jitter_ratio", "request_timeout_sec", "lease_margin_sec"}
_POLICY_KEYS = {f.name for f in fields(WebhookRetryPolicy)}
_BREAKER_KEYS = {"failure_threshold", "recovery_timeout_sec"}
_DEAD_LETTER_KEYS = {"retention_sec"}
_REDIS_SCHEMES = ("redis", "rediss")
#: How long delivered and dead-lettered actions stay inspectable by default: 7 days.
DEFAULT_RETENTION_SEC = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One ``[providers.NAME]`` table, resolved.

    Attributes:
        profile: The provider profile.
        secrets: The secret values (several during a rotation).
        forward_to: Target that receives accepted events, if any.
        forward_format: ``"envelope"`` (converge's JSON event) or ``"raw"`` (the
            sender's exact bytes and headers, plus converge's signature).
    """

    profile: ProviderProfile
    secrets: tuple[str, ...]
    forward_to: str | None = None
    forward_format: str = "envelope"


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """One ``[targets.NAME]`` table, resolved.

    Attributes:
        target: The outbound target.
    """

    target: OutboundTarget


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """A whole gateway configuration file, resolved (secrets read from the environment).

    Attributes:
        bind: Address to listen on.
        port: TCP port.
        store: ``"memory"``, ``"file:PATH"``, ``"sqlite:PATH"``, or a Redis URL
            ``"redis://[user@]host:port/db"`` (``rediss://`` for TLS) shared by replicas.
        store_password: The Redis password, read from ``store_password_env``.
        connector_id: The connector's id (store key prefix, message sender).
        outbound_token: Bearer token for ``/outbound``; None disables the endpoint.
        max_in_flight: Outbound attempts in flight at most.
        log_level: Server log level.
        log_events: Log accepted events that are not forwarded anywhere.
        log_format: ``"text"`` or ``"json"`` log lines.
        admin_token: Bearer token for ``/admin/``; None disables the admin API and page.
        event_log_max: Finished records (events, deliveries, dead letters) kept per
            queue at most; older ones are deleted (the retention bounds them in time).
        event_retention_sec: How long finished inbound events stay in the event log.
        client_cert_header: Proxy header reporting client certificates (trusted only
            from ``trusted_proxies``).
        poll_interval_sec: Outbox rescan interval.
        trusted_proxies: Addresses/CIDR networks of the proxies in front of the gateway:
            only they may set ``client_cert_header`` and ``X-Forwarded-For``.
        header_timeout_sec: Seconds for a request's line and headers to arrive in full.
        body_timeout_sec: Seconds for a request body to arrive in full (else 408).
        keep_alive_timeout_sec: Seconds an idle keep-alive connection stays open.
        max_connections: Open connections at most (the longest-waiting idle one is
            closed for a new one; lowered to fit the open-file limit).
        backlog: Connections the kernel queues before the server accepts them.
        max_header_bytes: Largest request line plus headers.
        security: Inbound limits.
        retry: Outbound retries: a :class:`RetrySchedule` (Svix's by default) or a
            :class:`WebhookRetryPolicy` when ``[retry]`` sets its exponential keys.
        breaker_failure_threshold: Consecutive failures that open a target's circuit.
        breaker_recovery_timeout_sec: Seconds an open circuit waits before a probe.
        dead_letter_retention_sec: How long dead-lettered and delivered actions stay
            inspectable.
        providers: Providers by name.
        targets: Targets by name.
        base_dir: Directory relative store paths are resolved against (the cwd).
    """

    bind: str = "127.0.0.1"
    port: int = 8080
    store: str = DEFAULT_STORE
    store_password: str | None = field(default=None, repr=False)
    connector_id: str = "gateway"
    outbound_token: str | None = None
    max_in_flight: int = 64
    log_level: str = "info"
    log_events: bool = True
    log_format: str = "text"
    admin_token: str | None = None
    event_log_max: int = 10_000
    event_retention_sec: float = 7 * 24 * 3600.0
    client_cert_header: str | None = None
    poll_interval_sec: float = 0.5
    trusted_proxies: tuple[str, ...] = ()
    header_timeout_sec: float = 10.0
    body_timeout_sec: float = 30.0
    keep_alive_timeout_sec: int = 5
    max_connections: int = 512
    backlog: int = 1024
    max_header_bytes: int = 16384
    security: WebhookSecurityPolicy = field(default_factory=WebhookSecurityPolicy)
    retry: RetryStrategy = field(default_factory=RetrySchedule)
    breaker_failure_threshold: int = 5
    breaker_recovery_timeout_sec: float = 30.0
    dead_letter_retention_sec: float = DEFAULT_RETENTION_SEC
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    targets: dict[str, TargetConfig] = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path.cwd)


def _table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigurationError(f"{where}[{key}] must be a table")
    return value


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigurationError(
            f"unknown keys in [{where}]: {unknown}; allowed: {sorted(allowed)}"
        )


def _secret_values(
    table: Mapping[str, Any],
    where: str,
    env: Mapping[str, str],
    *,
    literal: str,
    env_key: str,
    warn: bool,
) -> tuple[str, ...]:
    """Secrets from the environment variable(s) named by ``env_key``, else the literal."""
    names = table.get(env_key)
    if isinstance(names, str):
        names = [names]
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)
    ):
        raise ConfigurationError(f"[{where}] {env_key} must be a variable name or a list of them")
    found = [env[n] for n in names or () if env.get(n)]
    if found:
        return tuple(found)
    value = table.get(literal)
    if isinstance(value, str):
        value = [value]
    if value is not None and (
        not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)
    ):
        raise ConfigurationError(f"[{where}] {literal} must be a string or a list of strings")
    if not value:
        return ()
    if names and warn:
        _log.warning(
            "[%s]: %s is not set; using the literal %s from the config file",
            where,
            " / ".join(names),
            literal,
        )
    return tuple(value)


def parse_config(
    data: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    warn: bool = True,
) -> GatewayConfig:
    """Validate a parsed TOML document and resolve its secrets.

    Args:
        data: The TOML document as a dict.
        env: Environment to read secrets from (``os.environ`` by default).
        base_dir: Directory relative store paths resolve against (the cwd by default).
        warn: Log a warning when a literal secret stands in for an unset variable.

    Raises:
        ConfigurationError: For unknown keys, wrong types, missing secrets or
            references to undefined targets.
    """
    env = os.environ if env is None else env
    _check_keys(
        data,
        {"gateway", "security", "retry", "breaker", "dead_letters", "providers", "targets"},
        "top level",
    )
    gateway = _table(data, "gateway", "")
    _check_keys(gateway, _GATEWAY_KEYS, "gateway")
    try:
        security = WebhookSecurityPolicy(**_security_kwargs(_table(data, "security", "")))
    except TypeError as exc:
        raise ConfigurationError(f"[security]: {exc}") from exc
    retry = _retry(_table(data, "retry", ""))
    breaker = _table(data, "breaker", "")
    _check_keys(breaker, _BREAKER_KEYS, "breaker")
    dead_letters = _table(data, "dead_letters", "")
    _check_keys(dead_letters, _DEAD_LETTER_KEYS, "dead_letters")
    outbound_kwargs: dict[str, Any] = {}
    if "failure_threshold" in breaker:
        outbound_kwargs["breaker_failure_threshold"] = breaker["failure_threshold"]
    if "recovery_timeout_sec" in breaker:
        seconds = _duration("breaker", "recovery_timeout_sec", breaker["recovery_timeout_sec"])
        outbound_kwargs["breaker_recovery_timeout_sec"] = seconds
    if "retention_sec" in dead_letters:
        seconds = _duration("dead_letters", "retention_sec", dead_letters["retention_sec"])
        if seconds <= 0:
            raise ConfigurationError("[dead_letters] retention_sec must be > 0")
        outbound_kwargs["dead_letter_retention_sec"] = seconds

    targets: dict[str, TargetConfig] = {}
    for name, table in _table(data, "targets", "").items():
        where = f"targets.{name}"
        if not isinstance(table, dict):
            raise ConfigurationError(f"[{where}] must be a table")
        _check_keys(table, _TARGET_KEYS, where)
        if "url" not in table:
            raise ConfigurationError(f"[{where}] needs a url")
        secret = _secret_values(
            table, where, env, literal="signing_secret", env_key="signing_secret_env", warn=warn
        )
        if not secret and table.get("signing_secret_env"):
            # Named a signing secret: delivering unsigned instead would be a silent downgrade.
            raise ConfigurationError(_no_secret(where, table, "signing_secret_env"))
        with _section(where):
            targets[name] = TargetConfig(
                OutboundTarget(
                    name=name,
                    url=table["url"],
                    signing_secret=secret[0] if secret else None,
                    max_concurrency=table.get("max_concurrency", 16),
                )
            )

    providers: dict[str, ProviderConfig] = {}
    for name, table in _table(data, "providers", "").items():
        where = f"providers.{name}"
        if not isinstance(table, dict):
            raise ConfigurationError(f"[{where}] must be a table")
        _check_keys(table, _PROVIDER_KEYS, where)
        secrets = _secret_values(
            table, where, env, literal="secret", env_key="secret_env", warn=warn
        )
        if not secrets:
            raise ConfigurationError(_no_secret(where, table, "secret_env"))
        forward_to = table.get("forward_to")
        if forward_to is not None and forward_to not in targets:
            raise ConfigurationError(f"[{where}] forward_to names an unknown target {forward_to!r}")
        options = {k: v for k, v in table.items() if k in _PROFILE_KEYS}
        with _section(where):
            profile = ProviderProfile(name=name, secret_ref=name, **options)
        forward_format = table.get("forward_format", "envelope")
        if forward_format not in ("envelope", "raw"):
            raise ConfigurationError(f'[{where}] forward_format must be "envelope" or "raw"')
        if forward_format == "raw" and forward_to is None:
            raise ConfigurationError(f'[{where}] forward_format = "raw" needs forward_to')
        providers[name] = ProviderConfig(profile, secrets, forward_to, forward_format)

    token = None
    token_env = gateway.get("outbound_token_env")
    if token_env is not None:
        if not isinstance(token_env, str):
            raise ConfigurationError("[gateway] outbound_token_env must be a variable name")
        token = env.get(token_env) or None
    admin_token = None
    admin_env = gateway.get("admin_token_env")
    if admin_env is not None:
        if not isinstance(admin_env, str):
            raise ConfigurationError("[gateway] admin_token_env must be a variable name")
        admin_token = env.get(admin_env) or None
    password_env = gateway.get("store_password_env")
    if password_env is not None and not isinstance(password_env, str):
        raise ConfigurationError("[gateway] store_password_env must be a variable name")
    store_password = env.get(password_env) if password_env else None
    if password_env and store_password is None:
        raise ConfigurationError(
            f"[gateway] store_password_env: environment variable not set: {password_env}"
        )
    kwargs = {
        k: v
        for k, v in gateway.items()
        if k not in ("outbound_token_env", "admin_token_env", "store_password_env")
    }
    kwargs["admin_token"] = admin_token
    kwargs["store_password"] = store_password
    if isinstance(kwargs.get("trusted_proxies"), list):
        kwargs["trusted_proxies"] = tuple(kwargs["trusted_proxies"])
    config = GatewayConfig(
        **kwargs,
        outbound_token=token,
        security=security,
        retry=retry,
        **outbound_kwargs,
        providers=providers,
        targets=targets,
        base_dir=base_dir or Path.cwd(),
    )
    check_gateway_settings(config)
    return config


def _duration(section: str, key: str, value: Any) -> float:
    try:
        return parse_duration(value)
    except ConfigurationError as exc:
        raise ConfigurationError(f"[{section}] {key}: {exc}") from None


def _retry(table: dict[str, Any]) -> RetryStrategy:
    """The ``[retry]`` table: a delay schedule, or the exponential policy's keys."""
    exponential = set(table) & (_POLICY_KEYS - _SCHEDULE_KEYS)
    if exponential:
        _check_keys(table, _POLICY_KEYS, "retry")
        try:
            return WebhookRetryPolicy(**table)
        except (TypeError, ConfigurationError) as exc:
            raise ConfigurationError(f"[retry] {exc}") from None
    _check_keys(table, _SCHEDULE_KEYS, "retry")
    options = dict(table)
    if "schedule" in options:
        schedule = options.pop("schedule")
        if not isinstance(schedule, list) or not schedule:
            raise ConfigurationError(
                "[retry] schedule must be a non-empty list of waits, e.g. ['5s', '5m', '2h']"
            )
        options["delays_sec"] = tuple(_duration("retry", "schedule", d) for d in schedule)
    for key in ("request_timeout_sec", "lease_margin_sec"):
        if key in options:
            options[key] = _duration("retry", key, options[key])
    try:
        return RetrySchedule(**options)
    except ConfigurationError as exc:
        raise ConfigurationError(f"[retry] {exc}") from None


def _no_secret(where: str, table: Mapping[str, Any], env_key: str) -> str:
    """The error for a table whose secret is missing: names the section and variables."""
    literal = env_key.removesuffix("_env")
    names = table.get(env_key)
    names = [names] if isinstance(names, str) else list(names or ())
    if not names:
        return f'[{where}] has no secret: set {env_key} = "VARIABLE" (or {literal})'
    unset = " / ".join(names)
    plural = "s are" if len(names) > 1 else " is"
    return f"[{where}] has no secret: environment variable{plural} not set: {unset}"


@contextmanager
def _section(where: str) -> Iterator[None]:
    """Prefix a ConfigurationError raised inside with the ``[section]`` it comes from."""
    try:
        yield
    except ConfigurationError as exc:
        raise ConfigurationError(f"[{where}] {exc}") from exc
    except TypeError as exc:  # a value of the wrong type reached a constructor
        raise ConfigurationError(f"[{where}] {exc}") from exc


def _security_kwargs(table: dict[str, Any]) -> dict[str, Any]:
    out = dict(table)
    for key in ("allowed_content_types", "ip_allowlist"):
        if isinstance(out.get(key), list):
            out[key] = tuple(out[key])
    return out


def check_gateway_settings(config: GatewayConfig) -> None:
    """Validate the ``[gateway]`` settings of ``config``.

    Raises:
        ConfigurationError: For an invalid setting.
    """
    if not isinstance(config.bind, str) or not config.bind:
        raise ConfigurationError("[gateway] bind must be an address")
    port = config.port
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigurationError("[gateway] port must be 0-65535")
    kinds = "'memory', 'file:PATH', 'sqlite:PATH' or a redis:// or rediss:// URL"
    if not isinstance(config.store, str):
        raise ConfigurationError(f"[gateway] store must be {kinds}")
    kind, _, path = config.store.partition(":")
    redis_url = kind in _REDIS_SCHEMES and path.startswith("//") and len(path) > 2
    local = kind in ("memory", "file", "sqlite") and (kind == "memory" or bool(path))
    if not (redis_url or local):
        raise ConfigurationError(f"[gateway] store {masked_store(config.store)!r}: use {kinds}")
    if config.log_level not in ("critical", "error", "warning", "info", "debug"):
        raise ConfigurationError("[gateway] log_level must be critical/error/warning/info/debug")
    if not isinstance(config.log_events, bool):
        raise ConfigurationError("[gateway] log_events must be true or false")
    threshold = config.breaker_failure_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ConfigurationError("[breaker] failure_threshold must be an integer >= 1")

    if config.log_format not in ("text", "json"):
        raise ConfigurationError('[gateway] log_format must be "text" or "json"')
    if positive_float(config.event_retention_sec) is None:
        raise ConfigurationError("[gateway] event_retention_sec must be a positive number")
    count = config.event_log_max
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigurationError("[gateway] event_log_max must be an integer >= 1")
    if config.admin_token is not None and len(config.admin_token) < 16:
        raise ConfigurationError("[gateway] the admin token must have 16 characters or more")
    _check_server_limits(config)


def _check_server_limits(config: GatewayConfig) -> None:
    for name in ("header_timeout_sec", "body_timeout_sec"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
            raise ConfigurationError(f"[gateway] {name} must be a number of seconds, 0 < x <= 3600")
    for name, low, high in (
        ("keep_alive_timeout_sec", 1, 3600),
        ("max_connections", 1, 1_000_000),
        ("backlog", 1, 65535),
        ("max_header_bytes", 1024, 1_048_576),
    ):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigurationError(f"[gateway] {name} must be an integer from {low} to {high}")
    proxies = config.trusted_proxies
    if not isinstance(proxies, tuple) or not all(isinstance(p, str) for p in proxies):
        raise ConfigurationError("[gateway] trusted_proxies must be a list of addresses/networks")
    for entry in proxies:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError as exc:
            raise ConfigurationError(
                f"[gateway] trusted_proxies: {entry!r} is not an address or CIDR network"
            ) from exc
    if config.client_cert_header is not None and not proxies:
        raise ConfigurationError(
            "[gateway] client_cert_header is trusted only from trusted_proxies: list the "
            "addresses of the proxies that set it"
        )


def load_config(
    path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None, warn: bool = True
) -> GatewayConfig:
    """Read and validate a gateway TOML file (see :func:`parse_config`).

    Raises:
        ConfigurationError: If the file is missing, not TOML, or invalid.
    """
    location = Path(path)
    try:
        data = tomllib.loads(location.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read {location}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{location} is not valid TOML: {exc}") from exc
    return parse_config(data, env=env, warn=warn)


def masked_store(spec: str) -> str:
    """``spec`` with any password in a Redis URL replaced by ``***`` (for printing)."""
    return masked_url(spec)


def open_store(spec: str, base_dir: Path, *, password: str | None = None) -> Store:
    """Open the store a ``store = "..."`` setting names.

    Args:
        spec: ``memory``, ``file:PATH``, ``sqlite:PATH``, ``redis://...`` or ``rediss://...``.
        base_dir: Where relative paths start.
        password: The Redis password (from ``store_password_env``), put into the URL.

    Raises:
        ConfigurationError: For an unknown kind, a malformed Redis URL, or an SQLite
            path that is a directory or whose directory does not exist.
    """
    from converge.extensions.storage import FileStore, MemoryStore, SQLiteStore

    if spec.startswith(tuple(f"{scheme}://" for scheme in _REDIS_SCHEMES)):
        return _open_redis(spec, password)
    kind, _, path = spec.partition(":")
    if kind == "memory":
        # Serialized, so retained events are bytes the garbage collector never walks;
        # pickle, because it is several times faster than JSON and nobody else writes
        # this process's memory.
        return MemoryStore(serializer="pickle")
    location = Path(path).expanduser()
    if not location.is_absolute():
        location = base_dir / location
    if kind == "file":
        return FileStore(str(location), locking=True)
    if kind == "sqlite":
        # SQLite creates the file, not its directory: a path that cannot work is refused
        # here, not answered with a 503 per request and a warning per poll.
        if location.is_dir() or not location.parent.is_dir():
            problem = "is a directory" if location.is_dir() else "is in no existing directory"
            raise ConfigurationError(f"[gateway] store {spec!r}: {str(location)!r} {problem}")
        _check_database(spec, location)
        return SQLiteStore(location, serializer="json")
    raise ConfigurationError(f"unknown store kind {kind!r}")


def _check_database(spec: str, location: Path) -> None:
    """Refuse a file SQLite cannot read as a database (damaged, or not one at all):
    nothing but its owner can repair it, so serving would only answer 503s."""
    try:
        if location.stat().st_size == 0:
            return  # SQLite makes an empty file a database
        with closing(sqlite3.connect(f"{location.absolute().as_uri()}?mode=ro", uri=True)) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except OSError:
        return  # no file yet (or unreadable: the store says so)
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc) or "malformed" in str(exc):
            raise ConfigurationError(
                f"[gateway] store {spec!r}: {str(location)!r} is not a readable SQLite "
                f"database ({exc}); move it aside, or restore it from a backup"
            ) from None


def _open_redis(spec: str, password: str | None) -> Store:
    from converge.errors import UsageError
    from converge.extensions.storage import RedisStore

    try:
        check_redis_url(spec)
    except UsageError as exc:
        raise ConfigurationError(f"[gateway] store: {exc}") from None
    parts = urllib.parse.urlsplit(spec)
    if parts.password is not None:
        raise ConfigurationError(
            f"[gateway] store {masked_store(spec)}: put the password in an environment "
            "variable named by store_password_env, not in the file"
        )
    url = spec
    if password is not None:
        user = urllib.parse.quote(parts.username or "", safe="")
        secret = urllib.parse.quote(password, safe="")
        host = parts.netloc.rpartition("@")[2]  # keeps an IPv6 address's brackets, the port
        url = urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{secret}@{host}"))
    try:
        # JSON values: readable by every tool and by replicas of any version
        return RedisStore(url, serializer="json")
    except UsageError as exc:
        raise ConfigurationError(f"[gateway] store {masked_store(spec)}: {exc}") from None


def build_gateway(config: GatewayConfig, store: Store) -> WebhookGateway:
    """Build the connector and gateway a configuration describes."""
    connector = WebhookConnector(
        provider_profiles={name: p.profile for name, p in config.providers.items()},
        secrets={name: p.secrets for name, p in config.providers.items()},
        security_policy=config.security,
        retry_policy=config.retry,
        store=store,
        connector_id=config.connector_id,
        targets=[t.target for t in config.targets.values()],
        inbound_routes={n: p.forward_to for n, p in config.providers.items() if p.forward_to},
        forward_formats={n: p.forward_format for n, p in config.providers.items() if p.forward_to},
        max_in_flight=config.max_in_flight,
        breaker_failure_threshold=config.breaker_failure_threshold,
        breaker_recovery_timeout_sec=config.breaker_recovery_timeout_sec,
        dead_letter_ttl_sec=config.dead_letter_retention_sec,
        inbox_retention_sec=float(config.event_retention_sec),
    )
    return WebhookGateway(connector, outbound_token=config.outbound_token)

"""Settings: one frozen object built once at the edge from the environment.

This is the only module that reads `os.environ`. Every setting is declared in `SETTINGS`
with its default and help text; the README's settings table is checked against it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from dotenv import dotenv_values
from yarl import URL

from gateway.secret import Secret

LogFormat = Literal["json", "console"]
ConsoleSecureCookie = Literal["auto", "true", "false"]
SECRETS_FILE: Final = "secrets.env"


class SettingsError(Exception):
    """A bad setting. The message names the variable, never its value."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None
    help: str


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting(
        "DATABASE_URL",
        None,
        "PostgreSQL DSN. Unset: an embedded PostgreSQL is started under `WALLET_DATA_DIR`.",
    ),
    Setting(
        "REDIS_URL",
        None,
        "Redis URL (`redis://`, `rediss://`). Unset: an embedded Redis "
        "is started under `WALLET_DATA_DIR`.",
    ),
    Setting(
        "REDIS_CLUSTER",
        "false",
        "`REDIS_URL` names one node of a Redis Cluster: the apps discover the others and "
        "route every command by its key's slot.",
    ),
    Setting("HOST", "127.0.0.1", "Address both apps listen on."),
    Setting("GATEWAY_PORT", "6789", "Gateway (data plane) port."),
    Setting("ADMIN_PORT", "6790", "Admin API port."),
    Setting(
        "FORWARD_PROXY_PORT",
        "6791",
        "Forward-proxy port (`HTTPS_PROXY=http://wallet:TOKEN@HOST:6791`), served by "
        "`wallet gateway` and `wallet run`.",
    ),
    Setting(
        "UPSTREAM_CA_BUNDLE",
        "",
        "PEM file of CA certificates that upstream TLS certificates are verified against "
        "instead of the system trust store (for private upstreams and tests).",
    ),
    Setting(
        "WALLET_DATA_DIR",
        "./.wallet",
        "Folder for embedded servers' data and generated secrets (`secrets.env`, mode 0600).",
    ),
    Setting(
        "JWT_SECRET",
        None,
        "HS256 signing secret for admin sessions, at least 32 "
        "characters. Required unless the embedded servers are used (then generated).",
    ),
    Setting(
        "JWT_EXPIRES_IN", "1h", "Admin session lifetime: seconds or a number with `s`/`m`/`h`/`d`."
    ),
    Setting(
        "PUBLIC_GATEWAY_URL",
        "",
        "The gateway's address as applications reach it, used in the console's copy-ready "
        "snippets (empty: `http://HOST:GATEWAY_PORT`).",
    ),
    Setting(
        "CONSOLE_IDLE_TIMEOUT",
        "30m",
        "A web console session ends after this long without a request (a duration).",
    ),
    Setting(
        "CONSOLE_SESSION_LIFETIME",
        "12h",
        "A web console session ends this long after its login, busy or not (a duration).",
    ),
    Setting(
        "CONSOLE_SECURE_COOKIE",
        "auto",
        "Mark the console's session cookie `Secure`: `auto` (when the admin app is reached "
        "over TLS), `true` (always; behind a TLS-terminating proxy) or `false`.",
    ),
    Setting(
        "ENCRYPTION_KEY",
        None,
        "Master key sealing stored API keys: 32 bytes, raw or "
        "base64. Missing or wrong: the apps run sealed. Generated with the embedded servers.",
    ),
    Setting(
        "ENCRYPTION_KEY_PREVIOUS",
        "",
        "Comma-separated earlier master keys, still accepted "
        "for decryption during a rotation (see `wallet rotate-encryption-key`).",
    ),
    Setting(
        "WALLET_ADMIN_PASSWORD",
        None,
        "Password of the first admin (`admin`), used only "
        "when that user is created. Unset: generated and printed once.",
    ),
    Setting("ENABLE_METRICS", "true", "Serve `/monitoring/metrics` on both apps."),
    Setting(
        "ENABLE_RATE_LIMITING",
        "true",
        "Enforce client rate limits (login throttling is always on).",
    ),
    Setting(
        "RATE_LIMIT_TIERS",
        "free=600,pro=6000,admin=0",
        "Requests per minute per wallet token, by its owner's tier (`tier=N`, comma-separated; "
        "0: unlimited). A user's tier is set with `PUT /users/{id}`.",
    ),
    Setting(
        "QUOTAS_FAIL_OPEN",
        "false",
        "While Redis is unreachable, serve keys with a quota or concurrency cap without "
        "counting (`false`: 503 `redis_unavailable`, nothing spent blindly). Budgets always "
        "fail closed.",
    ),
    Setting(
        "RATE_LIMITS_FAIL_OPEN",
        "true",
        "While Redis is unreachable, serve requests without counting client rate limits "
        "(`false`: refuse them with 503). Budgets always fail closed.",
    ),
    Setting(
        "DEFAULT_FREE_QUOTA",
        "1000",
        "Quota of a free-tier key without `metadata.quota` "
        "(per its `quotaPeriod`, daily by default).",
    ),
    Setting(
        "ALLOW_INSECURE_UPSTREAMS",
        "false",
        "Accept plain `http://` service base URLs for hosts other than loopback.",
    ),
    Setting(
        "MAX_BODY_BYTES", "1048576", "Largest admin request body accepted (bytes); larger gets 413."
    ),
    Setting(
        "GATEWAY_MAX_BODY_BYTES",
        "104857600",
        "Largest request body the gateway forwards (bytes, counted as it streams); "
        "larger gets 413.",
    ),
    Setting("UPSTREAM_CONNECT_TIMEOUT", "10s", "Time to connect to an upstream (a duration)."),
    Setting(
        "UPSTREAM_READ_TIMEOUT",
        "300s",
        "Longest silence from an upstream, between bytes of a streamed answer included.",
    ),
    Setting("UPSTREAM_TOTAL_TIMEOUT", "1h", "Longest time one upstream exchange may take."),
    Setting("CLIENT_IDLE_TIMEOUT", "60s", "Longest silence from a client sending a request body."),
    Setting("LOG_LEVEL", "info", "`debug`, `info`, `warning` or `error`."),
    Setting("LOG_FORMAT", "json", "`json` (one object per line) or `console`."),
)

_DEFAULTS: Final = {s.name: s.default for s in SETTINGS}
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})
_DURATION: Final = re.compile(r"^(\d+)\s*([smhd]?)$")
_UNIT_S: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_TIER: Final = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Settings:
    database_url: Secret[str] | None
    redis_url: Secret[str] | None
    jwt_secret: Secret[str]
    encryption_key: Secret[bytes] | None
    encryption_keys_previous: tuple[Secret[bytes], ...] = ()
    host: str = "127.0.0.1"
    gateway_port: int = 6789
    admin_port: int = 6790
    forward_proxy_port: int = 6791
    upstream_ca_bundle: Path | None = None
    data_dir: Path = Path(".wallet")
    jwt_expires_in_s: int = 3600
    redis_cluster: bool = False
    public_gateway_url: str = ""
    console_idle_timeout_s: int = 1800
    console_session_lifetime_s: int = 43200
    console_secure_cookie: ConsoleSecureCookie = "auto"
    admin_password: Secret[str] | None = None
    enable_metrics: bool = True
    enable_rate_limiting: bool = True
    rate_limit_tiers: Mapping[str, int] = field(
        default_factory=lambda: {"free": 600, "pro": 6000, "admin": 0}
    )
    rate_limits_fail_open: bool = True
    quotas_fail_open: bool = False
    default_free_quota: int = 1000
    allow_insecure_upstreams: bool = False
    max_body_bytes: int = 1 << 20
    gateway_max_body_bytes: int = 100 << 20
    upstream_connect_timeout_s: int = 10
    upstream_read_timeout_s: int = 300
    upstream_total_timeout_s: int = 3600
    client_idle_timeout_s: int = 60
    log_level: str = "info"
    log_format: LogFormat = "json"
    embedded: bool = field(default=False, compare=False)

    @property
    def gateway_url(self) -> str:
        """Where applications reach the gateway (for snippets shown to users)."""
        return self.public_gateway_url or f"http://{self.host}:{self.gateway_port}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build and validate settings; raises SettingsError naming the first bad variable."""
        get = _Reader(env)
        jwt_secret = get.text("JWT_SECRET")
        if jwt_secret is None:
            raise SettingsError("JWT_SECRET is required (at least 32 characters)")
        if len(jwt_secret) < 32:
            raise SettingsError("JWT_SECRET must be at least 32 characters")
        log_format = get.choice("LOG_FORMAT", ("json", "console"))
        if get.boolean("REDIS_CLUSTER") and get.text("REDIS_URL") is None:
            raise SettingsError("REDIS_CLUSTER needs REDIS_URL naming a node of the cluster")
        admin_password = get.text("WALLET_ADMIN_PASSWORD")
        if admin_password is not None and len(admin_password) < 12:
            raise SettingsError("WALLET_ADMIN_PASSWORD must be at least 12 characters")
        return cls(
            database_url=get.url("DATABASE_URL", ("postgres", "postgresql")),
            redis_url=get.url("REDIS_URL", ("redis", "rediss", "unix")),
            jwt_secret=Secret(jwt_secret),
            encryption_key=get.master_key("ENCRYPTION_KEY"),
            encryption_keys_previous=get.master_keys("ENCRYPTION_KEY_PREVIOUS"),
            host=get.text("HOST") or "127.0.0.1",
            gateway_port=get.port("GATEWAY_PORT"),
            admin_port=get.port("ADMIN_PORT"),
            forward_proxy_port=get.port("FORWARD_PROXY_PORT"),
            upstream_ca_bundle=get.file("UPSTREAM_CA_BUNDLE"),
            data_dir=Path(get.text("WALLET_DATA_DIR") or ".wallet"),
            jwt_expires_in_s=get.duration("JWT_EXPIRES_IN"),
            redis_cluster=get.boolean("REDIS_CLUSTER"),
            public_gateway_url=get.public_url("PUBLIC_GATEWAY_URL"),
            console_idle_timeout_s=get.duration("CONSOLE_IDLE_TIMEOUT"),
            console_session_lifetime_s=get.duration("CONSOLE_SESSION_LIFETIME"),
            console_secure_cookie=get.console_secure_cookie("CONSOLE_SECURE_COOKIE"),
            admin_password=_secret_or_none(admin_password),
            enable_metrics=get.boolean("ENABLE_METRICS"),
            enable_rate_limiting=get.boolean("ENABLE_RATE_LIMITING"),
            rate_limit_tiers=get.tiers("RATE_LIMIT_TIERS"),
            rate_limits_fail_open=get.boolean("RATE_LIMITS_FAIL_OPEN"),
            quotas_fail_open=get.boolean("QUOTAS_FAIL_OPEN"),
            default_free_quota=get.integer("DEFAULT_FREE_QUOTA", minimum=0),
            allow_insecure_upstreams=get.boolean("ALLOW_INSECURE_UPSTREAMS"),
            max_body_bytes=get.integer("MAX_BODY_BYTES", minimum=1024),
            gateway_max_body_bytes=get.integer("GATEWAY_MAX_BODY_BYTES", minimum=1024),
            upstream_connect_timeout_s=get.duration("UPSTREAM_CONNECT_TIMEOUT"),
            upstream_read_timeout_s=get.duration("UPSTREAM_READ_TIMEOUT"),
            upstream_total_timeout_s=get.duration("UPSTREAM_TOTAL_TIMEOUT"),
            client_idle_timeout_s=get.duration("CLIENT_IDLE_TIMEOUT"),
            log_level=get.choice("LOG_LEVEL", _LOG_LEVELS),
            log_format="console" if log_format == "console" else "json",
        )


def _secret_or_none(value: str | None) -> Secret[str] | None:
    return Secret(value) if value else None


class _Reader:
    """Typed access to raw variables; every error names the variable, never the value."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str) -> str | None:
        value = self._env.get(name)
        if value is None or value.strip() == "":
            return _DEFAULTS[name]
        return value.strip()

    def _required(self, name: str) -> str:
        value = self.text(name)
        if value is None:
            raise SettingsError(f"{name} is required")
        return value

    def boolean(self, name: str) -> bool:
        value = self._required(name).lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise SettingsError(f"{name} must be one of true/false/1/0/yes/no")

    def integer(self, name: str, minimum: int) -> int:
        value = self._required(name)
        if not value.isdigit() or int(value) < minimum:
            raise SettingsError(f"{name} must be a whole number of at least {minimum}")
        return int(value)

    def port(self, name: str) -> int:
        value = self._required(name)
        if not value.isdigit() or not 0 <= int(value) <= 65535:
            raise SettingsError(f"{name} must be a port number (0-65535)")
        return int(value)

    def duration(self, name: str) -> int:
        match = _DURATION.match(self._required(name).lower())
        if match is None or int(match[1]) == 0:
            raise SettingsError(f"{name} must be a positive duration like 3600, 15m, 1h or 7d")
        return int(match[1]) * _UNIT_S[match[2]]

    def file(self, name: str) -> Path | None:
        value = self.text(name)
        if not value:
            return None
        path = Path(value)
        if not path.is_file():
            raise SettingsError(f"{name} must name a readable file")
        return path

    def tiers(self, name: str) -> dict[str, int]:
        """`free=600,pro=6000,admin=0`: requests per minute by tier name (0: unlimited)."""
        tiers: dict[str, int] = {}
        for part in self._required(name).split(","):
            tier, sep, limit = part.strip().partition("=")
            tier, limit = tier.strip().lower(), limit.strip()
            if not sep or not _TIER.match(tier) or not limit.isdigit() or tier in tiers:
                raise SettingsError(
                    f"{name} must be comma-separated tier=requests_per_minute pairs, "
                    "e.g. free=600,pro=6000,admin=0"
                )
            tiers[tier] = int(limit)
        return tiers

    def choice(self, name: str, allowed: tuple[str, ...]) -> str:
        value = self._required(name).lower()
        if value not in allowed:
            raise SettingsError(f"{name} must be one of {', '.join(allowed)}")
        return value

    def public_url(self, name: str) -> str:
        value = self.text(name)
        if not value:
            return ""
        try:
            parsed = URL(value)
        except (ValueError, TypeError):
            raise SettingsError(f"{name} must be an http(s) URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.host or parsed.query_string:
            raise SettingsError(f"{name} must be an http(s) URL without a query")
        return value.rstrip("/")

    def console_secure_cookie(self, name: str) -> ConsoleSecureCookie:
        value = self.choice(name, ("auto", "true", "false", "1", "0", "yes", "no"))
        if value == "auto":
            return "auto"
        return "true" if value in _TRUE else "false"

    def url(self, name: str, schemes: tuple[str, ...]) -> Secret[str] | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            parsed = URL(value)
        except (ValueError, TypeError):
            raise SettingsError(f"{name} is not a valid URL") from None
        if parsed.scheme not in schemes:
            raise SettingsError(f"{name} must be a URL with scheme {' or '.join(schemes)}")
        if parsed.scheme != "unix" and not parsed.host:
            raise SettingsError(f"{name} must name a host")
        return Secret(value)

    def master_key(self, name: str) -> Secret[bytes] | None:
        value = self.text(name)
        return None if value is None else Secret(parse_master_key(name, value))

    def master_keys(self, name: str) -> tuple[Secret[bytes], ...]:
        value = self.text(name) or ""
        parts = [p.strip() for p in value.split(",") if p.strip()]
        return tuple(Secret(parse_master_key(name, p)) for p in parts)


def parse_master_key(name: str, value: str) -> bytes:
    """A master key is 32 bytes given raw or base64 (standard or URL-safe)."""
    raw = value.encode()
    if len(raw) == 32:
        return raw
    try:
        decoded = base64.b64decode(
            value + "=" * (-len(value) % 4),
            altchars=b"-_" if ("-" in value or "_" in value) else None,
            validate=True,
        )
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 32:
        raise SettingsError(f"{name} must be 32 bytes, raw or base64-encoded")
    return decoded


def read_environment(dotenv_path: Path = Path(".env")) -> dict[str, str]:
    """The process environment layered over an optional `.env` file (environment wins)."""
    merged = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
    merged.update(os.environ)
    return merged


def read_secrets_file(data_dir: Path) -> dict[str, str]:
    """Secrets generated by an earlier zero-config run (`WALLET_DATA_DIR/secrets.env`)."""
    path = data_dir / SECRETS_FILE
    if not path.exists():
        return {}
    return {k: v for k, v in dotenv_values(path).items() if v is not None}

"""Structured logging (structlog) with redaction by field name, by value and by key format."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Final

import structlog
from yarl import URL

from gateway.secret import Secret

REDACTED: Final = "[redacted]"
SECRET_FIELDS: Final = frozenset(
    {
        "password",
        "token",
        "key",
        "secret",
        "authorization",
        "api_key",
        "apikey",
        "appid",
        "dsn",
        "cookie",
        "jwt",
        "proxy-authorization",
        "x-wallet-token",
        "x-api-key",
    }
)
# Formats of credentials that must never reach a log line even when nobody registered them.
SECRET_PATTERNS: Final = re.compile(
    r"AIza[0-9A-Za-z_-]{20,}|sk[-_](?:proj-|live_|test_)?[0-9A-Za-z_-]{12,}"
    r"|rk_(?:live|test)_[0-9A-Za-z]{10,}|eyJ[0-9A-Za-z_-]{8,}\.[0-9A-Za-z_-]{8,}\.[0-9A-Za-z_-]+"
    r"|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"
)
QUERY_SECRETS: Final = frozenset(
    {"key", "appid", "api_key", "apikey", "token", "access_token", "password", "secret"}
)


class Redactor:
    """A structlog processor. Known secret values are added as they become known."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add(self, *secrets: Secret[str] | Secret[bytes] | None) -> None:
        for secret in secrets:
            if secret is None:
                continue
            raw = secret.reveal()
            text = raw.decode(errors="ignore") if isinstance(raw, bytes) else raw
            if len(text) >= 6:
                self._values.add(text)

    def scrub(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return SECRET_PATTERNS.sub(REDACTED, text)

    def _clean(self, name: str, value: Any) -> Any:
        if name.lower() in SECRET_FIELDS:
            return REDACTED
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(name, v) for v in value]
        return value

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for name in list(event):
            event[name] = self._clean(name, event[name])
        return event


def redact_url(url: URL) -> str:
    """Path and query for access logs, with credential-carrying parameters blanked."""
    if not url.query:
        return url.raw_path
    query = [(k, REDACTED if k.lower() in QUERY_SECRETS else v) for k, v in url.query.items()]
    return str(URL.build(path=url.raw_path, encoded=True).with_query(query))


def configure(level: str, fmt: str, redactor: Redactor, stream: Any = None) -> None:
    """Configure structlog and route stdlib logging (aiohttp, asyncpg) through it."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: Iterable[Any] = (
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redactor,
    )
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=list(shared),
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

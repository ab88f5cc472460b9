"""Structured logging (structlog) with redaction by field name, by value and by key format."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from datetime import UTC, datetime
from typing import Any, Final

import structlog
from yarl import URL

from gateway.secret import Secret

REDACTED: Final = "[redacted]"
BATCH_S: Final = 0.1
BATCH_LINES: Final = 256
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


class AccessLog:
    """The one line per request, in the same shape as every other event. It is the only log
    call on the hot path, and structlog's general chain (every field redacted, timestamped,
    rendered, then two writes) costs more than a short proxied request itself. Here the path
    and method are redacted like any value, and on the process's stderr the lines are
    batched: written together within BATCH_S, or at once when BATCH_LINES are waiting, and
    flushed at exit."""

    def __init__(
        self, stream: Any, fmt: str, enabled: bool, redactor: Redactor, batch: bool
    ) -> None:
        self._stream = stream
        self._json = fmt == "json"
        self.enabled = enabled
        self._redactor = redactor
        self._batch = batch
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, method: str, path: str, status: int, ms: float, request_id: str) -> None:
        if not self.enabled:
            return
        scrub = self._redactor.scrub
        method, path = scrub(method), scrub(path)
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        if self._json:  # the shape JSONRenderer gives, built directly (it is 5x faster)
            line = (
                f'{{"method": {json.dumps(method)}, "path": {json.dumps(path)}, '
                f'"status": {status}, "ms": {ms}, "request_id": "{request_id}", '
                f'"event": "request", "level": "info", "timestamp": "{now}"}}'
            )
        else:
            line = (
                f"{now} [info     ] request                        method={method} "
                f"ms={ms} path={path} request_id={request_id} status={status}"
            )
        self._pending.append(line + "\n")
        if not self._batch or len(self._pending) >= BATCH_LINES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
            else:
                self._timer = loop.call_later(BATCH_S, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            lines, self._pending = self._pending, []
            self._stream.write("".join(lines))
            self._stream.flush()


access = AccessLog(sys.stderr, "json", True, Redactor(), batch=False)
atexit.register(lambda: access.flush())


def configure(level: str, fmt: str, redactor: Redactor, stream: Any = None) -> None:
    """Configure structlog and route stdlib logging (aiohttp, asyncpg) through it."""
    global access
    access.flush()
    access = AccessLog(
        stream or sys.stderr,
        fmt,
        logging.getLevelNamesMapping()[level.upper()] <= logging.INFO,
        redactor,
        batch=stream is None,
    )
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

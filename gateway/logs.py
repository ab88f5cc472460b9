"""Structured logging (structlog) with redaction by field name, by value and by key format."""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import sys
import time
from collections.abc import Iterable, MutableMapping
from json.encoder import encode_basestring_ascii
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
# Every name in QUERY_SECRETS contains one of these.
_SECRET_NAME_PARTS: Final = ("key", "appid", "token", "password", "secret")
# A query whose every parameter is `name=value` in characters that yarl leaves as they are
# (see `redact_url`), and where no secret parameter name appears at all, not even inside
# another word: logged as it came.
_PLAIN_QUERY: Final = re.compile(
    r"[!$'()*+,\-./0-9:?@A-Z_a-z~]*=[!$'()*+,\-./0-9:?@A-Z_a-z~]*"
    r"(?:&[!$'()*+,\-./0-9:?@A-Z_a-z~]*=[!$'()*+,\-./0-9:?@A-Z_a-z~]*)*"
)
# Methods an access log line usually shows; their scrubbed forms are worked out once.
METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


class Redactor:
    """A structlog processor. Known secret values are added as they become known."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._methods = {method: method for method in METHODS}

    def add(self, *secrets: Secret[str] | Secret[bytes] | None) -> None:
        for secret in secrets:
            if secret is None:
                continue
            raw = secret.reveal()
            text = raw.decode(errors="ignore") if isinstance(raw, bytes) else raw
            if len(text) >= 6:
                self._values.add(text)
        self._methods = {method: self.scrub(method) for method in METHODS}

    def scrub(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        # SECRET_PATTERNS (case-sensitive) cannot match without one of these literals: most
        # text has none, and looking for them is much cheaper than the pattern's search.
        if (
            "AIza" in text
            or "sk-" in text
            or "sk_" in text
            or "rk_" in text
            or "eyJ" in text
            or "://" in text
        ):
            return SECRET_PATTERNS.sub(REDACTED, text)
        return text

    def scrub_method(self, method: str) -> str:
        """`scrub(method)`, looked up for the usual methods."""
        scrubbed = self._methods.get(method)
        return self.scrub(method) if scrubbed is None else scrubbed

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
    """Path and query for access logs, with credential-carrying parameters blanked. The
    query is parsed and written again by yarl, unless that would give it back unchanged with
    nothing to blank (`_PLAIN_QUERY`, no secret name in it)."""
    raw = url.raw_query_string
    if not raw:
        return url.raw_path
    lowered = raw.lower()
    if _PLAIN_QUERY.fullmatch(raw) and not any(part in lowered for part in _SECRET_NAME_PARTS):
        return f"{url.raw_path}?{raw}"
    if not url.query:
        return url.raw_path
    query = [(k, REDACTED if k.lower() in QUERY_SECRETS else v) for k, v in url.query.items()]
    return str(URL.build(path=url.raw_path, encoded=True).with_query(query))


class _Clock:
    """UTC timestamps as `datetime.now(UTC).isoformat()` writes them, with a `Z`: the date
    and time of day are formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        micros = nanos // 1000
        return f"{self._prefix}.{micros:06d}Z" if micros else f"{self._prefix}Z"


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
        self._clock = _Clock()

    def __call__(self, method: str, path: str, status: int, ms: float, request_id: str) -> None:
        if not self.enabled:
            return
        method = self._redactor.scrub_method(method)
        path = self._redactor.scrub(path)
        now = self._clock.now()
        if self._json:  # the shape JSONRenderer gives, built directly (it is 5x faster)
            # encode_basestring_ascii: what json.dumps does with a str, without its checks.
            line = (
                f'{{"method": {encode_basestring_ascii(method)}, '
                f'"path": {encode_basestring_ascii(path)}, '
                f'"status": {status}, "ms": {ms}, "request_id": "{request_id}", '
                f'"event": "request", "level": "info", "timestamp": "{now}"}}\n'
            )
        else:
            line = (
                f"{now} [info     ] request                        method={method} "
                f"ms={ms} path={path} request_id={request_id} status={status}\n"
            )
        self._pending.append(line)
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

"""The hot path's shortcuts give what the general code gives: each cheap path is checked
against the general one (or the code it replaced) on crafted and generated inputs, and the
usage writer's text COPY against PostgreSQL."""

from __future__ import annotations

import io
import json
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from aioprometheus.collectors import Counter, Histogram, Registry
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway import inject, logs, routing
from gateway.appkeys import POOL
from gateway.metrics import BufferedCounter, BufferedHistogram, status_class
from gateway.secret import Secret
from gateway.usage import UsageRecord, UsageWriter, encode
from tests.conftest import Servers

SEED = 20261126


def outcome(check: Any, raw: str) -> str:
    try:
        return "ok:" + check(raw)
    except routing.BadPath:
        return "refused"


def paths(rng: random.Random, count: int) -> list[str]:
    pieces = ["/", "/", "a", "v1", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%00", "%41",
              "\\", "\x00", "\x1f", "\x7f", "é", "\u200b", " ", "~", "-", "_", ":", "@",
              "//"]  # fmt: skip
    out = []
    for _ in range(count):
        out.append("".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))))
    return out


CRAFTED_PATHS = ["", "/", "/v1/chat/completions", "/data/2.5/weather", "/a/.", "/a/..", "/./a",
                 "/../a", ".", "..", "./a", "//evil", "/a//b", "/a/.b", "/a/b.", "/a\\b",
                 "/a%2e%2e/b", "/a/%2e%2e/b", "/a%2f..%2fb", "/a/\x00", "/a\tb", "/é/ü",
                 "/a/..%2f", "/%2E./a", "/a/.well-known/x"]  # fmt: skip


def test_the_path_shortcut_agrees_with_the_full_check() -> None:
    rng = random.Random(SEED)
    refused = 0
    for raw in CRAFTED_PATHS + paths(rng, 20_000):
        expected = outcome(routing._check_all, raw)
        assert outcome(routing.check_path, raw) == expected, repr(raw)
        refused += expected == "refused"
    assert refused > 1000  # the corpus does exercise the refusals


def redact_url_before(url: URL) -> str:
    """The access log's query redaction as it was, always through yarl."""
    if not url.query:
        return url.raw_path
    query = [
        (k, logs.REDACTED if k.lower() in logs.QUERY_SECRETS else v) for k, v in url.query.items()
    ]
    return str(URL.build(path=url.raw_path, encoded=True).with_query(query))


def queries(rng: random.Random, count: int) -> list[str]:
    pieces = ["=", "=", "&", "&", ";", "+", "%20", "%3D", "%26", "%6Bey", "%", "a", "b", "q",
              "key", "KEY", "appid", "api_key", "Token", "password", "secret", "monkey", "x1",
              "AIzaWT_abcdefghijklmnopqrstuvwxyz", "?", "/", ":", "@", "!", "$", "'", "(", ")",
              "*", ",", "-", ".", "_", "~", "\"", "<", ">", "{", "}", "|", "^", "`", "[", "]",
              "é", " "]  # fmt: skip
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 10))) for _ in range(count)]


CRAFTED_QUERIES = ["q=London", "q=London&units=metric", "appid=AIzaWT_x", "q=a&key=AIzaWT_x",
                   "a", "a=", "=a", "=", "a&&b", "&a", "a=1&a=2", "a==b", "a=b;key=c",
                   "KeY=1", "x=key", "%6Bey=s", "q=a+b", "q=a%20b", "q=ü"]  # fmt: skip


def test_the_access_log_query_shortcut_agrees_with_yarl() -> None:
    rng = random.Random(SEED)
    shortcut = 0
    for query in CRAFTED_QUERIES + queries(rng, 20_000):
        url = URL.build(path="/svc/v1/x", query_string=query, encoded=True)
        expected = redact_url_before(url)
        assert logs.redact_url(url) == expected, repr(query)
        shortcut += expected == f"/svc/v1/x?{query}"
    assert shortcut > 100  # and the shortcut is taken


def scrub_before(values: set[str], text: str) -> str:
    for value in values:
        if value in text:
            text = text.replace(value, logs.REDACTED)
    return logs.SECRET_PATTERNS.sub(logs.REDACTED, text)


def test_scrubbing_finds_what_the_patterns_find() -> None:
    rng = random.Random(SEED)
    pieces = ["AIza", "AIzaSyA1234567890abcdefghijklmno", "sk-", "sk_", "sk-proj-abcdefghijkl12",
              "sk_live_0123456789abcdef", "rk_", "rk_test_0123456789ab", "eyJ", "eyJabcdefgh.",
              "ijklmnop.q", "://", "https://user:pass@host", "pw@", ":", "/", "a", "task",
              "the-registered-secret", " "]  # fmt: skip
    redactor = logs.Redactor()
    redactor.add(Secret("the-registered-secret"))
    hits = 0
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        expected = scrub_before({"the-registered-secret"}, text)
        assert redactor.scrub(text) == expected, repr(text)
        hits += expected != text
    assert hits > 1000


def test_a_method_that_is_a_secret_is_redacted_like_any_value() -> None:
    out = io.StringIO()
    redactor = logs.Redactor()
    access = logs.AccessLog(out, "json", True, redactor, batch=False)
    access("DELETE", "/svc/a?key=[redacted]", 200, 1.5, "rid")
    redactor.add(Secret("DELETE"))  # absurd, but a secret is a secret
    access("DELETE", "/svc/a", 200, 1.5, "rid")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["method"] == "DELETE"
    assert second["method"] == logs.REDACTED
    assert first["path"] == "/svc/a?key=[redacted]"
    assert {k for k in first if k != "timestamp"} == {
        "method", "path", "status", "ms", "request_id", "event", "level"
    }  # fmt: skip
    when = datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - when) < timedelta(minutes=1)


def test_access_log_lines_are_json_whatever_the_path_holds() -> None:
    out = io.StringIO()
    access = logs.AccessLog(out, "json", True, logs.Redactor(), batch=False)
    path = '/svc/"quoted"\\back\x01slash/é?x=sk-proj-abcdefghijklmnop'
    access("GET", path, 404, 0.25, "rid")
    line = json.loads(out.getvalue())
    assert line["path"] == '/svc/"quoted"\\back\x01slash/é?x=' + logs.REDACTED


def test_buffered_collectors_count_what_aioprometheus_counts() -> None:
    rng = random.Random(SEED)
    buckets = (0.001, 0.005, 0.01, 0.1, 1.0)
    mine, theirs = Registry(), Registry()
    fast = BufferedHistogram("h", "doc", registry=mine, label_names=("service",), buckets=buckets)
    slow = Histogram("h", "doc", registry=theirs, buckets=buckets)  # one observation at a time
    fast_counter = BufferedCounter("c", "doc", registry=mine, label_names=("route", "status"))
    slow_counter = Counter("c", "doc", registry=theirs)
    for i in range(2500):  # past BACKLOG_LIMIT: applied in several batches
        name = rng.choice("ab")
        value = rng.choice([0.0, 0.001, 0.005, 2.0, rng.random() / 10])
        fast.record((name,), value)
        slow.observe({"service": name}, value)
        status = status_class(rng.choice([200, 204, 404, 502]))
        fast_counter.tally((name, status))
        slow_counter.inc({"route": name, "status": status})
        if i == 1234:
            fast.get_all()  # a scrape in between
            fast_counter.get_all()
    assert sorted(fast.get_all(), key=str) == sorted(slow.get_all(), key=str)
    assert sorted(fast_counter.get_all(), key=str) == sorted(slow_counter.get_all(), key=str)
    assert len(slow.get_all()) == 2
    assert [status_class(s) for s in (101, 200, 399, 404, 599, 1000)] == [
        "1xx", "2xx", "3xx", "4xx", "5xx", "10xx"
    ]  # fmt: skip


def response_headers_before(
    upstream: CIMultiDictProxy[str], forms: tuple[str, ...]
) -> CIMultiDict[str]:
    lowered = tuple(form.lower() for form in forms)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name.lower() in inject.RESPONSE_DROP or any(form in name.lower() for form in lowered):
            continue
        out.add(name, inject.redact(value, forms))
    return out


@pytest.mark.parametrize("secret", ["sk-Ab", "sk-live/Secret+Key=0123456789", "k" * 60])
def test_response_headers_scrub_as_before(secret: str) -> None:
    rng = random.Random(SEED)
    forms = inject.key_forms(secret)
    pieces = [*forms, secret.lower(), "x-", "Date", "a", " ", "=", "/", "Content-Length"]
    for _ in range(3000):
        headers: CIMultiDict[str] = CIMultiDict()
        for _ in range(rng.randint(0, 6)):
            name = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 3)))
            headers.add(name, "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4))))
        proxy = CIMultiDictProxy(headers)
        expected = list(response_headers_before(proxy, forms).items())
        assert list(inject.response_headers(proxy, forms).items()) == expected
    assert list(inject.response_headers(CIMultiDictProxy(CIMultiDict(a="b")), ()).items()) == [
        ("a", "b")
    ]


def test_usage_rows_encode_as_copy_text() -> None:
    at = datetime(2026, 11, 26, 3, 4, 5, 60, tzinfo=UTC)
    row = (
        (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1),
        "a\tb\\c\nd\re",
        None,
        "t",
        None,
        200,
        12.34567,
        1,
        2,
        Decimal("1E-9"),
        3,
        "forward",
    )
    assert encode([row]) == (
        b"2026-11-26 03:04:05.000060+00\ta\\tb\\\\c\\nd\\re\t\\N\tt\t\\N\t"
        b"200\t12.346\t1\t2\t1E-9\t3\tforward\n"
    )
    assert encode([]) == b""


async def test_usage_records_come_back_from_postgresql_as_written(
    gateway_client: TestClient[Any, Any], servers: Servers
) -> None:
    writer = UsageWriter(gateway_client.app[POOL])
    key_id = "0b5e8f0e-4f3c-4a43-9d4b-9b1c3a6f0a11"
    aware = datetime(2026, 11, 26, 23, 59, 59, 999999, tzinfo=UTC)
    naive = datetime(2026, 11, 27, 0, 0, 0, 1)  # local time, as asyncpg would read it
    service = "svc\t\\odd\nname-hotpath"
    records = [
        UsageRecord(aware, service, key_id, None, None, 200, 12.3456, 10, 20, Decimal("0.25"), 1),
        UsageRecord(naive, service, None, None, None, 503, 0.0, 0, 0, Decimal("1E-9"), 0),
    ]
    for record in records:
        writer.add(record)
    writer.take(service, key_id, None, None, 404, 7.0, 5, 6, Decimal(0), 2, "forward")
    await writer.flush()
    assert (writer.written, writer.buffered) == (3, 0)
    conn = await asyncpg.connect(servers.database_url.reveal())
    try:
        got = await conn.fetch(
            "SELECT * FROM usage_records WHERE service = $1 ORDER BY id", service
        )
        hourly = await conn.fetch(
            "SELECT hour, requests, errors, fallbacks, cost FROM usage_hourly"
            " WHERE service = $1 ORDER BY hour",
            service,
        )
    finally:
        await conn.close()
    assert [r["at"] for r in got[:2]] == [aware, naive.astimezone(UTC)]
    assert abs(got[2]["at"] - datetime.now(UTC)) < timedelta(minutes=1)
    assert [str(r["key_id"]) if r["key_id"] else None for r in got] == [key_id, None, key_id]
    assert [r["status"] for r in got] == [200, 503, 404]
    assert [round(r["latency_ms"], 3) for r in got] == [12.346, 0.0, 7.0]
    assert [(r["bytes_in"], r["bytes_out"], r["fallbacks"]) for r in got] == [
        (10, 20, 1), (0, 0, 0), (5, 6, 2)
    ]  # fmt: skip
    assert [r["cost"] for r in got] == [Decimal("0.25"), Decimal("1E-9"), Decimal(0)]
    assert [r["mode"] for r in got] == ["reverse", "reverse", "forward"]
    assert sum(r["requests"] for r in hourly) == 3
    assert sum(r["errors"] for r in hourly) == 2
    assert aware.replace(minute=0, second=0, microsecond=0) in {r["hour"] for r in hourly}

"""The upstream client: one pooled session, timeouts, and translation of its failures.

Client errors are translated here into 502/504 with messages built from the service slug
and the error's type only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Final

import aiohttp
from aiohttp import web

from gateway.appkeys import SETTINGS
from gateway.errors import UpstreamTimeout, UpstreamUnavailable

SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)
CONNECTION_LIMIT: Final = 1000


def timeout_for(app: web.Application) -> aiohttp.ClientTimeout:
    s = app[SETTINGS]
    return aiohttp.ClientTimeout(
        total=s.upstream_total_timeout_s,
        sock_connect=s.upstream_connect_timeout_s,
        sock_read=s.upstream_read_timeout_s,
    )


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(
        limit=CONNECTION_LIMIT, ttl_dns_cache=300, enable_cleanup_closed=True
    )
    app[SESSION] = session = aiohttp.ClientSession(
        connector=connector,
        timeout=timeout_for(app),
        auto_decompress=True,
        # Never read proxy settings or .netrc from the environment: a key goes only to the
        # service's own host.
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    yield
    await session.close()


@contextmanager
def upstream_errors(service: str) -> Iterator[None]:
    # Not chained (`from None`): aiohttp's messages can carry the URL, and a query-string key
    # with it, into tracebacks and logs. The type is enough to diagnose.
    try:
        yield
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise UpstreamTimeout(f"{service} did not answer in time") from None
    except aiohttp.ClientPayloadError:
        raise UpstreamUnavailable(f"{service} sent a broken response") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnavailable(f"cannot reach {service} ({type(exc).__name__})") from None

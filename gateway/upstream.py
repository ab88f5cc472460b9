"""The upstream client: one pooled session, timeouts, and translation of its failures.

Client errors are translated here into 502/504 with messages built from the service slug
and the error's type only.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import aiohttp
from aiohttp import web

from gateway.appkeys import SETTINGS
from gateway.errors import BadRequest, UpstreamTimeout, UpstreamUnavailable
from gateway.hothttp import (
    HotHTTP,
    UpstreamBrokenError,
    UpstreamError,
    UpstreamRequestError,
    UpstreamTimeoutError,
)

CLIENT = web.AppKey("upstream_client", HotHTTP)
CONNECTION_LIMIT: Final = 1000


def tls_context(bundle: Path | None) -> ssl.SSLContext:
    """Upstream certificates are verified (hostname included) against the system trust
    store, or UPSTREAM_CA_BUNDLE's certificates instead."""
    return ssl.create_default_context(cafile=str(bundle) if bundle else None)


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    """The pooled upstream client (gateway/hothttp.py): keep-alive, timeouts, TLS verified,
    gzip/deflate decoded (echoes of the key are scrubbed from decoded bytes), no proxies
    from the environment, no cookies, no redirects followed."""
    s = app[SETTINGS]
    app[CLIENT] = client = HotHTTP(
        s.upstream_connect_timeout_s,
        s.upstream_read_timeout_s,
        s.upstream_total_timeout_s,
        limit_per_host=CONNECTION_LIMIT,
        ssl_context=tls_context(s.upstream_ca_bundle),
    )
    yield
    await client.close()


@contextmanager
def upstream_errors(service: str) -> Iterator[None]:
    # Not chained (`from None`): aiohttp's messages can carry the URL, and a query-string key
    # with it, into tracebacks and logs. The type is enough to diagnose.
    try:
        yield
    except (TimeoutError, aiohttp.ServerTimeoutError, UpstreamTimeoutError):
        raise UpstreamTimeout(f"{service} did not answer in time") from None
    except UpstreamRequestError:  # the client's header would not be valid HTTP upstream
        raise BadRequest("a header name or value is not valid HTTP") from None
    except UpstreamBrokenError:
        raise UpstreamUnavailable(f"{service} sent a broken response") from None
    except UpstreamError as exc:
        raise UpstreamUnavailable(f"cannot reach {service} ({type(exc).__name__})") from None
    except aiohttp.ClientPayloadError:
        raise UpstreamUnavailable(f"{service} sent a broken response") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamUnavailable(f"cannot reach {service} ({type(exc).__name__})") from None

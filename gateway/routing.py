"""Route matching (pure): which service a request is for, and the upstream URL it goes to.

The upstream URL is built from the service's configured scheme, host and port and nothing
the client sent, so no path, query, Host header or absolute-form target can move a key to
another host. Paths that try to climb out of the service's base path are refused.
"""

from __future__ import annotations

import functools
import re
from typing import Final, NamedTuple
from urllib.parse import unquote

from yarl import URL

from gateway.errors import BadRequest

# A dot segment in any spelling (`.`, `..`, `%2e`, `%2E.`), between slashes or at the ends.
_DOT_SEGMENT: Final = re.compile(r"(^|/)(\.|%2e){1,2}(/|$)", re.IGNORECASE)
_FORBIDDEN: Final = re.compile(r"[\\\x00-\x1f\x7f]|%5c|%00", re.IGNORECASE)


class BadPath(BadRequest):
    code = "bad_path"


class Target(NamedTuple):
    """A request's service slug and the raw (still percent-encoded) path after it."""

    service: str
    path: str


def split(raw_path: str) -> Target | None:
    """`/openai/v1/chat` → Target("openai", "/v1/chat"); None when there is no slug."""
    if not raw_path.startswith("/"):
        return None
    slug, sep, rest = raw_path[1:].partition("/")
    if not slug:
        return None
    return Target(unquote(slug), sep + rest)


def check_path(raw: str) -> str:
    """Refuse dot segments (encoded or not), backslashes and control characters."""
    if (
        "%" not in raw
        and "/." not in raw
        and not raw.startswith((".", "//"))
        and "\\" not in raw
        and raw.isprintable()
    ):
        # Nothing encoded, no segment starting with a dot, no backslash, no control
        # character (none is printable): `_check_all` would pass it as it is.
        return raw
    return _check_all(raw)


def _check_all(raw: str) -> str:
    # An upstream may decode %2F into a separator before resolving dot segments.
    as_segments = re.sub("%2f", "/", raw, flags=re.IGNORECASE)
    if _DOT_SEGMENT.search(as_segments) or _FORBIDDEN.search(raw):
        raise BadPath("the path may not contain dot segments, backslashes or control characters")
    if raw.startswith("//"):
        raise BadPath("the path may not start with '//'")
    return raw


class _Base(NamedTuple):
    scheme: str
    host: str
    port: int | None
    path: str  # without a trailing slash
    bare: str  # the path alone, when the request has none


@functools.lru_cache(maxsize=1024)
def _parsed(base_url: str) -> _Base:
    url = URL(base_url)
    return _Base(
        url.scheme, url.raw_host or "", url.explicit_port, url.raw_path.rstrip("/"),
        url.raw_path or "/",
    )  # fmt: skip


def upstream_url(base_url: str, raw_path: str, raw_query: str) -> URL:
    """`base_url` + path + query, on the base URL's host whatever the path holds."""
    base = _parsed(base_url)
    path = check_path(raw_path)
    joined = base.path + path if path else base.bare
    return URL.build(
        scheme=base.scheme,
        host=base.host,
        port=base.port,
        path=joined or "/",
        query_string=raw_query,
        encoded=True,
    )

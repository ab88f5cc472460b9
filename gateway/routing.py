"""Route matching (pure): which service a request is for, and the upstream URL it goes to.

The upstream URL is built from the service's configured scheme, host and port and nothing
the client sent, so no path, query, Host header or absolute-form target can move a key to
another host. Paths that try to climb out of the service's base path are refused.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from yarl import URL

from gateway.errors import BadRequest

# A dot segment in any spelling (`.`, `..`, `%2e`, `%2E.`), between slashes or at the ends.
_DOT_SEGMENT: Final = re.compile(r"(^|/)(\.|%2e){1,2}(/|$)", re.IGNORECASE)
_FORBIDDEN: Final = re.compile(r"[\\\x00-\x1f\x7f]|%5c|%00", re.IGNORECASE)


class BadPath(BadRequest):
    code = "bad_path"


@dataclass(frozen=True)
class Target:
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
    # An upstream may decode %2F into a separator before resolving dot segments.
    as_segments = re.sub("%2f", "/", raw, flags=re.IGNORECASE)
    if _DOT_SEGMENT.search(as_segments) or _FORBIDDEN.search(raw):
        raise BadPath("the path may not contain dot segments, backslashes or control characters")
    if raw.startswith("//"):
        raise BadPath("the path may not start with '//'")
    return raw


@functools.lru_cache(maxsize=1024)
def _parsed(base_url: str) -> URL:
    return URL(base_url)


def upstream_url(base_url: str, raw_path: str, raw_query: str) -> URL:
    """`base_url` + path + query, on the base URL's host whatever the path holds."""
    base = _parsed(base_url)
    path = check_path(raw_path)
    joined = base.raw_path.rstrip("/") + path if path else base.raw_path or "/"
    return URL.build(
        scheme=base.scheme,
        host=base.raw_host or "",
        port=base.explicit_port,
        path=joined or "/",
        query_string=raw_query,
        encoded=True,
    )

"""The gateway's own errors, in the shape each service's SDK understands.

Every error keeps the one shape, `{"error": {"code", "message", "request_id", ...}}`, with an
OpenAI/Stripe-style `type` beside the code: both SDKs map the HTTP status to their own
exception (`RateLimitError` for a 429, `AuthenticationError` for a 401) and read `message`,
`type` and `code`. Google's web services answer errors with HTTP 200 and a JSON `status`, and
the googlemaps SDK raises its own errors from that `status` only, so on a Google-style
service the gateway does the same for its 4xx errors (`OVER_QUERY_LIMIT`, `REQUEST_DENIED`,
`INVALID_REQUEST`); its 502/503/504 keep their status, which the SDK treats as transient.
"""

from __future__ import annotations

from typing import Final

TYPES: Final = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}
GOOGLE_STATUSES: Final = {
    401: "REQUEST_DENIED",
    403: "REQUEST_DENIED",
    429: "OVER_QUERY_LIMIT",
}
# Services whose clients read errors from a 200 answer's `status` (by slug).
GOOGLE_STYLE: Final = frozenset({"googlemaps"})


def error_type(status: int) -> str:
    return TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def google_status(status: int) -> str:
    return GOOGLE_STATUSES.get(status, "INVALID_REQUEST")

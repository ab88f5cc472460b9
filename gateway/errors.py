"""Errors: exceptions carrying an HTTP status and a snake_case code, rendered once by middleware."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final

from redis.exceptions import ClusterDownError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# What the Redis clients raise when Redis does not answer: a 503, and best-effort work (a
# publish, a gauge) goes on without it. On a cluster, redis-py raises RedisClusterException
# (not a RedisError) when it reaches no node at all, and ClusterDownError (a ResponseError)
# after -CLUSTERDOWN; the hot path's client raises ConnectionError for both.
REDIS_DOWN: Final = (
    RedisConnectionError,
    RedisTimeoutError,
    RedisClusterException,
    ClusterDownError,
)


class WalletError(Exception):
    """Base of every error a client may see. The message must never carry a secret."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})
        self.details: dict[str, object] = dict(details or {})


class BadRequest(WalletError):
    status, code = 400, "bad_request"


class InvalidJson(WalletError):
    status, code = 400, "invalid_json"


class ValidationFailed(WalletError):
    status, code = 422, "validation_error"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", details={"field": field})


class Unauthenticated(WalletError):
    status, code = 401, "unauthenticated"

    def __init__(self, message: str = "missing or invalid credentials") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(WalletError):
    status, code = 403, "forbidden"


class NotFound(WalletError):
    status, code = 404, "not_found"


class UnknownService(WalletError):
    status, code = 404, "unknown_service"

    def __init__(self, slug: str) -> None:
        super().__init__(f"no service named {slug!r}")


class MethodNotAllowed(WalletError):
    status, code = 405, "method_not_allowed"


class Conflict(WalletError):
    status, code = 409, "conflict"


class PayloadTooLarge(WalletError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(WalletError):
    status, code = 415, "unsupported_media_type"


class TooManyRequests(WalletError):
    status, code = 429, "too_many_requests"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after_s))})


class QuotaExhausted(TooManyRequests):
    code = "quota_exhausted"

    def __init__(self, service: str, retry_after_s: int) -> None:
        super().__init__(
            f"every {service} key this token may use has used its quota for the current "
            "period; retry after the window resets",
            retry_after_s,
        )
        # SDKs (openai, stripe) retry a 429 on their own within seconds unless told not to;
        # a spent quota only comes back at Retry-After.
        self.headers["x-should-retry"] = "false"


class KeysResting(TooManyRequests):
    code = "keys_cooling_down"

    def __init__(self, service: str, retry_after_s: int) -> None:
        super().__init__(
            f"every {service} key this token may use was refused by {service} for rate or "
            "quota reasons and is resting; retry after it comes back",
            retry_after_s,
        )
        self.headers["x-should-retry"] = "false"


class KeysBusy(TooManyRequests):
    code = "keys_busy"

    def __init__(self, service: str) -> None:
        super().__init__(
            f"every {service} key this token may use has as many requests in flight as its "
            "metadata.maxConcurrency allows; retry in a moment",
            1,
        )
        # Unlike a spent quota, a slot frees up as soon as a request in flight ends: the SDKs'
        # own retry after Retry-After (1 s) is what the caller wants here.
        self.headers["x-should-retry"] = "true"


class VaultSealed(WalletError):
    status, code = 503, "vault_sealed"

    def __init__(self) -> None:
        super().__init__("the vault is sealed: the master key is missing or wrong")


class Unavailable(WalletError):
    status, code = 503, "service_unavailable"


class DatabaseUnavailable(WalletError):
    """PostgreSQL cannot be reached and no cached answer may stand in for it (a token never
    seen, a service's keys not loaded yet, or a cached answer past its staleness bound)."""

    status, code = 503, "database_unavailable"

    def __init__(self, what: str) -> None:
        super().__init__(
            f"the database is unavailable and {what} cannot be checked without it; retry shortly",
            headers={"Retry-After": "1"},
        )


class NoKey(WalletError):
    status, code = 409, "no_key"

    def __init__(self, service: str) -> None:
        super().__init__(
            f"the wallet holds no enabled, active {service} key that this token's owner may "
            "use; add one with POST /keys on the admin API, or set one the upstream rejected "
            f"back to active (GET /keys?service={service}&status=invalid)"
        )


class UpstreamUnavailable(WalletError):
    status, code = 502, "upstream_unavailable"


class UpstreamTimeout(WalletError):
    status, code = 504, "upstream_timeout"

"""Every Redis key name, built here and nowhere else.

Keys that one Lua script touches together share a hash tag (`{...}`) so the same scripts run
on Redis Cluster. Nothing here ever embeds a secret: usernames and addresses are hashed.
"""

from __future__ import annotations

import hashlib
from typing import Final

PREFIX: Final = "wallet"


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:24]


def login_failures_user(username: str) -> str:
    return f"{PREFIX}:{{login}}:user:{_digest(username.lower())}"


def login_failures_addr(address: str) -> str:
    return f"{PREFIX}:{{login}}:addr:{_digest(address)}"


def health_probe() -> str:
    return f"{PREFIX}:health"


def invalidation_channel() -> str:
    return f"{PREFIX}:invalidate"


def quota_counter(service: str, key_id: str, window_id: str) -> str:
    """Requests counted against one key in one quota window. The service's keys share a hash
    tag: one reservation script reads and charges several of them."""
    return f"{PREFIX}:{{quota:{service}}}:{key_id}:{window_id}"


def rate_counter(owner_id: str, token_id: str | None, window_id: str) -> str:
    """Requests in one rate-limit window: by one token with a limit of its own, else by all
    of a user's tokens (their tier's limit). A user's counters (rate and spend) share a hash
    tag: one admission script reads and charges them together."""
    return f"{PREFIX}:{{caller:{owner_id}}}:rate:{token_id or 'user'}:{window_id}"


def spend_counter(owner_id: str, whose: str, token_id: str, window_id: str) -> str:
    """Amount (nano-units) spent in one budget window by a token (`whose` = token) or by
    its owner across all their tokens (`whose` = user)."""
    subject = token_id if whose == "token" else "all"
    return f"{PREFIX}:{{caller:{owner_id}}}:spend:{whose}:{subject}:{window_id}"


def in_flight(service: str, key_id: str) -> str:
    """A key's requests in flight (a sorted set: lease id scored by its expiry in ms), for
    `metadata.maxConcurrency`. Same hash tag as the quota counters: the reservation script
    checks and takes a slot in the same call."""
    return f"{PREFIX}:{{quota:{service}}}:inflight:{key_id}"


def rotation(service: str) -> str:
    """`round_robin` services: when each key was last served (a hash: key id -> turn)."""
    return f"{PREFIX}:{{quota:{service}}}:turns"


def console_session(token_digest: str) -> str:
    """One console login; named by a digest of the cookie, so Redis never holds the cookie."""
    return f"{PREFIX}:console:session:{token_digest}"


def console_form_once(digest: str) -> str:
    """A console form that must not act twice (issuing a token), marked when it is sent."""
    return f"{PREFIX}:console:once:{digest}"


def cooldowns() -> str:
    """Every resting key's end (field: key id, value: epoch seconds), for processes that
    start after a rest was announced."""
    return f"{PREFIX}:{{cooldowns}}"

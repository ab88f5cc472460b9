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

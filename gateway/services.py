"""The service catalog: which upstream each slug reaches, where its key goes, how its keys
share the traffic (`strategy`) and what a call costs (`cost_model`)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, cast, get_args

from yarl import URL

from gateway import audit
from gateway.db import Connection, Record, unique_is_conflict
from gateway.errors import Conflict, UnknownService, ValidationFailed
from gateway.selection import STRATEGIES, Strategy

AuthType = Literal["bearer", "basic", "header", "query"]
AUTH_TYPES: Final = get_args(AuthType)
SLUG: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# Paths the gateway serves itself; a service may not shadow them.
# `new`: the console's create page is /ui/services/new.
RESERVED_SLUGS: Final = frozenset(
    {
        "proxy",
        "monitoring",
        "auth",
        "ui",
        "static",
        "admin",
        "openapi.json",
        "health",
        "metrics",
        "new",
    }
)
NAME_TOKEN: Final = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
HOST: Final = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*"
    r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
)


@dataclass(frozen=True)
class Service:
    slug: str
    name: str
    base_url: str
    auth_type: AuthType
    auth_name: str | None
    hosts: tuple[str, ...]
    builtin: bool = False
    strategy: Strategy = "priority"  # within keys of the same tier and priority
    cost_model: dict[str, Any] | None = None  # see gateway.costs

    def to_json(self) -> dict[str, Any]:
        return {
            "slug": self.slug,
            "name": self.name,
            "base_url": self.base_url,
            "auth": {"type": self.auth_type, "name": self.auth_name},
            "hosts": list(self.hosts),
            "builtin": self.builtin,
            "strategy": self.strategy,
            "cost_model": self.cost_model,
        }


BUILTINS: Final = (
    Service(
        "stripe", "Stripe", "https://api.stripe.com", "bearer", None, ("api.stripe.com",), True
    ),
    Service(
        "openai", "OpenAI", "https://api.openai.com", "bearer", None, ("api.openai.com",), True
    ),
    Service(
        "openweather",
        "OpenWeather",
        "https://api.openweathermap.org",
        "query",
        "appid",
        ("api.openweathermap.org",),
        True,
    ),
    Service(
        "googlemaps",
        "Google Maps",
        "https://maps.googleapis.com",
        "query",
        "key",
        # The SDK calls these hosts directly for some APIs (roads, geolocation, address
        # validation): served in forward-proxy mode too.
        (
            "maps.googleapis.com",
            "roads.googleapis.com",
            "www.googleapis.com",
            "addressvalidation.googleapis.com",
        ),
        True,
    ),
)

LIST: Final = """
SELECT slug, name, base_url, auth_type, auth_name, hosts, builtin, strategy, cost_model
FROM services ORDER BY builtin DESC, slug LIMIT $1 OFFSET $2"""
COUNT: Final = "SELECT count(*) FROM services"
GET: Final = """
SELECT slug, name, base_url, auth_type, auth_name, hosts, builtin, strategy, cost_model
FROM services WHERE slug = $1"""
GET_FOR_UPDATE: Final = GET + " FOR UPDATE"
INSERT: Final = """
INSERT INTO services (slug, name, base_url, auth_type, auth_name, hosts, builtin, strategy,
                      cost_model)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (slug) DO NOTHING RETURNING slug"""
UPDATE: Final = """
UPDATE services SET name = $2, base_url = $3, auth_type = $4, auth_name = $5, hosts = $6,
                    strategy = $7, cost_model = $8, updated_at = now()
WHERE slug = $1"""
DELETE: Final = "DELETE FROM services WHERE slug = $1"
KEYS_USING: Final = "SELECT count(*) FROM api_keys WHERE service = $1"


def _from_row(row: Record) -> Service:
    return Service(
        row["slug"],
        row["name"],
        row["base_url"],
        row["auth_type"],
        row["auth_name"],
        tuple(row["hosts"]),
        row["builtin"],
        row["strategy"],
        row["cost_model"],
    )


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def validate_base_url(value: object, *, allow_insecure: bool) -> str:
    """An absolute http(s) URL with a host, no credentials, query or fragment."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationFailed("base_url", "must be a URL string")
    try:
        url = URL(value.strip())
    except ValueError:
        raise ValidationFailed("base_url", "is not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValidationFailed("base_url", "must be an absolute http:// or https:// URL")
    if url.user is not None or url.password is not None:
        raise ValidationFailed("base_url", "must not carry credentials")
    if url.query_string or url.fragment:
        raise ValidationFailed("base_url", "must not have a query or fragment")
    if url.scheme == "http" and not allow_insecure and not is_loopback(url.host):
        raise ValidationFailed(
            "base_url",
            "plain http:// is accepted only for loopback hosts "
            "(set ALLOW_INSECURE_UPSTREAMS=true to allow it)",
        )
    return str(url).rstrip("/")


def validate_auth(value: object) -> tuple[AuthType, str | None]:
    if not isinstance(value, dict):
        raise ValidationFailed("auth", "must be an object with `type` (and `name`)")
    kind, name = value.get("type"), value.get("name")
    if kind not in AUTH_TYPES:
        raise ValidationFailed("auth.type", f"must be one of {', '.join(AUTH_TYPES)}")
    if kind in ("header", "query"):
        if not isinstance(name, str) or not NAME_TOKEN.fullmatch(name):
            raise ValidationFailed("auth.name", "a header or query parameter name is required")
        return cast(AuthType, kind), name
    if name is not None:
        raise ValidationFailed("auth.name", f"is not used with auth type {kind}")
    return cast(AuthType, kind), None


def validate_hosts(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
        raise ValidationFailed("hosts", "must be a list of host names")
    hosts = tuple(dict.fromkeys(h.strip().lower().rstrip(".") for h in value))
    for host in hosts:
        if not HOST.fullmatch(host):
            raise ValidationFailed("hosts", "each entry must be a DNS host name")
    return hosts


def validate_strategy(value: object) -> Strategy:
    if value not in STRATEGIES:
        raise ValidationFailed("strategy", f"must be one of {', '.join(STRATEGIES)}")
    return cast(Strategy, value)


def validate_slug(value: object) -> str:
    if not isinstance(value, str) or not SLUG.fullmatch(value) or value in RESERVED_SLUGS:
        raise ValidationFailed(
            "slug", "lower-case letters, digits, '-' and '_' (at most 63), not a reserved path"
        )
    return value


async def list_services(conn: Connection, limit: int, offset: int) -> tuple[list[Service], int]:
    rows = await conn.fetch(LIST, limit, offset)
    return [_from_row(r) for r in rows], await conn.fetchval(COUNT)


async def get_service(conn: Connection, slug: str) -> Service:
    row = await conn.fetchrow(GET, slug)
    if row is None:
        raise UnknownService(slug)
    return _from_row(row)


HOST_CLAIMED: Final = """SELECT slug, h FROM services, unnest(hosts) AS h
WHERE slug <> $1 AND h = ANY($2::text[]) LIMIT 1"""
HOSTS_TAKEN: Final = """SELECT DISTINCT h FROM services, unnest(hosts) AS h
WHERE slug <> $1 AND h = ANY($2::text[])"""
# Serialises changes to `hosts`: two services can never claim one host.
HOSTS_LOCK: Final = 0x5E4C


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _refuse_claimed_hosts(conn: Connection, slug: str, hosts: tuple[str, ...]) -> None:
    """A host is served by one service only (forward-proxy mode picks the service by it)."""
    if not hosts:
        return
    await conn.execute("SELECT pg_advisory_xact_lock($1)", HOSTS_LOCK)
    row = await conn.fetchrow(HOST_CLAIMED, slug, list(hosts))
    if row is not None:
        raise Conflict(f"host {row['h']!r} is already claimed by service {row['slug']!r}")


async def create_service(
    conn: Connection, actor: audit.Actor, service: Service, *, hosts_given: bool = True
) -> Service:
    """A custom service. Without `hosts` given, it claims its base URL's host for the
    forward proxy when that is a name no other service claims (else none: several services
    may share an upstream host in reverse mode)."""
    async with conn.transaction():
        if hosts_given:
            await _refuse_claimed_hosts(conn, service.slug, service.hosts)
        else:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", HOSTS_LOCK)
            named = [h for h in service.hosts if not _is_ip(h)]
            taken = {r["h"] for r in await conn.fetch(HOSTS_TAKEN, service.slug, named)}
            service = replace(service, hosts=tuple(h for h in named if h not in taken))
        with unique_is_conflict(f"service {service.slug!r} exists"):
            slug = await conn.fetchval(
                INSERT,
                service.slug,
                service.name,
                service.base_url,
                service.auth_type,
                service.auth_name,
                list(service.hosts),
                False,
                service.strategy,
                service.cost_model,
            )
        if slug is None:
            raise Conflict(f"service {service.slug!r} exists")
        await audit.append(
            conn,
            actor,
            "service.create",
            "service",
            service.slug,
            {"base_url": service.base_url, "auth": service.auth_type, "strategy": service.strategy},
        )
    return replace(service, builtin=False)


async def update_service(
    conn: Connection, actor: audit.Actor, slug: str, changes: Mapping[str, Any]
) -> Service:
    async with conn.transaction():
        row = await conn.fetchrow(GET_FOR_UPDATE, slug)
        if row is None:
            raise UnknownService(slug)
        updated = replace(_from_row(row), **changes)
        if "hosts" in changes:
            await _refuse_claimed_hosts(conn, slug, updated.hosts)
        await conn.execute(
            UPDATE,
            slug,
            updated.name,
            updated.base_url,
            updated.auth_type,
            updated.auth_name,
            list(updated.hosts),
            updated.strategy,
            updated.cost_model,
        )
        await audit.append(
            conn, actor, "service.update", "service", slug, {"changed": sorted(changes)}
        )
    return updated


async def delete_service(conn: Connection, actor: audit.Actor, slug: str) -> None:
    async with conn.transaction():
        service = await get_service(conn, slug)
        if service.builtin:
            raise Conflict(f"built-in service {slug!r} cannot be deleted")
        if await conn.fetchval(KEYS_USING, slug):
            raise Conflict(f"service {slug!r} still has keys; delete them first")
        await conn.execute(DELETE, slug)
        await audit.append(conn, actor, "service.delete", "service", slug)


async def seed(conn: Connection, actor: audit.Actor) -> list[str]:
    """Insert the built-in services that are missing; never overwrites an admin's changes."""
    added: list[str] = []
    async with conn.transaction():
        for s in BUILTINS:
            if await conn.fetchval(
                INSERT,
                s.slug,
                s.name,
                s.base_url,
                s.auth_type,
                s.auth_name,
                list(s.hosts),
                True,
                s.strategy,
                s.cost_model,
            ):
                added.append(s.slug)
        if added:
            await audit.append(conn, actor, "service.seed", "service", None, {"added": added})
    return added

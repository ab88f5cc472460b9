"""`/audit` (ADMIN): the audit trail, newest first, and a verification of its hash chain."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from admin.auth import admin_only
from admin.body import list_response, pagination
from gateway import audit
from gateway.appkeys import POOL


async def find(
    request: web.Request, filters: Mapping[str, str], limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """Records matching `filters` (`action`, `target_type`, `target_id`, `actor` exactly;
    `q` as free text), newest first: what `GET /audit` and the console's page list."""
    search = audit.validate_search(filters.get("q"))
    async with request.app[POOL].acquire() as conn:
        return await audit.list_records(
            conn,
            action=filters.get("action") or None,
            target_type=filters.get("target_type") or None,
            target_id=filters.get("target_id") or None,
            actor=filters.get("actor") or None,
            limit=limit,
            offset=offset,
            q=search,
        )


async def list_(request: web.Request) -> web.Response:
    await admin_only(request)
    limit, offset = pagination(request)
    items, total = await find(request, request.query, limit, offset)
    return list_response(items, total)


async def verify(request: web.Request) -> web.Response:
    await admin_only(request)
    async with request.app[POOL].acquire() as conn:
        verdict = await audit.verify(conn)
    return web.json_response(
        {
            "ok": verdict.ok,
            "checked": verdict.checked,
            "head_seq": verdict.head_seq,
            "head_hash": verdict.head_hash,
            "breaks": [{"seq": b.seq, "problem": b.problem} for b in verdict.breaks],
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/audit", list_, name="audit.list")
    app.router.add_get("/audit/verify", verify, name="audit.verify")

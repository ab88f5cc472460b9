"""Console page for the audit log (ADMIN): records newest first, searched and filtered by
action, and the verdict of the hash chain's verification.

The records come from `audit_api.find`, what `GET /audit` answers with; the verdict from
`audit.verify`, what `GET /audit/verify` and `wallet audit verify` report.
"""

from __future__ import annotations

import json
from typing import Any, Final

from aiohttp import web

from admin import audit_api
from admin.body import pagination
from admin.console import page
from gateway import audit
from gateway.appkeys import POOL
from gateway.errors import ValidationFailed

PATH: Final = f"{page.PREFIX}/audit"
PER_PAGE: Final = 50
# Logs up to this many records are verified on every view; larger ones when asked (?verify=1).
AUTO_VERIFY_MAX: Final = 20_000
FILTERS: Final = ("q", "action")


def verdict_text(verdict: audit.Verdict) -> str:
    """`intact`, or where the chain first breaks and how."""
    if verdict.ok:
        return "intact"
    first = verdict.breaks[0]
    return f"broken at seq {first.seq}: {first.problem}"


def _row(record: dict[str, Any]) -> dict[str, Any]:
    return {
        **record,
        "details_json": json.dumps(record["details"], sort_keys=True, ensure_ascii=False),
    }


async def audit_page(request: web.Request) -> web.Response:
    await page.admin(request)
    _, offset = pagination(request)
    filters = {name: request.query.get(name, "") for name in FILTERS}
    errors: dict[str, str] = {}
    try:
        items, total = await audit_api.find(request, filters, PER_PAGE, offset)
    except ValidationFailed as exc:
        items, total, errors = [], 0, page.field_errors(exc)
    async with request.app[POOL].acquire() as conn:
        head = await conn.fetchrow(audit.LAST)
        size = head["seq"] if head else 0
        # Verifying reads every record: at once for a log of ordinary size, on request past it.
        wanted = request.query.get("verify") == "1" or size <= AUTO_VERIFY_MAX
        verdict = await audit.verify(conn) if wanted else None
        actions = await audit.actions(conn)
    context = {
        "records": [_row(r) for r in items],
        "total": total,
        "limit": PER_PAGE,
        "offset": offset,
        "filters": filters,
        "query": {name: value for name, value in filters.items() if value},
        "errors": errors,
        "action_options": [("", "Any action"), *((a, a) for a in actions)],
        "verdict": verdict,
        "verdict_text": verdict_text(verdict) if verdict is not None else "",
        "size": size,
        "verify_query": {**{k: v for k, v in filters.items() if v}, "verify": "1"},
    }
    return page.render(request, "audit.html", context, status=422 if errors else 200)


def add_routes(app: web.Application) -> None:
    app.router.add_get(PATH, audit_page, name="ui.audit")

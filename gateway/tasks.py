"""Owned background tasks: named, kept in app state, cancelled and awaited at cleanup.

This is the one module allowed to call `asyncio.create_task` (ruff bans it elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

TASKS: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("tasks")


def spawn(app: web.Application, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    task = asyncio.create_task(coro, name=name)  # noqa: TID251 - the owned-task helper
    app[TASKS].add(task)
    task.add_done_callback(lambda t: _finished(app, t))
    return task


def _finished(app: web.Application, task: asyncio.Task[None]) -> None:
    app[TASKS].discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "background_task_failed", task=task.get_name(), error=type(task.exception()).__name__
        )


async def tasks_ctx(app: web.Application) -> AsyncIterator[None]:
    app[TASKS] = set()
    yield
    running: set[asyncio.Task[None]] = app[TASKS]
    tasks = list(running)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task

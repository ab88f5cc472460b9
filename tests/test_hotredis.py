"""The hot path's lean Redis client, against the real Redis: pipelined replies in order,
cancellation, script reloading, reconnection, and redis-py's exceptions on failure."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from admin.embedded import free_port
from gateway.hotredis import HotRedis, HotScript
from gateway.secret import Secret
from tests.conftest import Servers


async def test_concurrent_commands_get_their_own_replies(hot: HotRedis) -> None:
    replies = await asyncio.gather(*(hot.execute("ECHO", f"value-{i}") for i in range(300)))
    assert replies == [f"value-{i}".encode() for i in range(300)]
    counts = await asyncio.gather(*(hot.execute("INCR", "hot:counter") for _ in range(200)))
    assert sorted(counts) == list(range(1, 201))


async def test_a_cancelled_command_does_not_shift_the_replies(hot: HotRedis) -> None:
    # A slow command first, so that the later ones queue behind it on the one connection.
    slow = asyncio.ensure_future(hot.execute("EVAL", "return redis.call('PING')", 0))  # noqa: TID251
    cancelled = [asyncio.ensure_future(hot.execute("ECHO", f"gone-{i}")) for i in range(5)]  # noqa: TID251
    kept = [asyncio.ensure_future(hot.execute("ECHO", f"kept-{i}")) for i in range(5)]  # noqa: TID251
    await asyncio.sleep(0)
    for task in cancelled:
        task.cancel()
    assert await slow == b"PONG"
    assert await asyncio.gather(*kept) == [f"kept-{i}".encode() for i in range(5)]
    assert await hot.execute("ECHO", "after") == b"after"


async def test_scripts_are_reloaded_after_a_flush(hot: HotRedis, servers: Servers) -> None:
    script = HotScript(hot, "return tonumber(ARGV[1]) + 1")
    assert await script(keys=[], args=[41]) == 42
    plain = Redis.from_url(servers.redis_url.reveal())
    try:
        await plain.script_flush()
    finally:
        await plain.aclose()
    assert await script(keys=[], args=[1]) == 2  # NOSCRIPT, then EVAL


async def test_errors_are_redis_py_exceptions(hot: HotRedis) -> None:
    with pytest.raises(ResponseError):
        await hot.execute("NOSUCHCOMMAND")
    assert await hot.execute("PING") == b"PONG"  # the connection is still in step


async def test_a_killed_connection_is_replaced(hot: HotRedis, servers: Servers) -> None:
    client_id = await hot.execute("CLIENT", "ID")
    plain = Redis.from_url(servers.redis_url.reveal())
    try:
        await plain.execute_command("CLIENT", "KILL", "ID", client_id)
    finally:
        await plain.aclose()
    for _ in range(20):  # the first call may meet the dead connection; a later one succeeds
        try:
            assert await hot.execute("PING") == b"PONG"
            break
        except RedisConnectionError:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the client did not reconnect")
    assert await hot.execute("CLIENT", "ID") != client_id


async def test_unreachable_redis_is_a_connection_error() -> None:
    client = HotRedis(Secret(f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(RedisConnectionError) as raised:
        await client.execute("PING")
    assert "127.0.0.1" not in str(raised.value)  # nothing of the URL in the message
    await client.close()


async def test_a_wrong_password_is_refused(servers: Servers) -> None:
    url = servers.redis_url.reveal()
    if "@" not in url:
        pytest.skip("this Redis has no password")
    scheme, _, rest = url.partition("://")
    wrong = f"{scheme}://:wrong-password@{rest.split('@', 1)[1]}"
    client = HotRedis(Secret(wrong))
    with pytest.raises((ResponseError, RedisConnectionError)):
        await client.execute("PING")
    await client.close()


def test_works_under_uvloop(servers: Servers) -> None:
    """Production runs on uvloop, whose transports differ from asyncio's."""
    uvloop = pytest.importorskip("uvloop")

    async def check() -> tuple[object, object]:
        client = HotRedis(servers.redis_url)
        try:
            return await client.execute("PING"), await HotScript(client, "return 7")([], [])
        finally:
            await client.close()

    assert uvloop.run(check()) == (b"PONG", 7)

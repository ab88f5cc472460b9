"""The hot path's Redis client on Redis Cluster (REDIS_CLUSTER): each command goes to the
node serving its first key's slot, over one gateway/hotredis.py connection per node, and the
cluster's redirects (-MOVED, -ASK, -TRYAGAIN) are followed. The standalone client does none
of this work: which one runs is decided once, at startup.
"""

from __future__ import annotations

import asyncio
import binascii
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import replace
from typing import Any, Final, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.hotredis import HotRedis
from gateway.secret import Secret

SLOTS: Final = 16384
# One node's answer to CLUSTER SLOTS, connecting included: a node that does not answer in
# this time is passed over for the next (the map's reload must not wait a command's timeout
# for each hung node).
SLOTS_TIMEOUT_S: Final = 1.0
# Redirects one command may follow: a slot moves at most once or twice while it is in flight.
MAX_REDIRECTS: Final = 5
# A multi-key command met a slot half-way through migrating (-TRYAGAIN): it is sent again
# every TRYAGAIN_DELAY_S until the keys are together again, for at most TRYAGAIN_BUDGET_S (a
# migration moves a slot's keys in batches: this is time, not a count of redirects).
TRYAGAIN_DELAY_S: Final = 0.05
TRYAGAIN_BUDGET_S: Final = 1.0

Node = TypeVar("Node", bound=Hashable)


def key_slot(key: bytes) -> int:
    """The cluster slot of `key`: CRC16 (XMODEM) of its hash tag, the part between the first
    `{` and the next `}` when that is not empty, else of the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % SLOTS


def routing_key(args: Sequence[str | int | bytes]) -> bytes | None:
    """The key a command is routed by: a script's first key, else its first argument (every
    keyed command the hot path sends names its key first); None for a command without one."""
    if len(args) < 2:
        return None
    if args[0] in ("EVALSHA", "EVAL"):
        if len(args) < 4 or int(args[2]) < 1:
            return None
        key = args[3]
    else:
        key = args[1]
    return key if isinstance(key, bytes) else str(key).encode()


def node_address(address: str, replied_from: str) -> tuple[str, int]:
    """The host and port of a -MOVED or -ASK ("10.0.0.1:6379", "[::1]:6379"). An empty host
    (":6379", as Redis 7 sends with cluster-preferred-endpoint-type unknown-endpoint) means
    the host of the node that replied."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or replied_from, int(port)


def reload_order(serving: Iterable[Node | None], seed: Node, suspects: set[Node]) -> list[Node]:
    """The nodes to ask for the slot map, each once: those serving slots (in slot order), then
    the one REDIS_URL names, and last those that failed lately (a hung node would cost the
    reload its whole timeout)."""
    nodes = [node for node in dict.fromkeys((*serving, seed)) if node is not None]
    return [n for n in nodes if n not in suspects] + [n for n in nodes if n in suspects]


class HotCluster(HotRedis):
    """A Redis Cluster, found from the one node REDIS_URL names: each command goes to the node
    serving its first key's slot (the keys of one script share a hash tag, so one slot).

    The slot map comes from CLUSTER SLOTS. Commands wait for it only while none is loaded:
    after a redirect or a failed node it is loaded again behind them (one load at a time, its
    outcome shared by whoever waits for it), while they go on by the map they have, right for
    every slot but a few. So a hung node stalls only the commands for its own slots.

    -MOVED (the slot has a new owner) is followed at once to the node it names; -ASK (the slot
    is migrating and the key already left) sends ASKING and the command to the importing node;
    at most MAX_REDIRECTS of these per command. -TRYAGAIN (a multi-key command during a
    migration) is waited out for up to TRYAGAIN_BUDGET_S. -CLUSTERDOWN counts as Redis being
    unreachable. Each node has one pipelined connection, so commands for one slot (a
    reservation, then its lease's release) reach Redis in the order they were sent.

    A subclass so that Quotas and Limits take either client; its own connection is never
    opened (the node that REDIS_URL names gets a client of its own like any other)."""

    def __init__(self, url: Secret[str]) -> None:
        super().__init__(url)
        if self._at.socket is not None or self._at.db:
            raise ValueError("a Redis Cluster's REDIS_URL is redis:// or rediss://, database 0")
        self._nodes: dict[tuple[str, int], HotRedis] = {}
        self._seed = self._node(self._at.host, self._at.port)
        self._slots: list[HotRedis | None] = [None] * SLOTS
        self._loaded = False  # a map was loaded: commands no longer wait for one
        self._stale = True  # the map is to be loaded (again)
        # The load of the map under way, if any. Not a gateway.tasks task (this client has no
        # app): owned here, cancelled and awaited by close().
        self._loading: asyncio.Task[None] | None = None
        self._suspects: set[HotRedis] = set()  # nodes that failed lately: asked for the map last
        self.redirects = 0  # -MOVED and -ASK followed: none while the map is right

    def _node(self, host: str, port: int) -> HotRedis:
        node = self._nodes.get((host, port))
        if node is None:
            node = self._nodes[host, port] = HotRedis(replace(self._at, host=host, port=port))
        return node

    async def execute(self, *args: str | int | bytes) -> Any:
        if self._stale:
            if self._loaded:
                self._load_soon()
            else:
                await self.reload()
        key = routing_key(args)
        node = self._slots[key_slot(key)] if key is not None else self._seed
        asking = False
        redirects = 0
        busy_until = 0.0  # when to stop waiting out -TRYAGAIN (set at the first one)
        while redirects <= MAX_REDIRECTS:
            if node is None:
                self._stale = True
                raise RedisConnectionError("no node of the Redis Cluster serves this slot")
            try:
                if asking:
                    return await node.execute_asking(*args)
                return await node.execute(*args)
            except ResponseError as exc:
                kind, _, detail = str(exc).partition(" ")
                if kind == "TRYAGAIN":
                    busy_until = await _wait_out_migration(busy_until)
                    continue
                redirect = self._redirect(kind, detail, node)
                if redirect is None:
                    raise
                node, asking = redirect
                redirects += 1
            except (RedisConnectionError, RedisTimeoutError):
                # A node gone or hung: a failover may have moved its slots (and the next load
                # of the map asks it last).
                self._stale = True
                self._suspects.add(node)
                raise
        raise RedisConnectionError("the Redis Cluster redirected a command too many times")

    def _redirect(self, kind: str, detail: str, node: HotRedis) -> tuple[HotRedis, bool] | None:
        """Where to send a command next after `node` answered -`kind` `detail`, and whether
        with ASKING; None when the error is the command's own."""
        if kind == "MOVED":  # "MOVED <slot> <host>:<port>"
            self.redirects += 1
            slot, _, address = detail.partition(" ")
            self._stale = True  # more slots may have moved: the map is loaded again
            self._slots[int(slot)] = target = self._node(*node_address(address, node._at.host))
            return target, False
        if kind == "ASK":  # "ASK <slot> <host>:<port>": for this command only
            self.redirects += 1
            return self._node(*node_address(detail.partition(" ")[2], node._at.host)), True
        if kind == "CLUSTERDOWN":
            self._stale = True
            raise RedisConnectionError("the Redis Cluster is down") from None
        return None

    async def reload(self) -> None:
        """Load the slot map again, or join the load under way, and wait for it: what commands
        do while no map is loaded. A waiter cancelled leaves the load to the others."""
        task = self._load_soon()
        await asyncio.wait((task,))
        if task.cancelled():
            raise RedisConnectionError("the Redis Cluster client was closed")
        task.result()  # the load's error, if it failed: every waiter of this wave gets it

    def _load_soon(self) -> asyncio.Task[None]:
        task = self._loading
        if task is None or task.done():
            # Owned (see __init__), so not gateway.tasks.spawn.
            task = asyncio.create_task(self._load_map(), name="redis-cluster-slots")  # noqa: TID251
            task.add_done_callback(_settled)
            self._loading = task
        return task

    async def _load_map(self) -> None:
        """CLUSTER SLOTS from the first node (in reload_order) that answers it in time."""
        refusal: ResponseError | None = None
        unanswered = False
        for node in reload_order(self._slots, self._seed, self._suspects):
            try:
                async with asyncio.timeout(SLOTS_TIMEOUT_S):
                    reply = await node.execute("CLUSTER", "SLOTS")
            except (RedisConnectionError, RedisTimeoutError, TimeoutError):
                self._suspects.add(node)
                unanswered = True
                continue
            except ResponseError as exc:  # -LOADING, -NOPERM, a wrong password: the next may do
                unanswered = unanswered or str(exc).startswith("LOADING")
                refusal = refusal or exc
                continue
            self._suspects.discard(node)
            self._load(reply, node._at.host)
            return
        if refusal is not None and not unanswered:
            raise refusal  # every node answered, refusing (say, cluster support disabled)
        raise RedisConnectionError("no node of the Redis Cluster answered")

    def _load(self, reply: list[Any], asked_host: str) -> None:
        """CLUSTER SLOTS: [[first slot, last slot, [host, port, id, ...], replicas...], ...]."""
        slots: list[HotRedis | None] = [None] * SLOTS
        for first, last, primary, *_replicas in reply:
            host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
            if host == "?":
                continue  # an address nobody knows: its slots stay unserved until it has one
            # An empty host: the node is on the host that answered, at the port given.
            node = self._node(host or asked_host, int(primary[1]))
            slots[first : last + 1] = [node] * (last + 1 - first)
        self._slots = slots
        self._loaded = True
        self._stale = False

    async def close(self) -> None:
        task, self._loading = self._loading, None
        if task is not None:
            task.cancel()
            await asyncio.wait((task,))
        for node in self._nodes.values():
            await node.close()
        self._slots = [None] * SLOTS
        self._loaded = False
        self._stale = True
        self._suspects.clear()


async def _wait_out_migration(busy_until: float) -> float:
    """A moment's wait after -TRYAGAIN, until `busy_until` (0 at the first one: from now on,
    TRYAGAIN_BUDGET_S); then the slot counts as unavailable."""
    now = asyncio.get_running_loop().time()
    busy_until = busy_until or now + TRYAGAIN_BUDGET_S
    if now + TRYAGAIN_DELAY_S > busy_until:
        raise RedisConnectionError("a Redis Cluster slot is still migrating") from None
    await asyncio.sleep(TRYAGAIN_DELAY_S)
    return busy_until


def _settled(task: asyncio.Task[None]) -> None:
    """A load of the map nobody waited for: its failure is seen as the commands' own."""
    if not task.cancelled():
        task.exception()

"""The node registry: each node's last Hello in Redis, live while its heartbeat keeps the key alive.

`Hello` is the heartbeat. The ingress writes `splitclip:v1:node:{node_id}` (JSON of `NodeInfo`) with a
TTL of 3 heartbeat intervals, so a node that stays silent for 3 intervals drops out by itself.
`list_nodes(redis_url)` reads the live ones (`splitclip cloud nodes`); the age of each entry comes
from Redis's own clock (the TTL left), so it is right whatever the clocks of the ingress and the reader.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis
from redis.exceptions import RedisError

from cloud_service.cache import PREFIX, RedisStore, redacted
from splitclip.errors import SplitclipError

NODE_PREFIX = f"{PREFIX}node:"


class RegistryError(SplitclipError):
    """The registry's Redis cannot be read (the message names the URL)."""


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    bundle_id: str
    seen_at: float  # Unix time of the last Hello, by the ingress's clock
    mode: str = ""  # "split" or "local", as the node reported it
    frames_answered: int = 0
    accepted: bool = False  # the node's bundle is the cloud's
    version: str = ""
    codecs: list[str] = field(default_factory=list)
    cuts: list[int] = field(default_factory=list)
    ttl_s: float = 0.0  # the entry's lifetime when written (3 heartbeat intervals)
    age_s: float = 0.0  # seconds since the last Hello, when read (not stored)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("age_s")
        return json.dumps(d)

    @staticmethod
    def from_json(raw: str | bytes, *, age_s: float = 0.0) -> NodeInfo:
        d: dict[str, Any] = json.loads(raw)
        known = NodeInfo.__dataclass_fields__
        return NodeInfo(**{k: v for k, v in d.items() if k in known and k != "age_s"}, age_s=age_s)


def node_key(node_id: str) -> str:
    return NODE_PREFIX + node_id


class NodeRegistry:
    """Writes of the ingress: node_id -> last Hello, expiring `ttl_s` after it (the heartbeat)."""

    def __init__(self, store: RedisStore, ttl_s: float) -> None:
        self.store = store
        self.ttl_ms = max(1, round(ttl_s * 1000))  # ms: a test's heartbeat may be well under a second

    @staticmethod
    def key(node_id: str) -> str:
        return node_key(node_id)

    async def register(self, info: NodeInfo) -> bool:
        body = replace(info, ttl_s=self.ttl_ms / 1000).to_json()
        ok = await self.store.call("node.set", lambda r: r.set(node_key(info.node_id), body, px=self.ttl_ms))
        return ok is not None

    async def get(self, node_id: str) -> NodeInfo | None:
        raw = await self.store.call("node.get", lambda r: r.get(node_key(node_id)))
        return None if raw is None else NodeInfo.from_json(raw)


def list_nodes(redis_url: str, *, timeout_s: float = 2.0) -> list[NodeInfo]:
    """The live nodes (those whose last Hello is younger than their TTL), sorted by node id."""
    client = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        keys = sorted(client.scan_iter(match=NODE_PREFIX + "*", count=500))
        if not keys:
            return []
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
            pipe.pttl(k)
        replies = pipe.execute()
    except (RedisError, OSError) as e:
        raise RegistryError(f"node registry at {redacted(redis_url)} unreadable: {e}") from None
    finally:
        client.close()
    nodes = []
    for raw, pttl in zip(replies[::2], replies[1::2], strict=True):
        if raw is None:  # expired between SCAN and GET
            continue
        try:
            info = NodeInfo.from_json(raw)
        except (ValueError, TypeError):  # not written by this version: skip rather than fail the listing
            continue
        age = max(0.0, info.ttl_s - pttl / 1000) if info.ttl_s and pttl >= 0 else time.time() - info.seen_at
        nodes.append(replace(info, age_s=round(age, 3)))
    return sorted(nodes, key=lambda n: n.node_id)

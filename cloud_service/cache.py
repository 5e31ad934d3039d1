"""Redis: the degrading client, the prompt-embedding cache shared by all replicas, and prompt sets.

Redis is an optimisation, never a dependency: every operation has a short timeout, and a failure
marks the store down (one log line + a metric) so that requests skip Redis instead of waiting on it.
While down, Redis is tried again at most every `retry_s`; the first success logs that it is back.

Keys (all under `splitclip:v1:`):
    emb:{bundle_id}:{sha256(normalised prompt)}   float32 [embed_dim] little-endian, TTL cache_ttl_s
    pset:{bundle_id}:{prompt_set_id}             JSON {"labels": [...], "templates": [...]}
    node:{node_id}                               the node registry (cloud_service.registry)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
from numpy.typing import NDArray
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from splitclip.prompts import normalise


def redacted(url: str) -> str:
    """The URL as logs may show it: a password (redis://:PASSWORD@host, as the Kubernetes pods build it) hidden."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = creds.partition(":")[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


log = logging.getLogger("splitclip.cloud.cache")
PREFIX = "splitclip:v1:"
T = TypeVar("T")


def prompt_key(bundle_id: str, prompt: str) -> str:
    digest = hashlib.sha256(normalise(prompt).encode()).hexdigest()[:32]
    return f"{PREFIX}emb:{bundle_id}:{digest}"


class RedisStore:
    """A redis.asyncio client that degrades to "no cache" while Redis is unreachable."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.25,
        retry_s: float = 1.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._on_error = on_error
        self._down_since: float | None = None
        self._next_try = 0.0
        # One retry: after a Redis restart the first command on a pooled socket fails, the retry reconnects.
        self._client: aioredis.Redis | None = (
            aioredis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 1),
            )
            if url
            else None
        )

    @property
    def configured(self) -> bool:
        return self._client is not None

    @property
    def available(self) -> bool:
        return self._client is not None and self._down_since is None

    async def call(self, op: str, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T | None:
        """Run `fn(client)`; None when Redis is not configured, down, or fails now."""
        if self._client is None:
            return None
        now = time.monotonic()
        if self._down_since is not None and now < self._next_try:
            return None
        try:
            result = await asyncio.wait_for(fn(self._client), timeout=self.timeout_s * 4)
        except (RedisError, OSError, TimeoutError) as e:
            self._next_try = time.monotonic() + self.retry_s
            if self._down_since is None:
                self._down_since = now
                log.warning(
                    "redis at %s unavailable (%s: %s); serving without the cache", redacted(self.url), op, e
                )
            if self._on_error:
                self._on_error(op)
            return None
        if self._down_since is not None:
            log.warning(
                "redis at %s is back after %.1f s; cache enabled", redacted(self.url), now - self._down_since
            )
            self._down_since = None
        return result

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


class PromptCache:
    """Normalised prompt -> embedding, per bundle, in Redis."""

    def __init__(self, store: RedisStore, bundle_id: str, embed_dim: int, ttl_s: int) -> None:
        self.store = store
        self.bundle_id = bundle_id
        self.embed_dim = embed_dim
        self.ttl_s = ttl_s

    async def get_many(self, prompts: Sequence[str]) -> list[NDArray[np.float32] | None]:
        keys = [prompt_key(self.bundle_id, p) for p in prompts]
        raw = await self.store.call("mget", lambda r: r.mget(keys))
        if raw is None:
            return [None] * len(prompts)
        out: list[NDArray[np.float32] | None] = []
        for value in raw:
            if value is not None and len(value) == 4 * self.embed_dim:
                out.append(np.frombuffer(value, dtype="<f4").astype(np.float32))
            else:
                out.append(None)  # absent, or written by something else: recompute
        return out

    async def put_many(self, prompts: Sequence[str], embeddings: NDArray[np.float32]) -> None:
        # embeddings: [n, embed_dim]
        async def put(r: aioredis.Redis) -> Any:
            pipe = r.pipeline(transaction=False)
            for p, e in zip(prompts, embeddings, strict=True):
                pipe.set(prompt_key(self.bundle_id, p), np.asarray(e, "<f4").tobytes(), ex=self.ttl_s)
            return await pipe.execute()

        await self.store.call("set", put)


class PromptSets:
    """prompt_set_id -> (labels, templates), so frames can send an id instead of the prompts."""

    def __init__(self, store: RedisStore, bundle_id: str, ttl_s: int) -> None:
        self.store = store
        self.bundle_id = bundle_id
        self.ttl_s = ttl_s

    def _key(self, set_id: str) -> str:
        return f"{PREFIX}pset:{self.bundle_id}:{set_id}"

    async def put(self, set_id: str, labels: Sequence[str], templates: Sequence[str]) -> None:
        body = json.dumps({"labels": list(labels), "templates": list(templates)})
        await self.store.call("pset.set", lambda r: r.set(self._key(set_id), body, ex=self.ttl_s))

    async def get(self, set_id: str) -> tuple[list[str], list[str]] | None:
        raw = await self.store.call("pset.get", lambda r: r.get(self._key(set_id)))
        if raw is None:
            return None
        data = json.loads(raw)
        return list(data["labels"]), list(data["templates"])

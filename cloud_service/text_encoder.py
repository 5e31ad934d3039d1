"""TextEncoder deployment: prompts -> normalised embeddings with text.onnx, through the Redis cache."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from ray import serve

from cloud_service.cache import PromptCache, RedisStore
from cloud_service.metrics import Metrics
from cloud_service.settings import CloudSettings
from splitclip.prompts import normalise
from splitclip.runtime import BundleRuntime

log = logging.getLogger("splitclip.cloud.text")


class TextCore:
    """The deployment's logic without Serve, so it can be unit-tested and reused."""

    def __init__(self, settings: CloudSettings, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.runtime = BundleRuntime(settings.bundle, threads=settings.text_threads)
        self.runtime.session("text.onnx")
        m = self.runtime.manifest
        self.store = RedisStore(
            settings.redis_url,
            timeout_s=settings.redis_timeout_s,
            retry_s=settings.redis_retry_s,
            on_error=metrics.redis_error if metrics else None,
        )
        self.cache = PromptCache(self.store, m.bundle_id, m.embed_dim, settings.cache_ttl_s)

    async def encode(self, texts: Sequence[str]) -> tuple[NDArray[np.float32], int]:
        """Texts (templates already applied) -> ([n, embed_dim] normalised, number of cache hits)."""
        texts = [normalise(t) for t in texts]
        found = await self.cache.get_many(texts)
        todo = sorted({t for t, e in zip(texts, found, strict=True) if e is None})
        hits = len(texts) - sum(e is None for e in found)
        fresh: dict[str, NDArray[np.float32]] = {}
        if todo:
            embs = await asyncio.to_thread(self.runtime.encode_text, todo)  # [len(todo), embed_dim]
            fresh = dict(zip(todo, embs, strict=True))
            await self.cache.put_many(todo, embs)
        if self.metrics:
            self.metrics.hits(hits, "redis")
            self.metrics.misses(len(texts) - hits)
        rows = [e if e is not None else fresh[t] for t, e in zip(texts, found, strict=True)]
        return np.stack(rows).astype(np.float32, copy=False), hits


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
class TextEncoder:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.metrics = Metrics()
        self.core = TextCore(CloudSettings.load(settings), self.metrics)

    async def encode(self, texts: list[str]) -> tuple[NDArray[np.float32], int]:
        t0 = time.perf_counter()
        out = await self.core.encode(texts)
        self.metrics.stage("text", (time.perf_counter() - t0) * 1e3)
        return out

    def stats(self) -> dict[str, object]:
        return {**self.metrics.snapshot(), "redis_available": self.core.store.available}

    def reset_stats(self) -> None:
        self.metrics.reset_local()

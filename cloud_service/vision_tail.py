"""VisionTail deployment: the rest of the image tower (blocks k..L + head) for any cut k, batched.

One replica serves every cut. `@serve.batch` collects decoded frames from all callers (ingress
groups from many unary calls and from the concurrently dispatched frames of bidi streams alike); the
batches it forms while ONNX Runtime is busy are merged into the next ORT run (cloud_service.batching:
Serve 2.60 forms batches before a `max_concurrent_batches` slot is free, so without the merge frames
that trickle in run one by one). Inside a run, frames are grouped by (cut, tokens) because only
tensors with the same shape stack (token pruning sends fewer tokens), and each group is one ORT batch.
ORT runs in a worker thread (it releases the GIL), so the replica keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

import numpy as np
from numpy.typing import NDArray
from ray import serve

from cloud_service.batching import Coalescer
from cloud_service.metrics import Metrics
from cloud_service.settings import CloudSettings
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower

log = logging.getLogger("splitclip.cloud.tail")
_NOT_RUN = RuntimeError("frame was not run")
# one frame's normalised embedding [embed_dim] and the ORT ms of the run that computed it (its shape
# group's): the nodes' planners learn the cloud's speed from this, apart from the Serve call's fixed cost
Tailed = tuple[NDArray[np.float32], float]


class TailCore:
    """Runs a list of (cut, tensor) frames with as few ORT calls as shapes allow."""

    def __init__(
        self, bundle: str, threads: int, *, spinning: bool | None = False, providers: str = ""
    ) -> None:
        # Idle ORT workers spin by default: on a small box that steals the CPU the proxy, the
        # ingress and the batch collector need between batches. threads 0 = ORT's default.
        names = [p.strip() for p in providers.split(",") if p.strip()]
        self.runtime = BundleRuntime(
            bundle, threads=threads or None, spinning=spinning, providers=names or None
        )
        self.runtime.warmup(text=False)
        self.tower = Tower(self.runtime)
        self.num_blocks = self.runtime.num_blocks

    def run_group(self, cut: int, stacked: np.ndarray) -> NDArray[np.float32]:
        """One shape group (the tensors at `cut`, stacked) -> normalised embeddings [batch, embed_dim]."""
        return self.tower.finish(stacked, cut)

    def run(self, cuts: list[int], arrays: list[np.ndarray]) -> list[Tailed | Exception]:
        """Per frame (its embedding [embed_dim], ORT ms), or the exception that frame alone raised."""
        groups: dict[tuple[int, tuple[int, ...]], list[int]] = defaultdict(list)
        for i, (cut, a) in enumerate(zip(cuts, arrays, strict=True)):
            groups[(cut, a.shape)].append(i)
        out: list[Tailed | Exception] = [_NOT_RUN] * len(arrays)
        for (cut, _), idx in groups.items():
            try:
                t0 = time.perf_counter()
                emb = self.run_group(cut, np.stack([arrays[i] for i in idx]))  # [group, embed_dim]
                ms = (time.perf_counter() - t0) * 1e3
                for row, i in enumerate(idx):
                    out[i] = (emb[row], ms)
            except Exception:
                # One bad frame must not fail its batch-mates: retry the group frame by frame.
                for i in idx:
                    try:
                        t0 = time.perf_counter()
                        one = self.run_group(cut, arrays[i][None])[0]
                        out[i] = (one, (time.perf_counter() - t0) * 1e3)
                    except Exception as e:
                        log.warning("tail failed on a frame at cut %d: %s", cut, e)
                        out[i] = e
        return out


# Batches formed while ORT runs wait in the merge queue, so up to this many may be open at once.
MAX_CONCURRENT_BATCHES = 4


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=128)
class VisionTail:
    def __init__(self, settings: dict[str, Any]) -> None:
        s = CloudSettings.load(settings)
        self.metrics = Metrics()
        self.core = TailCore(s.bundle, s.tail_threads, providers=s.ort_providers)
        # One ORT run at a time, on everything that queued up meanwhile (at most max_batch_size).
        self.runs: Coalescer[tuple[int, np.ndarray], Tailed] = Coalescer(
            self._run_ort, s.max_batch_size, concurrency=1
        )
        self._configure(s.max_batch_size, s.batch_wait_s)

    def _configure(self, max_batch_size: int, batch_wait_s: float) -> None:
        self.embed_batch.set_max_batch_size(max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.runs.max_size = max_batch_size
        log.info("vision tail: max_batch_size=%d batch_wait_s=%.4f", max_batch_size, batch_wait_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """user_config {max_batch_size, batch_wait_s} retunes batching without restarting the replica."""
        if user_config:
            self._configure(
                int(user_config.get("max_batch_size", self.embed_batch._get_max_batch_size())),
                float(user_config.get("batch_wait_s", self.embed_batch._get_batch_wait_timeout_s())),
            )

    async def embed(self, cut: int, x: np.ndarray) -> NDArray[np.float32]:
        """One decoded frame at `cut` -> its normalised image embedding [embed_dim]."""
        result = await self.embed_batch(cut, x)
        if isinstance(result, BaseException):
            raise result
        return result[0]

    async def embed_many(self, cuts: list[int], xs: list[np.ndarray]) -> list[Tailed | BaseException]:
        """Several frames in one call (the ingress groups its frames to save per-call overhead); they
        join the same batch queue as everything else. Failed frames come back as their exception."""
        return await asyncio.gather(*(self.embed_batch(c, x) for c, x in zip(cuts, xs, strict=True)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def embed_batch(self, cuts: list[int], xs: list[np.ndarray]) -> list[Tailed | BaseException]:
        return await self.runs.submit_many(list(zip(cuts, xs, strict=True)))

    async def _run_ort(self, items: list[tuple[int, np.ndarray]]) -> list[Tailed | Exception]:
        self.metrics.batch(len(items))
        t0 = time.perf_counter()
        cuts = [c for c, _ in items]
        xs = [x for _, x in items]
        # ORT releases the GIL: running it in a thread keeps the event loop collecting the next batch.
        out = await asyncio.to_thread(self.core.run, cuts, xs)
        self.metrics.stage("tail", (time.perf_counter() - t0) * 1e3)
        return out

    def stats(self) -> dict[str, object]:
        return self.metrics.snapshot()

    def reset_stats(self) -> None:
        self.metrics.reset_local()

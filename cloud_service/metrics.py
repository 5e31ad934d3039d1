"""Service metrics through Ray Serve's metrics API (exported by Ray's Prometheus endpoint).

Each replica creates one `Metrics` in its constructor (Serve adds the deployment / replica /
application tags). A plain in-process copy of the counters is kept as well, so tests and the
benchmark can read them through a deployment handle without scraping Prometheus.

Exported names (Prometheus adds the `ray_` prefix):
    splitclip_frames_total{cut, status}          frames answered, by gRPC status name
    splitclip_bytes_in_total{cut}                 Frame.payload bytes received
    splitclip_batch_size                          vision tail batch sizes (histogram)
    splitclip_prompt_cache_hits_total{level}      prompt embeddings found (level = local | redis)
    splitclip_prompt_cache_misses_total           prompt embeddings computed
    splitclip_redis_errors_total{op}              Redis operations that failed (cache skipped)
    splitclip_stage_latency_ms{stage}             decode / tail / text / score / total (histogram)
"""

from __future__ import annotations

from collections import Counter as _Tally

from ray.serve import metrics

_LATENCY_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
_BATCH = [1, 2, 4, 8, 16, 32, 64, 128]


class Metrics:
    def __init__(self) -> None:
        self.frames = metrics.Counter(
            "splitclip_frames", "Frames answered, by cut and gRPC status.", tag_keys=("cut", "status")
        )
        self.bytes_in = metrics.Counter("splitclip_bytes_in", "Frame payload bytes received.", ("cut",))
        self.batch_size = metrics.Histogram(
            "splitclip_batch_size", "Vision tail batch sizes.", boundaries=_BATCH
        )
        self.cache_hits = metrics.Counter(
            "splitclip_prompt_cache_hits", "Prompt embeddings served from a cache.", ("level",)
        )
        self.cache_misses = metrics.Counter(
            "splitclip_prompt_cache_misses", "Prompt embeddings computed by text.onnx."
        )
        self.redis_errors = metrics.Counter(
            "splitclip_redis_errors", "Redis operations that failed; the cache was skipped.", ("op",)
        )
        self.latency = metrics.Histogram(
            "splitclip_stage_latency_ms",
            "Per-stage latency in ms.",
            boundaries=_LATENCY_MS,
            tag_keys=("stage",),
        )
        self.local: _Tally[str] = _Tally()  # name -> count, readable through a handle
        self.batch_hist: _Tally[int] = _Tally()  # batch size -> number of batches

    def frame(self, cut: int, status: str, nbytes: int) -> None:
        self.frames.inc(1, {"cut": str(cut), "status": status})
        if nbytes > 0:  # Ray counters refuse inc(0)
            self.bytes_in.inc(nbytes, {"cut": str(cut)})
        self.local[f"frames.{status}"] += 1
        self.local["bytes_in"] += nbytes

    def batch(self, size: int) -> None:  # size >= 1
        self.batch_size.observe(size)
        self.batch_hist[size] += 1

    def hits(self, n: int, level: str) -> None:
        if n:
            self.cache_hits.inc(n, {"level": level})
            self.local[f"cache_hits.{level}"] += n

    def misses(self, n: int) -> None:
        if n:
            self.cache_misses.inc(n)
            self.local["cache_misses"] += n

    def redis_error(self, op: str) -> None:
        self.redis_errors.inc(1, {"op": op})
        self.local["redis_errors"] += 1

    def stage(self, stage: str, ms: float) -> None:
        self.latency.observe(ms, {"stage": stage})

    def snapshot(self) -> dict[str, object]:
        return {"counters": dict(self.local), "batch_sizes": dict(sorted(self.batch_hist.items()))}

    def reset_local(self) -> None:
        self.local.clear()
        self.batch_hist.clear()

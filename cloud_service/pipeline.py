"""The ingress without Serve: each phase of a request is a named method, the RPCs are made of them.

Per frame: authenticate → check the bundle → resolve prompts → decode → [tail ‖ text] → score →
shape the Result. The tail and the scorer get every frame in flight that is at that step as one call
per group (cloud_service.batching). The three backends are plain async callables (`Backends`): the
Serve deployment passes deployment handles, a test can pass TailCore / TextCore in-process.
Refusals are `errors.ServiceError`; turning them into gRPC statuses is the adapter's job.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from numpy.typing import NDArray

from cloud_service import errors
from cloud_service.auth import TokenAuth
from cloud_service.batching import Coalescer
from cloud_service.cache import PromptSets, RedisStore
from cloud_service.grpc_api import Unparsed, pb
from cloud_service.metrics import Metrics
from cloud_service.prompt_resolver import PromptResolver, Resolved, TextFn
from cloud_service.registry import NodeInfo, NodeRegistry
from cloud_service.settings import CloudSettings
from splitclip import codec
from splitclip.bundle import Bundle, load_bundle
from splitclip.constants import DEFAULT_TOP_K
from splitclip.prompts import PromptLimits, average_templates
from splitclip.tower import unit

if TYPE_CHECKING:
    from cloud_service.search.ingest import Indexer

log = logging.getLogger("splitclip.cloud.ingress")

Embedding = NDArray[np.float32]
TopK = list[tuple[int, float]]
# (cuts, decoded tensors at those cuts) -> per frame (its embedding [embed_dim], the tail's ORT ms) or
# its exception
TailFn = Callable[[list[int], list[np.ndarray]], Awaitable[list[tuple[Embedding, float] | BaseException]]]
# ([(image_emb [dim], prompt_set_id, n_templates, k)], {prompt_set_id: texts [n * n_tpl, dim]}) -> (probs, top)
ScoreFn = Callable[
    [list[tuple[Embedding, str, int, int]], dict[str, Embedding]], Awaitable[list[tuple[Embedding, TopK]]]
]


@dataclass(frozen=True)
class Backends:
    embed_many: TailFn  # VisionTail.embed_many
    encode_text: TextFn  # TextEncoder.encode
    score_many: ScoreFn  # Scorer.score_many


@dataclass
class TailClock:
    """When a frame's tail call started (its queueing ends there) and the ORT ms it took in the tail."""

    started: list[float] = field(default_factory=list)  # perf_counter, set once the call goes out
    compute_ms: float = 0.0


def is_unit(embedding: Embedding) -> bool:
    """A normalised embedding, as the tail returns it; not when normalising overflowed (NaN, Inf or zeros)."""
    n = float(np.linalg.norm(embedding.astype(np.float64)))
    return math.isfinite(n) and abs(n - 1.0) < 1e-3


class Pipeline:
    def __init__(
        self,
        settings: CloudSettings,
        backends: Backends,
        *,
        bundle: Bundle | None = None,
        metrics: Metrics | None = None,
        indexer: Indexer | None = None,
    ) -> None:
        self.s = settings
        self.backends = backends
        self.metrics = metrics or Metrics()
        self.indexer = indexer  # fleet search: rows of frames sent with `index` go to it (never waited on)
        self.bundle = b = bundle or load_bundle(settings.bundle)
        self.bundle_id = b.manifest.bundle_id
        self.num_blocks = b.manifest.num_blocks
        self.spec = codec.TensorSpec.from_manifest(b.manifest)
        self.calibration = b.calibration()
        self.limits = codec.Limits(max_payload_bytes=settings.max_payload_bytes)
        self.auth = TokenAuth(settings.node_token)
        self.store = RedisStore(
            settings.redis_url,
            timeout_s=settings.redis_timeout_s,
            retry_s=settings.redis_retry_s,
            on_error=self.metrics.redis_error,
        )
        self.prompts = PromptResolver(
            self.bundle_id,
            PromptLimits(settings.max_prompts, settings.max_prompt_chars, settings.max_templates),
            PromptSets(self.store, self.bundle_id, settings.cache_ttl_s),
            backends.encode_text,
            self.metrics,
        )
        self.registry = NodeRegistry(self.store, 3 * settings.heartbeat_interval_s)
        # Every Serve call costs milliseconds of CPU (router, replica, pickling): frames in flight
        # travel as one call per group (a group is what queued up while the previous calls were busy).
        self.tail_calls = Coalescer(
            self._tail_group, settings.max_batch_size, settings.ingress_calls_inflight
        )
        self.score_calls = Coalescer(
            self._score_group, settings.max_batch_size, settings.ingress_calls_inflight
        )
        self.inflight = 0  # frames being answered now
        self.tail_ms_per_block = 0.0  # moving averages for Hello (the nodes' planners)
        self.queue_ms = 0.0

    # -- phases -----------------------------------------------------------------------------
    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """UNAUTHENTICATED unless the call's metadata carries the node token (when one is set)."""
        self.auth.check(metadata)

    def check_bundle(self, bundle_id: str) -> None:
        if not bundle_id:
            raise errors.invalid("bundle_id is required (the id of the bundle the node runs)")
        if bundle_id != self.bundle_id:
            raise errors.bundle_mismatch(bundle_id, self.bundle_id)

    async def resolve_prompts(self, frame: pb.Frame) -> Resolved:
        return await self.prompts.resolve(frame.prompts, frame.templates, frame.prompt_set_id)

    def decode(self, frame: pb.Frame) -> codec.Decoded:
        if frame.cut > self.num_blocks:
            raise errors.invalid(f"cut: {frame.cut} is out of range, expected 0..{self.num_blocks}")
        if frame.cut == 0 and not self.s.allow_image_upload:  # before decoding: the pixels are never read
            raise errors.image_upload_refused()
        n = len(frame.payload)
        if n > self.s.max_payload_bytes:
            raise errors.too_large(f"payload: {n} bytes, at most {self.s.max_payload_bytes} allowed")
        return codec.decode(
            frame.payload, cut=frame.cut, spec=self.spec, calibration=self.calibration, limits=self.limits
        )

    async def image_embedding(self, decoded: codec.Decoded, clock: TailClock | None = None) -> Embedding:
        """The normalised image embedding [embed_dim] of a decoded frame (splitclip.tower's `finish`).
        `clock` gets when its tail call started and the tail's ORT time."""
        if decoded.kind == "embedding":  # cut L: finishing is only normalising, no tail call needed
            return unit(decoded.array)
        clock = clock if clock is not None else TailClock()
        emb, clock.compute_ms = await self.tail_calls.submit((decoded.cut, decoded.array, clock.started))
        return emb

    async def text_embeddings(self, r: Resolved) -> Embedding:
        """[n_labels * n_templates, embed_dim]."""
        return await self.prompts.embeddings(r)

    async def score(self, image: Embedding, r: Resolved, texts: Embedding, k: int) -> tuple[Embedding, TopK]:
        """(probabilities [n_labels], the top k (index, probability) pairs)."""
        return await self.score_calls.submit((image, r.set_id, texts, r.prompts.n_templates, k))

    def shape_result(
        self, frame: pb.Frame, r: Resolved, probs: Embedding, top: TopK, timings: dict[str, float]
    ) -> pb.Result:
        labels = frame.prompts or r.labels  # as the node gave them (r holds the normalised form)
        return pb.Result(
            frame_id=frame.frame_id,
            top=[pb.Label(index=i, prompt=labels[i], probability=p) for i, p in top],
            probabilities=probs.tolist(),
            bundle_id=self.bundle_id,
            cut=frame.cut,
            timings_ms=timings,
        )

    # -- groups of frames to the tail and the scorer ------------------------------------------
    async def _tail_group(
        self, items: list[tuple[int, np.ndarray, list[float]]]
    ) -> list[tuple[Embedding, float] | BaseException]:
        self.metrics.batch_hist[len(items)] += 1  # frames per tail call (the tail records ORT batches)
        now = time.perf_counter()
        for _, _, started in items:
            started.append(now)
        # each array [tokens, width] (or uint8 [S, S, 3] at cut 0)
        return await self.backends.embed_many([cut for cut, _, _ in items], [a for _, a, _ in items])

    async def _score_group(
        self, items: list[tuple[Embedding, str, Embedding, int, int]]
    ) -> list[tuple[Embedding, TopK]]:
        self.metrics.local["score_calls"] += 1
        unique = {sid: txt for _, sid, txt, _, _ in items}  # each prompt set's texts once per call
        return await self.backends.score_many([(img, sid, n, k) for img, sid, _, n, k in items], unique)

    # -- one frame --------------------------------------------------------------------------
    async def classify(self, frame: pb.Frame) -> pb.Result:
        """The frame's Result; raises the refusal (ServiceError, or a validation error to map)."""
        t0 = time.perf_counter()
        self.check_bundle(frame.bundle_id)
        prompts = await self.resolve_prompts(frame)
        decoded = self.decode(frame)
        t_dec = time.perf_counter()

        async def timed(aw: Awaitable[Embedding]) -> tuple[Embedding, float]:
            t = time.perf_counter()
            return await aw, time.perf_counter() - t

        clock = TailClock()
        (img, t_tail), (txt, t_text) = await asyncio.gather(
            timed(self.image_embedding(decoded, clock)), timed(self.text_embeddings(prompts))
        )
        if not is_unit(img):  # finite values the model (or the norm) overflows on, a zero embedding at cut L
            raise errors.invalid(
                f"payload: the tensor at cut {frame.cut} gives no usable image embedding "
                "(values too large or too small for the model, or an all-zero embedding)"
            )
        t_sc = time.perf_counter()
        probs, top = await self.score(img, prompts, txt, frame.top_k or DEFAULT_TOP_K)
        t_end = time.perf_counter()
        timings = {
            "decode": (t_dec - t0) * 1e3,
            "tail": t_tail * 1e3,
            "text": t_text * 1e3,
            "score": (t_end - t_sc) * 1e3,
            "total": (t_end - t0) * 1e3,
            # waited for the tail call to start (part of "tail"); 0 at cut L, which needs no tail call
            "queue": (clock.started[0] - t_dec) * 1e3 if clock.started else 0.0,
            # the tail's ONNX Runtime time (part of "tail"; the rest is the Serve call and batching)
            "compute": clock.compute_ms,
        }
        for stage, ms in timings.items():
            self.metrics.stage(stage, ms)
        if frame.cut < self.num_blocks:
            self._load(timings["compute"], self.num_blocks - frame.cut, timings["queue"])
        result = self.shape_result(frame, prompts, probs, top, timings)
        if frame.index:  # offer() never blocks or raises: the answer does not wait for the store
            if self.indexer is None:
                self.metrics.local["index_ignored"] += 1  # search is off on this cloud
            else:
                from cloud_service.search.ingest import frame_row  # psycopg only once search is on

                if not self.indexer.offer(frame_row(self.bundle_id, frame, result, img)):
                    self.metrics.local["index_not_queued"] += 1  # rejected or dropped: see stats()["index"]
        return result

    def _load(self, tail_ms: float, blocks: int, queue_ms: float, a: float = 0.2) -> None:
        """The moving averages Hello reports (the first frame replaces the zeros)."""
        per_block = max(1e-3, tail_ms / blocks)
        if self.tail_ms_per_block == 0:
            self.tail_ms_per_block, self.queue_ms = per_block, queue_ms
        else:
            self.tail_ms_per_block += a * (per_block - self.tail_ms_per_block)
            self.queue_ms += a * (queue_ms - self.queue_ms)

    async def answer(self, frame: pb.Frame | Unparsed) -> pb.Result | errors.ServiceError:
        """The frame's Result, or the refusal; never raises (a bad frame must not hurt the replica)."""
        if isinstance(frame, Unparsed):  # bytes that are no Frame (cloud_service.lenient)
            self.metrics.frame(-1, "INVALID_ARGUMENT", frame.size)  # cut unknown
            return errors.invalid(frame.message)
        self.inflight += 1
        self.metrics.local["max_inflight"] = max(self.metrics.local["max_inflight"], self.inflight)
        try:
            result: pb.Result | errors.ServiceError = await self.classify(frame)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            result = errors.from_exception(e)
            if result.code == grpc.StatusCode.INTERNAL:
                log.exception("frame %d failed", frame.frame_id)
        finally:
            self.inflight -= 1
        status = "OK" if isinstance(result, pb.Result) else result.code.name
        self.metrics.frame(frame.cut, status, len(frame.payload))
        return result

    async def stream(self, frames: AsyncIterator[pb.Frame | Unparsed]) -> AsyncIterator[pb.Result]:
        """One result per frame, as they finish; a refused frame's result carries `error`."""
        # A stream is pulled one message at a time: each frame runs as its own task so that frames of
        # the same stream meet in the tail's batches. At most stream_max_inflight at once.
        results: asyncio.Queue[pb.Result | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.s.stream_max_inflight)
        tasks: set[asyncio.Task[None]] = set()

        async def one(frame: pb.Frame | Unparsed) -> None:
            r = await self.answer(frame)  # never raises but CancelledError
            if isinstance(r, errors.ServiceError):  # frame_id 0: bytes that are no Frame carry none
                frame_id = 0 if isinstance(frame, Unparsed) else frame.frame_id
                r = pb.Result(frame_id=frame_id, error=r.to_pb())
            results.put_nowait(r)

        async def pump() -> None:
            try:
                async for frame in frames:
                    await slots.acquire()
                    t = asyncio.create_task(one(frame))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
            finally:
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                results.put_nowait(None)

        reader = asyncio.create_task(pump())
        try:
            while (r := await results.get()) is not None:
                yield r
                slots.release()  # a slot frees when its result is sent: a slow reader slows the stream
            await reader  # re-raise a failed read of the request stream
        finally:
            for t in [reader, *tasks]:
                t.cancel()

    # -- the other RPCs ---------------------------------------------------------------------
    async def query_text(self, text: str, templates: Sequence[str]) -> Embedding:
        """A search text's embedding [embed_dim]: the frames' prompt path, its templates averaged."""
        r = self.prompts.check([text], templates)
        return average_templates(await self.text_embeddings(r), r.prompts.n_templates)[0]

    async def query_image(self, pixels: NDArray[np.uint8]) -> Embedding:
        """A search image's embedding [embed_dim]: uint8 [S, S, 3] through the tail at cut 0."""
        emb, _ = await self.tail_calls.submit((0, pixels, []))
        return emb

    async def encode_text(self, request: pb.TextRequest) -> pb.TextResponse:
        self.check_bundle(request.bundle_id)
        r = self.prompts.check(request.prompts, request.templates)
        emb, hits = await self.prompts.register(r)
        labels = average_templates(emb, r.prompts.n_templates)  # [n_labels, embed_dim]
        return pb.TextResponse(
            bundle_id=self.bundle_id,
            prompt_set_id=r.set_id,
            dim=labels.shape[1],
            embeddings=np.ascontiguousarray(labels, dtype="<f4").tobytes(),
            cache_hits=hits,
        )

    async def hello(self, request: pb.HelloRequest) -> pb.HelloResponse:
        """Registers the node (the heartbeat). A bundle mismatch is `accepted = false`, not a refusal:
        the node learns the cloud's bundle id from the answer."""
        if not request.node_id:
            raise errors.invalid("node_id is required")
        accepted = request.bundle_id == self.bundle_id
        message = "ok" if accepted else errors.bundle_mismatch(request.bundle_id, self.bundle_id).message
        info = NodeInfo(
            node_id=request.node_id,
            bundle_id=request.bundle_id,
            seen_at=time.time(),
            mode=request.mode,
            frames_answered=request.frames_answered,
            accepted=accepted,
            version=request.version,
            codecs=list(request.codecs),
            cuts=list(request.cuts),
        )
        if not await self.registry.register(info) and self.store.configured:
            message += " (node registry unavailable; not registered)"
        return pb.HelloResponse(
            accepted=accepted,
            cloud_bundle_id=self.bundle_id,
            message=message,
            num_blocks=self.num_blocks,
            heartbeat_interval_s=self.s.heartbeat_interval_s,
            codecs=list(codec.ALL_PRESETS),
            tail_ms_per_block=self.tail_ms_per_block,
            queue_ms=self.queue_ms,
        )

    # -- for tests and the benchmark --------------------------------------------------------
    def stats(self) -> dict[str, object]:
        return {
            **self.metrics.snapshot(),
            "memo": len(self.prompts.memo),
            "redis_available": self.store.available,
            **({"index": self.indexer.stats()} if self.indexer is not None else {}),
        }

    def reset_stats(self) -> None:
        self.metrics.reset_local()

    def clear_memo(self) -> None:
        self.prompts.clear()

    async def close(self) -> None:
        await self.store.close()

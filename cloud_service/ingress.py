"""Ingress deployment: the gRPC face of the service (auth, validation, decoding, fan-out).

Serve's gRPC proxy calls the method whose name equals the RPC name (protos/splitclip.proto).
Refusals become gRPC statuses (unary) or `Result.error` (stream); see cloud_service.errors.

Per frame: check → decode → [VisionTail.embed_many ‖ prompt embeddings] → Scorer.score_many → Result,
where the two calls carry every frame in flight that is at that step (see cloud_service.batching).
Prompt embeddings come from a local memo keyed by the content-addressed prompt_set_id (immutable,
so always correct), else from the TextEncoder deployment (Redis cache, then text.onnx).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np
from numpy.typing import NDArray
from ray import serve
from ray.serve.handle import DeploymentHandle

from cloud_service import errors
from cloud_service.batching import Coalescer
from cloud_service.cache import NodeRegistry, PromptSets, RedisStore
from cloud_service.grpc_api import pb
from cloud_service.metrics import Metrics
from cloud_service.settings import CloudSettings
from splitclip import codec
from splitclip.bundle import load_bundle
from splitclip.prompts import PromptLimits, PromptSet, average_templates, normalise, prompt_set

log = logging.getLogger("splitclip.cloud.ingress")

TOKEN_HEADER = "x-splitclip-token"
DEFAULT_TOP_K = 5
_MEMO_SIZE = 1024


def token_from_metadata(metadata: Sequence[tuple[str, Any]]) -> str | None:
    """`x-splitclip-token: T` or `authorization: Bearer T`."""
    for key, value in metadata:
        k = key.lower()
        v = value.decode() if isinstance(value, bytes) else str(value)
        if k == TOKEN_HEADER:
            return v
        if k == "authorization" and v.lower().startswith("bearer "):
            return v[7:].strip()
    return None


class Prompts:
    """A resolved prompt set: labels, templates and its content-addressed id."""

    __slots__ = ("labels", "set_id", "templates")

    def __init__(self, labels: list[str], templates: list[str], set_id: str) -> None:
        self.labels = labels
        self.templates = templates
        self.set_id = set_id


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=1024)
class Ingress:
    def __init__(
        self,
        tail: DeploymentHandle,
        text: DeploymentHandle,
        scorer: DeploymentHandle,
        settings: dict[str, Any],
    ) -> None:
        self.tail, self.text, self.scorer = tail, text, scorer
        self.s = CloudSettings.load(settings)
        self.bundle = load_bundle(self.s.bundle)
        self.manifest = self.bundle.manifest
        self.bundle_id = self.manifest.bundle_id
        self.num_blocks = self.manifest.num_blocks
        self.spec = codec.TensorSpec.from_manifest(self.manifest)
        self.calibration = self.bundle.calibration()
        self.limits = codec.Limits(max_payload_bytes=self.s.max_payload_bytes)
        _warn_if_the_proxy_hop_is_smaller(self.s.max_payload_bytes)
        self.prompt_limits = PromptLimits(self.s.max_prompts, self.s.max_prompt_chars, self.s.max_templates)
        self.token = os.environ.get("SPLITCLIP_NODE_TOKEN", "")
        self.metrics = Metrics()
        store = RedisStore(
            self.s.redis_url,
            timeout_s=self.s.redis_timeout_s,
            retry_s=self.s.redis_retry_s,
            on_error=self.metrics.redis_error,
        )
        self.store = store
        self.prompt_sets = PromptSets(store, self.bundle_id, self.s.cache_ttl_s)
        self.registry = NodeRegistry(store, 3 * self.s.heartbeat_interval_s)
        self.tail_calls = Coalescer(self._tail_group, self.s.max_batch_size, self.s.ingress_calls_inflight)
        self.score_calls = Coalescer(self._score_group, self.s.max_batch_size, self.s.ingress_calls_inflight)
        self.inflight = 0  # frames being answered now
        self.memo: OrderedDict[str, tuple[Prompts, NDArray[np.float32]]] = OrderedDict()
        log.info(
            "ingress for bundle %s (%d blocks), auth %s, redis %s",
            self.bundle_id,
            self.num_blocks,
            "on" if self.token else "off",
            self.s.redis_url or "off",
        )

    # -- checks -----------------------------------------------------------------------------
    def _authenticate(self, grpc_context: Any) -> None:
        if not self.token or grpc_context is None:
            return
        given = token_from_metadata(grpc_context.invocation_metadata())
        if given is None:
            raise errors.unauthenticated(
                f"this service requires a node token: send metadata '{TOKEN_HEADER}: <token>' "
                "or 'authorization: Bearer <token>'"
            )
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise errors.unauthenticated("node token is wrong")

    def _check_bundle(self, bundle_id: str) -> None:
        if not bundle_id:
            raise errors.invalid("bundle_id is required (the id of the bundle the node runs)")
        if bundle_id != self.bundle_id:
            raise errors.precondition(
                f"bundle mismatch: the node runs bundle {bundle_id}, the cloud runs bundle {self.bundle_id}"
            )

    def _check_prompts(self, prompts: Sequence[str], templates: Sequence[str]) -> Prompts:
        ps = prompt_set(prompts, templates, self.prompt_limits)
        labels = [normalise(p) for p in ps.labels]
        return Prompts(labels, list(ps.templates), ps.set_id(self.bundle_id))

    async def _resolve_prompts(self, frame: pb.Frame) -> Prompts:
        if frame.prompts:
            return self._check_prompts(frame.prompts, frame.templates)
        if not frame.prompt_set_id:
            raise errors.invalid("prompts: send prompts or a prompt_set_id from EncodeText")
        hit = self.memo.get(frame.prompt_set_id)
        if hit is not None:
            return hit[0]
        stored = await self.prompt_sets.get(frame.prompt_set_id)
        if stored is None:
            raise errors.not_found(
                f"prompt_set_id {frame.prompt_set_id} is unknown here (expired, or the cache is down): "
                "send the prompts, or call EncodeText again"
            )
        labels, templates = stored
        return Prompts(labels, templates, frame.prompt_set_id)

    def _decode(self, frame: pb.Frame) -> codec.Decoded:
        if frame.cut > self.num_blocks:
            raise errors.invalid(f"cut: {frame.cut} is out of range, expected 0..{self.num_blocks}")
        n = len(frame.payload)
        if n > self.s.max_payload_bytes:
            raise errors.too_large(f"payload: {n} bytes, at most {self.s.max_payload_bytes} allowed")
        return codec.decode(
            frame.payload, cut=frame.cut, spec=self.spec, calibration=self.calibration, limits=self.limits
        )

    # -- text -------------------------------------------------------------------------------
    async def _text_embeddings(self, p: Prompts) -> NDArray[np.float32]:
        """[n_labels * n_templates, embed_dim], from the memo or the TextEncoder."""
        hit = self.memo.get(p.set_id)
        if hit is not None:
            self.memo.move_to_end(p.set_id)
            self.metrics.hits(len(p.labels) * max(1, len(p.templates)), "local")
            return hit[1]
        emb, _ = await self.text.encode.remote(PromptSet(tuple(p.labels), tuple(p.templates)).texts())
        self._remember(p, emb)
        return emb

    def _remember(self, p: Prompts, emb: NDArray[np.float32]) -> None:
        self.memo[p.set_id] = (p, emb)
        self.memo.move_to_end(p.set_id)
        while len(self.memo) > _MEMO_SIZE:
            self.memo.popitem(last=False)

    # -- groups of frames to the tail and the scorer ------------------------------------------
    # Every Serve call costs milliseconds of CPU (router, replica, pickling): frames in flight here
    # travel as one call per group (cloud_service.batching: a group is what queued up while the
    # previous calls were busy, so a lone frame never waits for a timer).
    async def _tail_group(self, items: list[tuple[int, np.ndarray]]) -> list[NDArray[np.float32] | Exception]:
        self.metrics.batch_hist[len(items)] += 1  # frames per tail call (the tail records ORT batches)
        cuts = [cut for cut, _ in items]
        arrays = [a for _, a in items]  # each [tokens, width] (or [S, S, 3] uint8 at cut 0)
        return await self.tail.embed_many.remote(cuts, arrays)

    async def _score_group(
        self, items: list[tuple[NDArray[np.float32], str, NDArray[np.float32], int, int]]
    ) -> list[tuple[NDArray[np.float32], list[tuple[int, float]]]]:
        self.metrics.local["score_calls"] += 1
        unique = {sid: txt for _, sid, txt, _, _ in items}  # each prompt set's texts once per call
        return await self.scorer.score_many.remote(
            [(img, sid, n_tpl, k) for img, sid, _, n_tpl, k in items], unique
        )

    # -- one frame --------------------------------------------------------------------------
    async def _classify(self, frame: pb.Frame) -> pb.Result:
        t0 = time.perf_counter()
        self._check_bundle(frame.bundle_id)
        prompts = await self._resolve_prompts(frame)
        decoded = self._decode(frame)
        t_dec = time.perf_counter()

        async def image() -> tuple[NDArray[np.float32], float]:
            t = time.perf_counter()
            if decoded.kind == "embedding":  # cut L: the node sent the embedding itself
                e = decoded.array
                return e / np.linalg.norm(e), 0.0
            emb = await self.tail_calls.submit((frame.cut, decoded.array))  # [embed_dim]
            return emb, time.perf_counter() - t

        async def text() -> tuple[NDArray[np.float32], float]:
            t = time.perf_counter()
            return await self._text_embeddings(prompts), time.perf_counter() - t

        (img, t_tail), (txt, t_text) = await asyncio.gather(image(), text())
        t_sc = time.perf_counter()
        probs, top = await self.score_calls.submit(
            (img, prompts.set_id, txt, max(1, len(prompts.templates)), _k(frame))
        )
        t_end = time.perf_counter()

        timings = {
            "decode": (t_dec - t0) * 1e3,
            "tail": t_tail * 1e3,
            "text": t_text * 1e3,
            "score": (t_end - t_sc) * 1e3,
            "total": (t_end - t0) * 1e3,
        }
        for stage, ms in timings.items():
            self.metrics.stage(stage, ms)
        return pb.Result(
            frame_id=frame.frame_id,
            top=[pb.Label(index=i, prompt=prompts.labels[i], probability=pr) for i, pr in top],
            probabilities=probs.tolist(),
            bundle_id=self.bundle_id,
            cut=frame.cut,
            timings_ms=timings,
        )

    async def _answer(self, frame: pb.Frame) -> pb.Result | errors.ServiceError:
        """The frame's Result, or the refusal; never raises (a bad frame must not hurt the replica)."""
        self.inflight += 1
        self.metrics.local["max_inflight"] = max(self.metrics.local["max_inflight"], self.inflight)
        try:
            result: pb.Result | errors.ServiceError = await self._classify(frame)
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

    # -- RPCs -------------------------------------------------------------------------------
    async def Classify(self, frame: pb.Frame, grpc_context: Any = None) -> pb.Result:
        try:
            self._authenticate(grpc_context)
        except errors.ServiceError as e:
            return _refuse(grpc_context, e, pb.Result(frame_id=frame.frame_id))
        result = await self._answer(frame)
        if isinstance(result, errors.ServiceError):
            return _refuse(grpc_context, result, pb.Result(frame_id=frame.frame_id))
        return result

    async def ClassifyStream(
        self, request_stream: AsyncIterator[pb.Frame], grpc_context: Any = None
    ) -> AsyncIterator[pb.Result]:
        try:
            self._authenticate(grpc_context)
        except errors.ServiceError as e:
            # Nothing is yielded, so the status must travel with an exception (Serve keeps the code).
            _set_status(grpc_context, e)
            raise
        # One stream is pulled one message at a time: dispatch each frame as its own task so that
        # frames of the same stream meet in the tail's batches; results return as they finish.
        results: asyncio.Queue[pb.Result | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.s.stream_max_inflight)
        tasks: set[asyncio.Task[None]] = set()

        async def one(frame: pb.Frame) -> None:
            r = await self._answer(frame)  # never raises but CancelledError
            if isinstance(r, errors.ServiceError):
                r = pb.Result(frame_id=frame.frame_id, error=pb.Error(code=r.code.name, message=r.message))
            results.put_nowait(r)

        async def pump() -> None:
            try:
                async for frame in request_stream:
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

    async def EncodeText(self, request: pb.TextRequest, grpc_context: Any = None) -> pb.TextResponse:
        try:
            self._authenticate(grpc_context)
            self._check_bundle(request.bundle_id)
            p = self._check_prompts(request.prompts, request.templates)
            emb, hits = await self.text.encode.remote(PromptSet(tuple(p.labels), tuple(p.templates)).texts())
        except Exception as e:
            err = errors.from_exception(e)
            if err.code == grpc.StatusCode.INTERNAL:
                log.exception("EncodeText failed")
            return _refuse(grpc_context, err, pb.TextResponse())
        self._remember(p, emb)
        await self.prompt_sets.put(p.set_id, p.labels, p.templates)
        labels = average_templates(emb, max(1, len(p.templates)))  # [n_labels, embed_dim]
        return pb.TextResponse(
            bundle_id=self.bundle_id,
            prompt_set_id=p.set_id,
            dim=labels.shape[1],
            embeddings=np.ascontiguousarray(labels, dtype="<f4").tobytes(),
            cache_hits=hits,
        )

    async def Hello(self, request: pb.HelloRequest, grpc_context: Any = None) -> pb.HelloResponse:
        try:
            self._authenticate(grpc_context)
            if not request.node_id:
                raise errors.invalid("node_id is required")
        except errors.ServiceError as e:
            return _refuse(grpc_context, e, pb.HelloResponse())
        accepted = request.bundle_id == self.bundle_id
        message = (
            "ok"
            if accepted
            else f"bundle mismatch: the node runs bundle {request.bundle_id or '(none)'}, "
            f"the cloud runs bundle {self.bundle_id}"
        )
        info = {
            "bundle_id": request.bundle_id,
            "accepted": accepted,
            "codecs": list(request.codecs),
            "cuts": list(request.cuts),
            "version": request.version,
        }
        registered = await self.registry.register(request.node_id, info)
        if not registered and self.store.configured:
            message += " (node registry unavailable; not registered)"
        return pb.HelloResponse(
            accepted=accepted,
            cloud_bundle_id=self.bundle_id,
            message=message,
            num_blocks=self.num_blocks,
            heartbeat_interval_s=self.s.heartbeat_interval_s,
            codecs=list(codec.PRESETS),
        )

    # -- for tests and the benchmark (deployment handle only, not on the gRPC API) -----------
    def stats(self) -> dict[str, object]:
        return {**self.metrics.snapshot(), "memo": len(self.memo), "redis_available": self.store.available}

    def reset_stats(self) -> None:
        self.metrics.reset_local()

    def clear_memo(self) -> None:
        self.memo.clear()


def _k(frame: pb.Frame) -> int:
    return int(frame.top_k) if frame.top_k else DEFAULT_TOP_K


def _set_status(grpc_context: Any, e: errors.ServiceError) -> None:
    if grpc_context is not None:
        grpc_context.set_code(e.code)
        grpc_context.set_details(e.message)


def _refuse(grpc_context: Any, e: errors.ServiceError, empty: Any) -> Any:
    """Unary refusal: set the status on the context and return an empty message (Serve sends the
    code with it); without a gRPC context (a handle call) raise instead."""
    if grpc_context is None:
        raise e
    _set_status(grpc_context, e)
    return empty


def _warn_if_the_proxy_hop_is_smaller(max_payload_bytes: int) -> None:
    """With the proxy -> ingress hop over gRPC, that hop's receive limit must exceed our own payload
    limit, or frames between the two get gRPC's INTERNAL instead of our RESOURCE_EXHAUSTED."""
    if os.environ.get("RAY_SERVE_PROXY_USE_GRPC") != "1":
        return
    hop = int(os.environ.get("RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", 4 << 20))
    if max_payload_bytes + (64 << 10) > hop:  # the Frame's other fields and Serve's wrapping
        log.warning(
            "max_payload_bytes %d is not below RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH %d (less 64 KiB): "
            "frames near the limit will fail in the proxy -> ingress hop with INTERNAL; raise that variable",
            max_payload_bytes,
            hop,
        )

"""Ingress deployment: the gRPC face of the service, a thin adapter from RPCs to `Pipeline` calls.

Serve's gRPC proxy calls the method whose name equals the RPC name (protos/splitclip.proto, and
`Check` of grpc.health.v1: cloud_service.health). Each SplitClip handler authenticates, runs the
pipeline (cloud_service.pipeline) and turns a refusal into a gRPC status with the error's kind in
trailing metadata (unary) or into `Result.error` (stream); see cloud_service.errors. Without a gRPC
context (a deployment handle call) a refusal is raised. A request whose bytes did not parse arrives
as an `Unparsed` (cloud_service.lenient) and is refused with INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from ray import serve
from ray.serve.handle import DeploymentHandle

from cloud_service import errors
from cloud_service.cache import redacted
from cloud_service.grpc_api import Unparsed, pb
from cloud_service.health import HealthCheckResponse, Readiness, UnknownService
from cloud_service.pipeline import Backends, Pipeline
from cloud_service.search.service import OFF, SearchService, open_search
from cloud_service.settings import CloudSettings

log = logging.getLogger("splitclip.cloud.ingress")
M = TypeVar("M")


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=1024)
class Ingress:
    def __init__(
        self,
        tail: DeploymentHandle,
        text: DeploymentHandle,
        scorer: DeploymentHandle,
        settings: dict[str, Any],
    ) -> None:
        # The builder's args carry no token (CloudSettings.as_args): loading here reads it back from
        # this replica's environment (SPLITCLIP_NODE_TOKEN, e.g. from the Kubernetes Secret).
        s = CloudSettings.load(settings)
        _warn_if_the_proxy_hop_is_smaller(s.max_payload_bytes)
        backends = Backends(
            embed_many=lambda cuts, arrays: tail.embed_many.remote(cuts, arrays),
            encode_text=lambda texts: text.encode.remote(texts),
            score_many=lambda items, texts: scorer.score_many.remote(items, texts),
        )
        self.pipeline = Pipeline(s, backends)
        # Fleet search: the store is reached on first use (a replica starts while it is down).
        self.search: SearchService | None = None
        if s.search:
            self.search, self.pipeline.indexer = open_search(
                s, self.pipeline.bundle, queue_rows=s.index_queue_rows, batch_rows=s.index_batch_rows
            )
        # Health: each downstream deployment answers its cheapest call (stats(): no model run).
        self.readiness = Readiness(
            {"VisionTail": tail.stats.remote, "TextEncoder": text.stats.remote, "Scorer": scorer.stats.remote}
        )
        log.info(
            "ingress for bundle %s (%d blocks), auth %s, redis %s, search %s",
            self.pipeline.bundle_id,
            self.pipeline.num_blocks,
            "on" if self.pipeline.auth.enabled else "off",
            redacted(s.redis_url) or "off",
            redacted(s.pg_url) if s.search else "off",
        )

    async def Classify(self, frame: pb.Frame | Unparsed, grpc_context: Any = None) -> pb.Result:
        empty = pb.Result(frame_id=0 if isinstance(frame, Unparsed) else frame.frame_id)
        try:
            self.pipeline.authenticate(_metadata(grpc_context))
        except errors.ServiceError as e:
            return errors.refuse(grpc_context, e, empty)
        result = await self.pipeline.answer(frame)
        if isinstance(result, errors.ServiceError):
            return errors.refuse(grpc_context, result, empty)
        return result

    async def ClassifyStream(
        self, request_stream: AsyncIterator[pb.Frame], grpc_context: Any = None
    ) -> AsyncIterator[pb.Result]:
        try:
            self.pipeline.authenticate(_metadata(grpc_context))
        except errors.ServiceError as e:
            # Nothing is yielded, so the status must travel with an exception (Serve keeps the code).
            errors.set_status(grpc_context, e)
            raise
        async for result in self.pipeline.stream(request_stream):
            yield result

    async def EncodeText(self, request: pb.TextRequest, grpc_context: Any = None) -> pb.TextResponse:
        return await self._unary(
            "EncodeText", grpc_context, pb.TextResponse(), self.pipeline.encode_text, request
        )

    async def Hello(self, request: pb.HelloRequest, grpc_context: Any = None) -> pb.HelloResponse:
        return await self._unary("Hello", grpc_context, pb.HelloResponse(), self.pipeline.hello, request)

    async def Search(self, request: pb.SearchRequest, grpc_context: Any = None) -> pb.SearchResponse:
        return await self._unary("Search", grpc_context, pb.SearchResponse(), self._search, request)

    async def Upload(self, request: pb.UploadRequest, grpc_context: Any = None) -> pb.UploadResponse:
        return await self._unary("Upload", grpc_context, pb.UploadResponse(), self._upload, request)

    async def _search(self, request: pb.SearchRequest) -> pb.SearchResponse:
        if self.search is None:
            raise errors.precondition(OFF)
        return await self.search.search(request, self.pipeline.query_text, self.pipeline.query_image)

    async def _upload(self, request: pb.UploadRequest) -> pb.UploadResponse:
        if self.search is None:
            raise errors.precondition(OFF)
        return await self.search.upload(request)

    async def Check(self, request: Any, grpc_context: Any = None) -> Any:
        """grpc.health.v1 Check. No token: Kubernetes' gRPC probe sends no metadata."""
        if isinstance(request, Unparsed):
            return errors.refuse(grpc_context, errors.invalid(request.message), HealthCheckResponse())
        try:
            return await self.readiness.check(request.service)
        except UnknownService as e:
            return errors.refuse(grpc_context, errors.not_found(str(e)), HealthCheckResponse())

    async def _unary(
        self, name: str, grpc_context: Any, empty: M, call: Callable[[Any], Awaitable[M]], request: Any
    ) -> M:
        try:
            self.pipeline.authenticate(_metadata(grpc_context))
            if isinstance(request, Unparsed):  # bytes that are no request message (cloud_service.lenient)
                raise errors.invalid(request.message)
            return await call(request)
        except Exception as e:
            err = errors.from_exception(e)
            if err.code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", name)
            return errors.refuse(grpc_context, err, empty)

    # -- for tests and the benchmark (deployment handle only, not on the gRPC API) -----------
    def stats(self) -> dict[str, object]:
        return self.pipeline.stats()

    def reset_stats(self) -> None:
        self.pipeline.reset_stats()

    def clear_memo(self) -> None:
        self.pipeline.clear_memo()

    def __del__(self) -> Awaitable[None] | None:
        """Serve calls this when the replica stops, on the replica's event loop, and awaits a coroutine
        it returns (ray/serve/_private/replica.py: call_destructor, _call_func_or_gen). So the blocking
        part (the indexer writing what it holds for up to 5 s, closing the psycopg connections) goes
        to a worker thread in that coroutine, and the loop keeps answering meanwhile. Not `async def`:
        Python's own finalizer calls __del__ too, later, and a coroutine it made would never run
        (a RuntimeWarning); by then there is nothing left to do and it returns None."""
        if getattr(self, "search", None) is None or getattr(self, "_closing_search", False):
            return None
        self._closing_search = True
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no event loop to keep free (a plain call)
            self._close_search()
            return None
        return asyncio.to_thread(self._close_search)

    def _close_search(self) -> None:
        if self.pipeline.indexer is not None:
            self.pipeline.indexer.close(timeout_s=5.0)
        if self.search is not None:
            self.search.close()


def _metadata(grpc_context: Any) -> list[tuple[str, Any]] | None:
    return None if grpc_context is None else list(grpc_context.invocation_metadata())


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

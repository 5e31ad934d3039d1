"""A small in-process SplitClip gRPC server for the edge unit tests.

It is real gRPC over a real socket and computes real answers (codec.decode + BundleRuntime over
the same bundle), so the edge client, stream window and breaker run for real. It exists for
faults the real Ray Serve cloud cannot produce on demand: an answer held back past the frame
deadline (a late duplicate), a stream cut after N frames, per-frame error results, a server that
stops and comes back on the same port within a test. End-to-end behaviour against the real cloud
is tested in tests/e2e/.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np

from splitclip import codec
from splitclip.constants import ERROR_BUNDLE_MISMATCH as BUNDLE
from splitclip.constants import ERROR_IMAGE_UPLOAD_REFUSED as IMAGE_REFUSED
from splitclip.constants import ERROR_KIND_METADATA_KEY
from splitclip.prompts import prompt_set, score, top_k
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower
from splitclip.wire import pb, pb_grpc


@dataclass
class Faults:
    delay_s: float = 0.0  # before answering each frame
    delay_frames: set[int] = field(default_factory=set)  # only these frame ids are delayed (empty = all)
    cut_stream_after: int | None = None  # abort a stream with UNAVAILABLE once this many are answered
    error_frames: dict[int, str] = field(default_factory=dict)  # frame_id -> error code in the Result
    error_kind: str = ""  # the Error.kind of those error results
    error_message: str = "injected"
    unary_codes: list[grpc.StatusCode] = field(default_factory=list)  # Classify fails with these first
    unary_kind: str = ""  # trailing metadata x-splitclip-error of those failures


class RefCloud(pb_grpc.SplitClipServicer):
    def __init__(
        self,
        bundle_dir,
        *,
        token: str | None = None,
        cloud_bundle_id: str | None = None,
        heartbeat_interval_s: float = 0.0,
        allow_image_upload: bool = True,
    ) -> None:
        self.rt = BundleRuntime(bundle_dir)
        self.rt.warmup()
        self.spec = codec.TensorSpec.from_manifest(self.rt.manifest)
        self.token = token
        self.bundle_id = cloud_bundle_id or self.rt.manifest.bundle_id
        self.faults = Faults()
        self.heartbeat_interval_s = heartbeat_interval_s
        self.allow_image_upload = allow_image_upload
        self.hello_requests: list[pb.HelloRequest] = []
        self.frames = 0
        self.hellos = 0
        self.classify_calls = 0
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, port: int = 0, *, tls: tuple[bytes, bytes] | None = None) -> str:
        """Serve on 127.0.0.1; `tls` = (private key PEM, certificate chain PEM) serves TLS instead."""
        server = grpc.server(futures.ThreadPoolExecutor(8))
        pb_grpc.add_SplitClipServicer_to_server(self, server)
        addr = f"127.0.0.1:{port or self.port}"
        if tls is None:
            self.port = server.add_insecure_port(addr)
        else:
            self.port = server.add_secure_port(addr, grpc.ssl_server_credentials([tls]))
        server.start()
        self._server = server
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    # -- service ---------------------------------------------------------------------------------
    def _auth(self, context: grpc.ServicerContext) -> None:
        if self.token is None:
            return
        md = dict(context.invocation_metadata())
        if md.get("x-splitclip-token") != self.token:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong node token")

    def _answer(self, f: pb.Frame) -> pb.Result:
        if f.frame_id in self.faults.error_frames:
            return pb.Result(
                frame_id=f.frame_id,
                error=pb.Error(
                    code=self.faults.error_frames[f.frame_id],
                    message=self.faults.error_message,
                    kind=self.faults.error_kind,
                ),
            )
        if f.bundle_id != self.bundle_id:
            error = pb.Error(code="FAILED_PRECONDITION", message="the node runs another bundle", kind=BUNDLE)
            return pb.Result(frame_id=f.frame_id, error=error)
        if f.cut == 0 and not self.allow_image_upload:
            error = pb.Error(code="FAILED_PRECONDITION", message="no pixels here", kind=IMAGE_REFUSED)
            return pb.Result(frame_id=f.frame_id, error=error)
        x = codec.decode(f.payload, cut=f.cut, spec=self.spec).array
        emb = Tower(self.rt).finish(x[None], f.cut)[0]  # [embed_dim]
        ps = prompt_set(list(f.prompts), list(f.templates))
        probs = score(
            emb[None], self.rt.encode_text(ps.texts()), ps.n_templates, self.rt.manifest.logit_scale
        )[0]
        best = top_k(probs[None], f.top_k or 5)[0]
        top = [pb.Label(index=i, prompt=f.prompts[i], probability=p) for i, p in best]
        return pb.Result(
            frame_id=f.frame_id, top=top, probabilities=probs.tolist(), bundle_id=self.bundle_id, cut=f.cut
        )

    def _maybe_delay(self, frame_id: int) -> None:
        fl = self.faults
        if fl.delay_s and (not fl.delay_frames or frame_id in fl.delay_frames):
            time.sleep(fl.delay_s)

    def Hello(self, request, context):
        self._auth(context)
        with self._lock:
            self.hellos += 1
            self.hello_requests.append(request)
        return pb.HelloResponse(
            heartbeat_interval_s=self.heartbeat_interval_s,
            accepted=request.bundle_id == self.bundle_id,
            cloud_bundle_id=self.bundle_id,
            num_blocks=self.rt.num_blocks,
            message="" if request.bundle_id == self.bundle_id else "bundle mismatch",
        )

    def EncodeText(self, request, context):
        self._auth(context)
        emb = self.rt.encode_text(list(request.prompts)).astype("<f4")
        return pb.TextResponse(bundle_id=self.bundle_id, dim=emb.shape[1], embeddings=emb.tobytes())

    def Classify(self, request, context):
        self._auth(context)
        with self._lock:
            self.classify_calls += 1
            code = self.faults.unary_codes.pop(0) if self.faults.unary_codes else None
        if code is not None:
            if self.faults.unary_kind:
                context.set_trailing_metadata(((ERROR_KIND_METADATA_KEY, self.faults.unary_kind),))
            context.abort(code, "injected")
        self._maybe_delay(request.frame_id)
        return self._answer(request)

    def ClassifyStream(self, request_iterator, context):
        """Frames are answered concurrently, so results come back out of order (like the real cloud)."""
        self._auth(context)
        out: queue.SimpleQueue = queue.SimpleQueue()
        pool = futures.ThreadPoolExecutor(8)

        def work(f: pb.Frame) -> None:
            self._maybe_delay(f.frame_id)
            out.put(self._answer(f))

        def read() -> None:
            try:
                for n, f in enumerate(request_iterator, start=1):
                    with self._lock:
                        self.frames += 1
                    if self.faults.cut_stream_after is not None and n > self.faults.cut_stream_after:
                        # answer the first N frames before the drop, so what the test counts does not
                        # depend on how fast this machine is; frame N+1 onwards are in flight and lost
                        pool.shutdown(wait=True)
                        out.put(_CUT)
                        return
                    pool.submit(work, f)
            except grpc.RpcError:
                pass
            pool.shutdown(wait=True)
            out.put(_END)

        threading.Thread(target=read, daemon=True).start()
        while (item := out.get()) is not _END:
            if item is _CUT:
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected link drop")
            yield item


_END, _CUT = object(), object()


def probs_close(a: list[float], b: list[float], atol: float = 1e-5) -> bool:
    return bool(np.allclose(np.asarray(a), np.asarray(b), atol=atol))

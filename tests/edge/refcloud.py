"""A small in-process SplitClip gRPC server for the edge unit tests.

It is real gRPC over a real socket and computes real answers (codec.decode + BundleRuntime over
the same bundle), so the edge client, stream window and breaker run for real. It exists for
faults the real Ray Serve cloud cannot produce on demand: an answer held back past the frame
deadline (a late duplicate), a stream cut after N frames, per-frame error results, a server that
stops and comes back on the same port within a test. End-to-end behaviour against the real cloud
is tested in tests/e2e/.

Fault frame ids (`delay_frames`, `error_frames`) count a node's frames from 1: the node's ids start
at the clock (edge_node.tickets.frame_ids), so the n-th frame a node sends here is its number n.

Fleet search: `Upload` and `Search` over an in-memory store keyed like the cloud's (bundle, node,
frame), first write wins; a frame sent with index=True is stored after it is answered, as the cloud
does. `search_on=False` refuses both with FAILED_PRECONDITION; `faults.upload_codes` fails Uploads
before storing, `faults.lose_upload_acks` stores and then fails the call (an acknowledgement lost).
An Upload is checked as the cloud checks it (cloud_service/search/service.py: at most INDEX_MAX_LABELS
labels, texts of at most INDEX_MAX_TEXT_CHARS without NUL) and refused whole with INVALID_ARGUMENT
naming the first bad frame; `faults.refuse_upload_frames` refuses those frame ids the same way (a frame
the real cloud would refuse for a reason a node cannot know about in advance).
"""

from __future__ import annotations

import io
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
from PIL import Image

from splitclip import codec
from splitclip.constants import ERROR_BUNDLE_MISMATCH as BUNDLE
from splitclip.constants import ERROR_IMAGE_UPLOAD_REFUSED as IMAGE_REFUSED
from splitclip.constants import ERROR_KIND_METADATA_KEY, INDEX_MAX_LABELS, INDEX_MAX_TEXT_CHARS
from splitclip.prompts import average_templates, prompt_set, score, top_k
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower, unit
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
    upload_codes: list[grpc.StatusCode] = field(default_factory=list)  # Upload fails with these first
    lose_upload_acks: int = 0  # Uploads that store their rows and then fail with UNAVAILABLE
    refuse_upload_frames: set[int] = field(default_factory=set)  # frame ids whose Upload is INVALID_ARGUMENT
    store_down: str = ""  # set: Search fails as the cloud does while its PostgreSQL is down (UNAVAILABLE)


@dataclass(frozen=True)
class Row:
    """A stored frame of the in-memory search store."""

    node_id: str
    frame_id: int
    captured_at: float
    source: str
    labels: tuple[str, ...]
    embedding: np.ndarray  # float32 [embed_dim], unit
    via: str  # "frame" (indexed after answering) or "upload"


class RefCloud(pb_grpc.SplitClipServicer):
    def __init__(
        self,
        bundle_dir,
        *,
        token: str | None = None,
        cloud_bundle_id: str | None = None,
        heartbeat_interval_s: float = 0.0,
        allow_image_upload: bool = True,
        search_on: bool = True,
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
        self.search_on = search_on
        self.rows: dict[tuple[str, str, int], Row] = {}  # (bundle, node, frame) -> row, in stored order
        self.uploads: list[pb.UploadRequest] = []  # every Upload that reached the store
        self.searches: list[pb.SearchRequest] = []
        self.frame_requests: list[pb.Frame] = []  # every Frame received (unary and stream)
        self._first_id: dict[tuple[str, str], int] = {}  # (peer, node) -> its first frame id seen here
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

    def _number(self, f: pb.Frame, peer: str) -> int:
        """The frame's number among its node's frames (1 = the first this cloud saw of it). Keyed by
        the connection too: two EdgeNodes of one test process have the same default node id."""
        with self._lock:
            first = self._first_id.setdefault((peer, f.node_id), f.frame_id)
        return f.frame_id - first + 1

    def _answer(self, f: pb.Frame, peer: str) -> pb.Result:
        n = self._number(f, peer)
        with self._lock:
            self.frame_requests.append(f)
        if n in self.faults.error_frames:
            return pb.Result(
                frame_id=f.frame_id,
                error=pb.Error(
                    code=self.faults.error_frames[n],
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
        if f.index and self.search_on:
            labels = tuple(f.prompts[i] for i, _ in best)
            row = Row(
                f.node_id, f.frame_id, f.captured_at or time.time(), f.source, labels, unit(emb), "frame"
            )
            self._store(f.bundle_id, [row])
        return pb.Result(
            frame_id=f.frame_id, top=top, probabilities=probs.tolist(), bundle_id=self.bundle_id, cut=f.cut
        )

    def _maybe_delay(self, f: pb.Frame, peer: str) -> None:
        fl = self.faults
        if fl.delay_s and (not fl.delay_frames or self._number(f, peer) in fl.delay_frames):
            time.sleep(fl.delay_s)

    def _store(self, bundle_id: str, rows: list[Row]) -> int:
        """Keep rows not stored yet (first write wins); returns how many were new."""
        new = 0
        with self._lock:
            for r in rows:
                key = (bundle_id, r.node_id, r.frame_id)
                if key not in self.rows:
                    self.rows[key] = r
                    new += 1
        return new

    def stored(self, node_id: str | None = None, via: str | None = None) -> list[Row]:
        with self._lock:
            rows = list(self.rows.values())
        return [
            r for r in rows if (node_id is None or r.node_id == node_id) and (via is None or r.via == via)
        ]

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
        self._maybe_delay(request, context.peer())
        return self._answer(request, context.peer())

    def ClassifyStream(self, request_iterator, context):
        """Frames are answered concurrently, so results come back out of order (like the real cloud)."""
        self._auth(context)
        out: queue.SimpleQueue = queue.SimpleQueue()
        pool = futures.ThreadPoolExecutor(8)
        peer = context.peer()

        def work(f: pb.Frame) -> None:
            self._maybe_delay(f, peer)
            out.put(self._answer(f, peer))

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

    def Upload(self, request, context):
        self._auth(context)
        if not self.search_on:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "search is off on this cloud")
        with self._lock:
            code = self.faults.upload_codes.pop(0) if self.faults.upload_codes else None
        if code is not None:
            context.abort(code, "injected")
        if request.bundle_id != self.bundle_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the node runs another bundle")
        for i, f in enumerate(request.frames):
            problem = self._refusal(f)
            if problem:  # the whole call is refused, as the cloud does
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"frames[{i}] (frame {f.frame_id}): {problem}"
                )
        rows = [
            Row(
                request.node_id,
                f.frame_id,
                f.captured_at,
                f.source,
                tuple(f.labels),
                np.frombuffer(f.embedding, dtype="<f4").copy(),
                "upload",
            )
            for f in request.frames
        ]
        with self._lock:
            self.uploads.append(request)
        new = self._store(request.bundle_id, rows)
        with self._lock:
            lose = self.faults.lose_upload_acks > 0
            self.faults.lose_upload_acks -= int(lose)
        if lose:
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected: stored, acknowledgement lost")
        return pb.UploadResponse(stored=new, duplicates=len(rows) - new)

    def _refusal(self, f: pb.IndexedFrame) -> str:
        """Why the cloud would refuse this frame of an Upload ("" when it would not)."""
        if f.frame_id in self.faults.refuse_upload_frames:
            return "injected refusal"
        if len(f.labels) > INDEX_MAX_LABELS:
            return f"{len(f.labels)} labels, at most {INDEX_MAX_LABELS} allowed"
        for what, text in (("source", f.source), *((f"labels[{j}]", x) for j, x in enumerate(f.labels))):
            if len(text) > INDEX_MAX_TEXT_CHARS:
                return f"{what}: {len(text)} characters, at most {INDEX_MAX_TEXT_CHARS} allowed"
            if "\x00" in text:
                return f"{what}: must not contain NUL characters"
        return ""

    def Search(self, request, context):
        self._auth(context)
        with self._lock:
            self.searches.append(request)
        if not self.search_on:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "search is off on this cloud")
        if self.faults.store_down:  # the words of cloud_service/search/service.py
            message = f"the search store is unavailable, try again later ({self.faults.store_down})"
            context.abort(grpc.StatusCode.UNAVAILABLE, message)
        if bool(request.text) == bool(request.image):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give exactly one of text and image")
        if request.text:
            templates = list(request.templates) or ["{}"]
            texts = [t.format(request.text) for t in templates]
            q = average_templates(self.rt.encode_text(texts), len(templates))[0]  # [embed_dim]
        else:
            img = np.asarray(Image.open(io.BytesIO(request.image)).convert("RGB"))
            q = Tower(self.rt).embed_images(img)[0]
        bundle = request.bundle_id or self.bundle_id
        nodes = set(request.node_ids)
        with self._lock:
            rows = [r for (b, _, _), r in self.rows.items() if b == bundle]
        rows = [
            r
            for r in rows
            if (not nodes or r.node_id in nodes)
            and (not request.since or r.captured_at >= request.since)
            and (not request.until or r.captured_at <= request.until)
            and (not request.label or request.label in r.labels)
        ]
        scored = sorted(((float(r.embedding @ q), r) for r in rows), key=lambda x: -x[0])[: request.k or 10]
        hits = [
            pb.SearchHit(
                node_id=r.node_id,
                frame_id=r.frame_id,
                captured_at=r.captured_at,
                source=r.source,
                score=s,
                labels=list(r.labels),
            )
            for s, r in scored
        ]
        return pb.SearchResponse(bundle_id=bundle, hits=hits)


_END, _CUT = object(), object()


def probs_close(a: list[float], b: list[float], atol: float = 1e-5) -> bool:
    return bool(np.allclose(np.asarray(a), np.asarray(b), atol=atol))

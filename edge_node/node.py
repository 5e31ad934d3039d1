"""`EdgeNode`: classify images in split mode when the cloud is healthy, locally when it is not.

Every frame gets exactly one `EdgeResult`. A frame's fate is decided once, by `Ticket.claim()`:
the cloud's answer, or a local answer after the frame was lost in flight (link drop, deadline,
error result), whichever claims it first; anything later is dropped and counted in `stats`.

Threads: the caller runs the edge stages and sends (or answers locally while the breaker is open);
the stream's threads deliver results and losses; one local worker re-runs lost frames; the health
thread (edge_node/health.py) heartbeats while the breaker is closed and probes while it is open.
What a failure means (reason, breaker action) is edge_node/reasons.py's one mapping.
Each frame's plan (local, or cut + preset) is fixed, or chosen per frame by edge_node/autoplan.py
(cut "auto"), which learns from every answered frame and from the Hellos' round trips.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np

from edge_node.autoplan import PLANNED_LOCAL, Candidate
from edge_node.breaker import CircuitBreaker
from edge_node.client import CloudClient, FrameStream, Lost
from edge_node.health import CloudHealth, log_breaker_change
from edge_node.indexing import NodeIndex
from edge_node.local import LocalEngine, PromptCache
from edge_node.plans import NodePlans, TimedHello
from edge_node.reasons import (
    Breaker,
    Outcome,
    Reason,
    Where,
    base,
    is_refusal,
    local_reason,
    outcome,
    result_outcome,
    rpc_outcome,
)
from edge_node.results import EdgeResult
from edge_node.settings import EdgeSettings
from edge_node.tickets import NodeStats, Ticket, frame_ids, source_name
from splitclip import codec
from splitclip.bundle import Bundle, load_bundle
from splitclip.preprocess import ImageLike
from splitclip.prompts import PromptSet, prompt_set
from splitclip.runtime import BundleRuntime
from splitclip.settings import SettingsError
from splitclip.wire import pb


class EdgeNode:
    """Edge runtime over one bundle. `cloud=None` (and no SPLITCLIP_CLOUD) means local only."""

    def __init__(
        self,
        bundle: str | os.PathLike[str] | Bundle | None = None,
        *,
        cloud: str | None = None,
        settings: EdgeSettings | None = None,
        **overrides: Any,
    ) -> None:
        bundle_path = None if isinstance(bundle, Bundle) or bundle is None else Path(bundle)
        s = settings or EdgeSettings.from_env(bundle=bundle_path, cloud=cloud, **overrides)
        self.settings = s
        if isinstance(bundle, Bundle):
            self.bundle = bundle
        else:
            if s.bundle is None:
                raise SettingsError("no bundle: pass one or set SPLITCLIP_BUNDLE")
            self.bundle = load_bundle(s.bundle)  # verifies every file's sha256
        m = self.bundle.manifest
        self.bundle_id = m.bundle_id
        self.num_blocks = m.num_blocks
        self.cut = s.cut if s.cut is not None else m.num_blocks // 2  # of a fixed plan
        if not 0 <= self.cut <= self.num_blocks:
            raise SettingsError(f"cut must be in 0..{self.num_blocks}, got {self.cut}")
        if self.cut == 0 and s.cloud and not s.allow_image_upload and not s.auto:
            raise SettingsError(
                "cut 0 sends the image itself, which SPLITCLIP_ALLOW_IMAGE_UPLOAD=0 forbids: pick a cut >= 1"
            )
        self.preset = codec.get_preset(s.codec)
        self.spec = codec.TensorSpec.from_manifest(m)
        self.calibration = self.bundle.calibration() if s.auto else None
        if self.preset.needs_calibration and not s.auto:
            self.calibration = self.bundle.calibration()
            if self.calibration is None:
                raise SettingsError(
                    f"codec {self.preset.name} needs calibration.npz, which this bundle lacks"
                )
        self.engine = LocalEngine(BundleRuntime(self.bundle), PromptCache(m.bundle_id))
        fixed = NodePlans(fixed=Candidate(self.cut, self.preset.name, 0.0, 0.0, 0.0, 0.0))
        self.plans = NodePlans.for_node(self.bundle, self.engine.rt, s) if s.auto else fixed
        self.stats = NodeStats()
        self._stats_lock = threading.Lock()
        self._ids = frame_ids()  # from the clock: unique across restarts (fleet search needs it)
        self._closed = threading.Event()
        self._local_worker = ThreadPoolExecutor(1, thread_name_prefix="edge-local")
        self._stream: FrameStream[Ticket] | None = None
        self._stream_lock = threading.Lock()
        self._retired: list[FrameStream[Ticket]] = []
        self.breaker = CircuitBreaker(
            failures=s.breaker_failures,
            probe_interval=s.probe_interval_s,
            probe_max=s.probe_max_s,
            on_change=lambda old, new, why: log_breaker_change(s.cloud, old, new, why),
        )
        self.index = NodeIndex(s, self.bundle_id, self.breaker)  # fleet search, if on: the journal
        self.client: CloudClient | None = None
        self.health: CloudHealth | None = None
        self._pixels_refused: str | None = None  # the cloud said it takes no cut-0 frames: the reason
        if s.cloud:
            self.client = CloudClient(s)
            hellos = TimedHello(self.client, self.plans.hello_rtt) if s.auto else self.client
            self.health = CloudHealth(
                cast(CloudClient, hellos),
                self.breaker,
                s,
                bundle_id=self.bundle_id,
                num_blocks=self.num_blocks,
                embed_dim=m.embed_dim,
                frames_answered=lambda: self.stats.frames,
            )
            self.health.start()
        self.index.start(self.client)  # uploads the journal while the breaker is closed

    # -- public API ------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return "split" if self._sends() else "local"

    @property
    def mode_reason(self) -> str:
        return Reason.CLOUD if self._sends() else self._local_reason()

    def classify(
        self,
        image: ImageLike,
        prompts: Sequence[str],
        *,
        templates: Sequence[str] = (),
        source: str | None = None,
    ) -> EdgeResult:
        """One image, one unary Classify call (with retries inside the frame deadline) or local.
        `templates` such as "a photo of a {}" apply on both sides (splitclip.prompts)."""
        prompt_set = self._check_prompts(prompts, templates)
        sink: queue.SimpleQueue[EdgeResult] = queue.SimpleQueue()
        t = Ticket(next(self._ids), source or source_name(image), prompt_set, sink)
        client = self.client
        if client is None or not self._sends():
            self._answer_locally(t, image, self._local_reason())
            return sink.get()
        frame = self._prepare_frame(t, image)
        if frame is None:
            return sink.get()
        t.sent_at = time.perf_counter()
        try:
            res = client.classify(frame, self.settings.frame_deadline_s)
        except grpc.RpcError as e:
            self._lost(t, rpc_outcome(e, Where.UNARY))
        else:
            self._on_result(t, res)
        return sink.get()

    def classify_many(
        self,
        images: Iterable[ImageLike],
        prompts: Sequence[str],
        *,
        templates: Sequence[str] = (),
        sources: Iterable[str] | None = None,
    ) -> Iterator[EdgeResult]:
        """Many images over the bidi stream (at most `window` in flight). Yields one result per image,
        in completion order (match them by `frame_id` / `source`)."""
        prompt_set = self._check_prompts(prompts, templates)
        sink: queue.SimpleQueue[EdgeResult] = queue.SimpleQueue()
        names = iter(sources) if sources is not None else None
        sent = done = 0
        for image in images:
            source = next(names) if names is not None else source_name(image)
            t = Ticket(next(self._ids), source, prompt_set, sink)
            sent += 1
            self._dispatch(t, image)
            while True:
                try:
                    r = sink.get_nowait()
                except queue.Empty:
                    break
                done += 1
                yield r
        while done < sent:
            yield sink.get()
            done += 1

    def prompt_embeddings(self, prompts: Sequence[str], templates: Sequence[str] = ()) -> np.ndarray:
        """Normalised label embeddings [n_labels, embed_dim] from the local cache (filled on first use)."""
        return self.engine.text(self._check_prompts(prompts, templates))

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.breaker.notify()
        with self._stream_lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close(timeout=self.settings.frame_deadline_s)
            self._track(stream)
        self._local_worker.shutdown(wait=True)
        with self._stats_lock:
            retired, self._retired = self._retired, []
        for old in retired:  # streams dropped earlier may still be winding down
            old.abort("node closed")
            old.join(timeout=5)
        if self.health is not None:
            self.health.close()
        self.index.close()
        if self.client is not None:
            self.client.close()

    def __enter__(self) -> EdgeNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- dispatch --------------------------------------------------------------------------------
    def _check_prompts(self, prompts: Sequence[str], templates: Sequence[str]) -> PromptSet:
        checked = prompt_set(prompts, templates)
        if self.health is not None:
            self.health.warm_prompts(checked, self.engine.prompts)
        return checked

    def _dispatch(self, t: Ticket, image: ImageLike) -> None:
        if not self._sends():
            self._answer_locally(t, image, self._local_reason())
            return
        frame = self._prepare_frame(t, image)
        if frame is None:
            return
        stream = self._current_stream()
        t.sent_at = time.perf_counter()
        if stream is None:  # the breaker opened meanwhile
            t.bytes_sent = 0
            self._rerun_locally(t, self._local_reason())
        elif not stream.submit(frame, t):  # the stream died before the frame went out
            t.bytes_sent = 0
            self._on_stream_lost(t, stream.failure or Lost("stream closed"))

    def _prepare_frame(self, t: Ticket, image: ImageLike) -> pb.Frame | None:
        """Its plan's edge stages + codec; None when answered here instead (a local plan, a bad image)."""
        plan = self.plans.next()
        if plan.cut is None:
            self._answer_locally(t, image, PLANNED_LOCAL)
            return None
        t.cut, t.codec, t.plan = plan.cut, plan.preset, plan.label
        try:
            t.prepared = self.engine.prepare(image, plan.cut, plan.edge)
            t0 = time.perf_counter()
            payload = codec.encode(
                t.prepared.wire,
                cut=plan.cut,
                spec=self.spec,
                preset=codec.get_preset(plan.preset),
                calibration=self.calibration,
            )
            t.prepared.timings_ms["encode"] = (time.perf_counter() - t0) * 1e3
        except Exception as e:
            self._deliver(t, t.error_result(e))
            return None
        t.bytes_sent = len(payload)
        frame = pb.Frame(
            node_id=self.settings.node_id,
            frame_id=t.frame_id,
            bundle_id=self.bundle_id,
            cut=plan.cut,
            codec=plan.preset,
            payload=payload,
            prompts=t.prompts.labels,
            templates=t.prompts.templates,
            top_k=self.settings.top_k,
            **self.index.fields(t),
        )
        t.frame_bytes = frame.ByteSize()
        return frame

    def _current_stream(self) -> FrameStream[Ticket] | None:
        with self._stream_lock:
            if self._closed.is_set():  # never open a stream that close() would not see
                return None
            if self._stream is not None and not self._stream.alive:
                self._track(self._stream)
                self._stream = None
            if self._stream is None and self.client is not None and self.breaker.allow():
                self._stream = self.client.open_stream(
                    on_result=self._on_result, on_lost=self._on_stream_lost, on_late=self._count_late
                )
            return self._stream

    def _track(self, stream: FrameStream[Ticket]) -> None:
        """Remember a stream we let go of until its threads are gone, so close() can wait for it."""
        with self._stats_lock:
            self._retired = [r for r in self._retired if r.alive or r.threads_running]
            if stream not in self._retired:
                self._retired.append(stream)

    def _count_late(self) -> None:
        """A cloud answer came after its frame was answered otherwise (counted as it happens)."""
        with self._stats_lock:
            self.stats.late_dropped += 1

    # -- answers ---------------------------------------------------------------------------------
    def _on_result(self, t: Ticket, res: pb.Result) -> None:
        """A Result from the cloud (stream thread or caller)."""
        if res.HasField("error") and res.error.code:
            self._lost(t, result_outcome(res.error))
            return
        self.breaker.record_success()
        assert t.cut is not None and t.codec is not None  # set with the frame
        wall_ms = (time.perf_counter() - t.sent_at) * 1e3
        self.plans.answered(t.cut, t.bytes_sent, t.frame_bytes, wall_ms, dict(res.timings_ms))
        self._deliver(t, t.split_result(res, cut=t.cut, codec=t.codec))

    def _on_stream_lost(self, t: Ticket, lost: Lost) -> None:
        o = outcome(lost.code, lost.why, where=Where.STREAM, kind=lost.kind)
        if not self.breaker.allow() and is_refusal(self.breaker.reason):
            # in flight on the stream a refusal just dropped: the refusal is the reason, not the link
            o = Outcome(self.breaker.reason, Breaker.NONE)
        self._lost(t, o)

    def _lost(self, t: Ticket, o: Outcome) -> None:
        """The cloud did not answer this frame: tell the breaker what `o` means, answer locally."""
        if base(o.reason) == Reason.DEADLINE and t.cut is not None:  # took at least this long
            self.plans.answered(
                t.cut, t.bytes_sent, t.frame_bytes, (time.perf_counter() - t.sent_at) * 1e3, {}
            )
        if base(o.reason) == Reason.IMAGE_UPLOAD_REFUSED:
            # the cloud is fine but will refuse every cut-0 frame: a planner stops choosing cut 0, a
            # fixed cut-0 node stays local for good, no probing
            if not self.plans.forbid_cut(0):
                self._pixels_refused = o.reason
        elif o.breaker is Breaker.TRIP:
            self.breaker.trip(o.reason)
        elif o.breaker is Breaker.FAILURE:
            self.breaker.record_failure(o.reason)
        if not self.breaker.allow():
            self._drop_stream("breaker open")
        self._rerun_locally(t, o.reason)

    def _drop_stream(self, why: str) -> None:
        with self._stream_lock:
            stream, self._stream = self._stream, None
            if stream is not None:
                self._track(stream)  # under the lock: a close() right now must see it
        if stream is not None:
            # on a stream thread: abort from another thread so we never join ourselves
            threading.Thread(target=self._abort_stream, args=(stream, why), daemon=True).start()

    def _abort_stream(self, stream: FrameStream[Ticket], why: str) -> None:
        stream.abort(why)
        self._track(stream)

    def _rerun_locally(self, t: Ticket, reason: str) -> None:
        """Finish a frame whose edge stages already ran, on the local worker (never a stream thread)."""
        try:
            self._local_worker.submit(self._finish_locally, t, reason)
        except RuntimeError:  # the worker is shut down (node closing): answer on this thread
            self._finish_locally(t, reason)

    def _finish_locally(self, t: Ticket, reason: str) -> None:
        try:
            assert t.prepared is not None
            self._deliver(t, self._local_result(t, self.engine.finish(t.prepared), reason))
        except Exception as e:
            self._deliver(t, t.error_result(e))

    def _answer_locally(self, t: Ticket, image: ImageLike, reason: str) -> None:
        """Full local inference on the caller's thread: all vision stages, head, cached text, scores."""
        try:
            t.prepared = self.engine.prepare(image, self.num_blocks)  # wire = the embedding
            self._deliver(t, self._local_result(t, t.prepared.wire, reason))
        except Exception as e:
            self._deliver(t, t.error_result(e))

    def _local_result(self, t: Ticket, image_emb: np.ndarray, reason: str) -> EdgeResult:
        probs = self.engine.score(image_emb, t.prompts)  # [n_labels]
        t.embedding = image_emb  # [embed_dim], for the journal (fleet search)
        return t.local_result(probs, reason, k=self.settings.top_k, cut=t.cut, codec=t.codec)

    def _deliver(self, t: Ticket, r: EdgeResult) -> None:
        if not t.claim():
            self._count_late()
            return
        with self._stats_lock:
            self.stats.count(r)
        self.index.answered(t, r)  # before the caller has it: a local answer is journalled by then
        t.sink.put(r)

    def _sends(self) -> bool:
        """Do frames go to the cloud now?"""
        return self.client is not None and self.breaker.allow() and self._pixels_refused is None

    def _local_reason(self) -> str:
        if self._pixels_refused is not None and self.client is not None:
            return self._pixels_refused
        return local_reason(self.breaker.reason, has_cloud=self.client is not None)

"""`EdgeNode`: classify images in split mode when the cloud is healthy, locally when it is not.

Every frame gets exactly one `EdgeResult`. A frame's fate is decided once, by `_Ticket.claim()`:
the cloud's answer, or a local answer after the frame was lost in flight (link drop, deadline,
error result), whichever claims it first; anything later is dropped and counted in `stats`.

Threads: the caller runs the edge stages and sends (or answers locally while the breaker is open);
the stream's threads deliver results and losses; one local worker re-runs lost frames; a prober
says Hello to the cloud while the breaker is open and closes it when the cloud answers.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edge_node.breaker import CircuitBreaker, State
from edge_node.client import CloudClient, FrameStream
from edge_node.local import LocalEngine, Prepared, PromptCache, top_labels
from edge_node.results import EdgeResult, Reason
from edge_node.retry import TRANSIENT_NAMES
from edge_node.settings import EdgeSettings
from splitclip import codec
from splitclip.bundle import Bundle, load_bundle
from splitclip.preprocess import ImageLike
from splitclip.prompts import PromptSet, prompt_set
from splitclip.runtime import BundleRuntime
from splitclip.wire import pb

log = logging.getLogger("splitclip.edge")

VERSION = "0.1.0"
_REFUSALS = (Reason.BUNDLE_MISMATCH, Reason.UNAUTHENTICATED, Reason.REJECTED)  # not fixed by waiting


@dataclass
class NodeStats:
    frames: int = 0
    split: int = 0
    local: int = 0
    errors: int = 0
    bytes_sent: int = 0
    late_dropped: int = 0  # cloud answers that arrived after the frame was answered locally
    by_reason: Counter[str] = field(default_factory=Counter)


class _Ticket:
    """One frame on its way to an answer."""

    def __init__(self, frame_id: int, source: str, prompts: PromptSet, sink: queue.SimpleQueue) -> None:
        self.frame_id = frame_id
        self.source = source
        self.prompts = prompts
        self.sink = sink  # where its one EdgeResult goes
        self.t0 = time.perf_counter()
        self.prepared: Prepared | None = None
        self.bytes_sent = 0
        self._claimed = False
        self._lock = threading.Lock()

    def claim(self) -> bool:
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3


def _base_reason(reason: str) -> str:
    return reason.split(":", 1)[0]


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
                raise ValueError("no bundle: pass one or set SPLITCLIP_BUNDLE")
            self.bundle = load_bundle(s.bundle)  # verifies every file's sha256
        m = self.bundle.manifest
        self.bundle_id = m.bundle_id
        self.num_blocks = m.num_blocks
        self.cut = s.cut if s.cut is not None else int(m.extra.get("cut", m.num_blocks // 2))  # type: ignore[call-overload]
        if not 0 <= self.cut <= self.num_blocks:
            raise ValueError(f"cut must be in 0..{self.num_blocks}, got {self.cut}")
        self.preset = codec.get_preset(s.codec)
        self.spec = codec.TensorSpec.from_manifest(m)
        self.calibration = None
        if self.preset.needs_calibration:
            if not self.bundle.has("calibration.npz"):
                raise ValueError(f"codec {self.preset.name} needs calibration.npz, which this bundle lacks")
            self.calibration = codec.Calibration.load(self.bundle.path("calibration.npz"))
        self.engine = LocalEngine(BundleRuntime(self.bundle), PromptCache(m.bundle_id))
        self.stats = NodeStats()
        self._stats_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = threading.Event()
        self._local_worker = ThreadPoolExecutor(1, thread_name_prefix="edge-local")
        self._stream: FrameStream[_Ticket] | None = None
        self._stream_lock = threading.Lock()
        self._retired_late = 0
        self._retired: list[FrameStream[_Ticket]] = []
        self.breaker = CircuitBreaker(
            failures=s.breaker_failures,
            probe_interval=s.probe_interval_s,
            probe_max=s.probe_max_s,
            on_change=self._on_breaker_change,
        )
        self.client: CloudClient | None = None
        self._prober: threading.Thread | None = None
        self._last_hello_reason = ""
        if s.cloud:
            self.client = CloudClient(s)
            ok, reason = self._hello()
            if not ok:
                self.breaker.trip(reason)
            self._prober = threading.Thread(target=self._probe_loop, name="edge-prober", daemon=True)
            self._prober.start()

    # -- public API ------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return "split" if self.client is not None and self.breaker.allow() else "local"

    @property
    def mode_reason(self) -> str:
        if self.client is None:
            return Reason.NO_CLOUD
        return Reason.CLOUD if self.breaker.allow() else self.breaker.reason

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
        t = _Ticket(next(self._ids), source or _name(image), prompt_set, sink)
        client = self.client
        if client is None or not self.breaker.allow():
            self._answer_locally(t, image, self._local_reason())
            return sink.get()
        frame = self._prepare_frame(t, image)
        if frame is None:
            return sink.get()
        try:
            res = client.classify(frame, self.settings.frame_deadline_s)
        except grpc.RpcError as e:
            self._lost(t, _unary_reason(e), e.code())
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
            source = next(names) if names is not None else _name(image)
            t = _Ticket(next(self._ids), source, prompt_set, sink)
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
            self._retire(stream)
        self._local_worker.shutdown(wait=True)
        with self._stats_lock:
            retired, self._retired = self._retired, []
        for old in retired:  # streams dropped earlier may still be winding down
            old.abort("node closed")
            old.join(timeout=5)
        if self._prober is not None:
            self._prober.join(timeout=5)
        if self.client is not None:
            self.client.close()

    def __enter__(self) -> EdgeNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- dispatch --------------------------------------------------------------------------------
    def _check_prompts(self, prompts: Sequence[str], templates: Sequence[str]) -> PromptSet:
        checked = prompt_set(prompts, templates)
        self._warm_prompts(checked)
        return checked

    def _dispatch(self, t: _Ticket, image: ImageLike) -> None:
        if self.client is None or not self.breaker.allow():
            self._answer_locally(t, image, self._local_reason())
            return
        frame = self._prepare_frame(t, image)
        if frame is None:
            return
        stream = self._current_stream()
        if stream is None:  # the breaker opened meanwhile
            t.bytes_sent = 0
            self._rerun_locally(t, self._local_reason())
        elif not stream.submit(frame, t):  # the stream died before the frame went out
            t.bytes_sent = 0
            self._on_stream_lost(t, stream.failure or "stream closed", stream.failure_code)

    def _prepare_frame(self, t: _Ticket, image: ImageLike) -> pb.Frame | None:
        """Edge stages + codec for split mode; on a bad image the ticket is answered with an error."""
        try:
            t.prepared = self.engine.prepare(image, self.cut)
            t0 = time.perf_counter()
            payload = codec.encode(
                t.prepared.wire,
                cut=self.cut,
                spec=self.spec,
                preset=self.preset,
                calibration=self.calibration,
            )
            t.prepared.timings_ms["encode"] = (time.perf_counter() - t0) * 1e3
        except Exception as e:
            self._deliver(t, self._error_result(t, e))
            return None
        t.bytes_sent = len(payload)
        return pb.Frame(
            node_id=self.settings.node_id,
            frame_id=t.frame_id,
            bundle_id=self.bundle_id,
            cut=self.cut,
            codec=self.preset.name,
            payload=payload,
            prompts=t.prompts.labels,
            templates=t.prompts.templates,
            top_k=self.settings.top_k,
        )

    def _current_stream(self) -> FrameStream[_Ticket] | None:
        with self._stream_lock:
            if self._closed.is_set():  # never open a stream that close() would not see
                return None
            if self._stream is not None and not self._stream.alive:
                self._retire(self._stream)
                self._stream = None
            if self._stream is None and self.client is not None and self.breaker.allow():
                self._stream = self.client.open_stream(
                    on_result=self._on_result, on_lost=self._on_stream_lost
                )
            return self._stream

    def _track(self, stream: FrameStream[_Ticket]) -> None:
        """Remember a stream we let go of until its threads are gone, so close() can wait for it."""
        with self._stats_lock:
            self._retired = [r for r in self._retired if r.alive or r.threads_running]
            if stream not in self._retired:
                self._retired.append(stream)

    def _retire(self, stream: FrameStream[_Ticket]) -> None:
        self._track(stream)
        with self._stats_lock:
            self._retired_late += stream.late
            self.stats.late_dropped = self._retired_late

    # -- answers ---------------------------------------------------------------------------------
    def _on_result(self, t: _Ticket, res: pb.Result) -> None:
        """A Result from the cloud (stream thread or caller)."""
        if res.HasField("error") and res.error.code:
            code = res.error.code
            reason = f"{Reason.CLOUD_ERROR}: {code} {res.error.message}"
            if code == "FAILED_PRECONDITION" and "bundle" in res.error.message.lower():
                self.breaker.trip(f"{Reason.BUNDLE_MISMATCH}: {res.error.message}")
            elif code == "UNAUTHENTICATED":
                self.breaker.trip(f"{Reason.UNAUTHENTICATED}: {res.error.message}")
            elif code in TRANSIENT_NAMES:
                self.breaker.record_failure(reason)
            self._rerun_locally(t, reason)
            return
        self.breaker.record_success()
        labels = [lab.prompt for lab in res.top]
        probs = [float(lab.probability) for lab in res.top]
        prepared = t.prepared
        timings = dict(prepared.timings_ms) if prepared else {}
        timings.update({f"cloud_{k}": float(v) for k, v in res.timings_ms.items()})
        result = EdgeResult(
            frame_id=t.frame_id,
            source=t.source,
            mode="split",
            reason=Reason.CLOUD,
            labels=labels,
            top_probs=probs,
            probabilities=[float(p) for p in res.probabilities],
            bytes_sent=t.bytes_sent,
            latency_ms=t.elapsed_ms(),
            cut=self.cut,
            codec=self.preset.name,
            timings_ms=timings,
        )
        self._deliver(t, result)

    def _on_stream_lost(self, t: _Ticket, why: str, code: grpc.StatusCode | None) -> None:
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            self._lost(t, Reason.DEADLINE, code)
        elif code is grpc.StatusCode.UNAUTHENTICATED:
            self._lost(t, f"{Reason.UNAUTHENTICATED}: {why}", code)
        else:
            self._lost(t, f"{Reason.LINK_LOST}: {why}", code)

    def _lost(self, t: _Ticket, reason: str, code: grpc.StatusCode | None) -> None:
        """The cloud did not answer this frame: count it against the breaker and answer locally."""
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION):
            self.breaker.trip(reason)
        else:
            self.breaker.record_failure(reason)
        if not self.breaker.allow():
            self._drop_stream("breaker open")
        self._rerun_locally(t, reason)

    def _drop_stream(self, why: str) -> None:
        with self._stream_lock:
            stream, self._stream = self._stream, None
            if stream is not None:
                self._track(stream)  # under the lock: a close() right now must see it
        if stream is not None:
            # on a stream thread: abort from another thread so we never join ourselves
            threading.Thread(target=self._abort_stream, args=(stream, why), daemon=True).start()

    def _abort_stream(self, stream: FrameStream[_Ticket], why: str) -> None:
        stream.abort(why)
        self._retire(stream)

    def _rerun_locally(self, t: _Ticket, reason: str) -> None:
        """Finish a frame whose edge stages already ran, on the local worker (never a stream thread)."""
        try:
            self._local_worker.submit(self._finish_locally, t, reason)
        except RuntimeError:  # the worker is shut down (node closing): answer on this thread
            self._finish_locally(t, reason)

    def _finish_locally(self, t: _Ticket, reason: str) -> None:
        try:
            assert t.prepared is not None
            self._deliver(t, self._local_result(t, self.engine.finish(t.prepared), reason))
        except Exception as e:
            self._deliver(t, self._error_result(t, e))

    def _answer_locally(self, t: _Ticket, image: ImageLike, reason: str) -> None:
        """Full local inference on the caller's thread: all vision stages, head, cached text, scores."""
        try:
            t.prepared = self.engine.prepare(image, self.num_blocks)  # wire = the embedding
            self._deliver(t, self._local_result(t, t.prepared.wire, reason))
        except Exception as e:
            self._deliver(t, self._error_result(t, e))

    def _local_result(self, t: _Ticket, image_emb: np.ndarray, reason: str) -> EdgeResult:
        probs = self.engine.score(image_emb, t.prompts)  # [n_prompts]
        labels, top = top_labels(probs, t.prompts.labels, self.settings.top_k)
        return EdgeResult(
            frame_id=t.frame_id,
            source=t.source,
            mode="local",
            reason=reason,
            labels=labels,
            top_probs=top,
            probabilities=[float(p) for p in probs],
            bytes_sent=t.bytes_sent,
            latency_ms=t.elapsed_ms(),
            cut=self.cut if t.bytes_sent else None,
            codec=self.preset.name if t.bytes_sent else None,
            timings_ms=dict(t.prepared.timings_ms) if t.prepared else {},
        )

    def _error_result(self, t: _Ticket, e: Exception) -> EdgeResult:
        return EdgeResult(
            frame_id=t.frame_id,
            source=t.source,
            mode="local",
            reason=Reason.ERROR,
            error=f"{type(e).__name__}: {e}",
            bytes_sent=t.bytes_sent,
            latency_ms=t.elapsed_ms(),
        )

    def _deliver(self, t: _Ticket, r: EdgeResult) -> None:
        if not t.claim():
            with self._stats_lock:
                self.stats.late_dropped += 1
            return
        with self._stats_lock:
            st = self.stats
            st.frames += 1
            st.bytes_sent += r.bytes_sent
            st.by_reason[_base_reason(r.reason)] += 1
            if r.error is not None:
                st.errors += 1
            elif r.mode == "split":
                st.split += 1
            else:
                st.local += 1
        t.sink.put(r)

    def _local_reason(self, default: str = Reason.BREAKER_OPEN) -> str:
        if self.client is None:
            return Reason.NO_CLOUD
        why = self.breaker.reason
        if not why:
            return default
        base = _base_reason(why)
        if base in _REFUSALS:
            return why
        return f"{Reason.BREAKER_OPEN}: {why}"

    # -- hello, prompts and probes ---------------------------------------------------------------
    def _hello(self) -> tuple[bool, str]:
        """Say Hello; (True, "") when the cloud accepts this node and runs our bundle."""
        assert self.client is not None
        req = pb.HelloRequest(
            node_id=self.settings.node_id,
            bundle_id=self.bundle_id,
            codecs=list(codec.PRESETS),
            cuts=list(range(self.num_blocks + 1)),
            version=VERSION,
        )
        try:
            resp = self.client.hello(req, self.settings.hello_timeout_s)
        except grpc.RpcError as e:
            code = e.code()
            if code is grpc.StatusCode.UNAUTHENTICATED:
                reason = f"{Reason.UNAUTHENTICATED}: {e.details()}"
            elif code is grpc.StatusCode.FAILED_PRECONDITION:
                reason = f"{Reason.BUNDLE_MISMATCH}: {e.details()}"
            else:
                reason = f"hello failed: {_status_reason(e)}"
            self._log_hello(reason)
            return False, reason
        if resp.cloud_bundle_id and resp.cloud_bundle_id != self.bundle_id:
            reason = f"{Reason.BUNDLE_MISMATCH}: cloud runs {resp.cloud_bundle_id}, this node runs {self.bundle_id}"
            self._log_hello(reason)
            return False, reason
        if not resp.accepted:
            reason = f"{Reason.REJECTED}: {resp.message or 'Hello not accepted'}"
            self._log_hello(reason)
            return False, reason
        self._last_hello_reason = ""
        return True, ""

    def _log_hello(self, reason: str) -> None:
        if reason != self._last_hello_reason:  # once per distinct reason, not once per probe
            self._last_hello_reason = reason
            base = _base_reason(reason)
            level = (
                logging.WARNING if base in (Reason.BUNDLE_MISMATCH, Reason.UNAUTHENTICATED) else logging.INFO
            )
            log.log(level, "cloud %s not usable (%s): answering locally", self.settings.cloud, reason)

    def _probe_loop(self) -> None:
        while not self._closed.is_set():
            wait = self.breaker.seconds_to_probe()
            if wait is None or wait > 0:
                self.breaker.wait_change(min(wait if wait is not None else 1.0, 1.0))
                continue
            if not self.breaker.try_probe():
                continue
            ok, reason = self._hello()
            if ok:
                self.breaker.probe_succeeded()
            else:
                self.breaker.probe_failed(reason)

    def _warm_prompts(self, prompts: PromptSet) -> None:
        """Fill the local prompt cache from the cloud's EncodeText while it is reachable (same bundle,
        checked by Hello); otherwise the local text tower fills it on first local use."""
        if (
            self.client is None
            or not self.breaker.allow()
            or self.engine.prompts.get(prompts.key()) is not None
        ):
            return
        try:
            resp = self.client.encode_text(
                pb.TextRequest(
                    node_id=self.settings.node_id,
                    bundle_id=self.bundle_id,
                    prompts=prompts.labels,
                    templates=prompts.templates,
                ),
                self.settings.hello_timeout_s,
            )
        except grpc.RpcError as e:
            log.info("EncodeText failed (%s); prompt embeddings will be computed locally", _status_reason(e))
            return
        if resp.bundle_id != self.bundle_id or resp.dim != self.bundle.manifest.embed_dim:
            return
        emb = np.frombuffer(resp.embeddings, dtype="<f4").reshape(len(prompts.labels), resp.dim)  # [n, dim]
        self.engine.prompts.put(prompts.key(), emb)

    def _on_breaker_change(self, old: State, new: State, reason: str) -> None:
        if new is State.OPEN and old is State.CLOSED:
            # a refused node or another bundle was already logged once by _hello
            level = logging.INFO if _base_reason(reason) in _REFUSALS else logging.WARNING
            log.log(level, "cloud %s: circuit open (%s); answering locally", self.settings.cloud, reason)
        elif new is State.CLOSED:
            log.warning("cloud %s: circuit closed; back to split mode", self.settings.cloud)


def _status_reason(e: grpc.RpcError) -> str:
    code = e.code()
    name = code.name if code is not None else "UNKNOWN"
    return f"{name}: {e.details()}"


def _unary_reason(e: grpc.RpcError) -> str:
    code = e.code()
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return Reason.DEADLINE
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return f"{Reason.UNAUTHENTICATED}: {e.details()}"
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return f"{Reason.BUNDLE_MISMATCH}: {e.details()}"
    if code is not None and code.name in TRANSIENT_NAMES:
        return f"{Reason.LINK_LOST}: {_status_reason(e)}"
    return f"{Reason.CLOUD_ERROR}: {_status_reason(e)}"


def _name(image: ImageLike) -> str:
    if isinstance(image, str | Path):
        return str(image)
    return type(image).__name__

"""The one gRPC channel to the cloud: unary calls with retries, and a bidi stream with a bounded window.

The channel carries keepalive pings (so a silently dead link is noticed), a short reconnect backoff
cap (grpc's default grows to 120 s, which would keep a recovered cloud unused for minutes), the
node token as `x-splitclip-token` metadata, and TLS credentials when a CA is configured.

`FrameStream` keeps at most `window` frames in flight on one ClassifyStream call. Each in-flight frame
has a deadline; exactly one of three things answers it, decided under one lock: its Result, its
deadline passing, or the stream failing. A Result arriving after the other two is dropped and counted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from edge_node.reasons import error_kind
from edge_node.retry import call_with_retry
from edge_node.settings import EdgeSettings
from splitclip.constants import TOKEN_METADATA_KEY
from splitclip.settings import SettingsError
from splitclip.wire import pb, pb_grpc

log = logging.getLogger("splitclip.edge")

T = TypeVar("T")  # the caller's per-frame handle, passed back in callbacks


def channel_options(s: EdgeSettings) -> list[tuple[str, Any]]:
    return [
        ("grpc.keepalive_time_ms", int(s.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(max(1.0, min(s.keepalive_s, 10.0)) * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", int(s.reconnect_backoff_max_s * 1000)),
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.enable_retries", 0),  # retries are ours (retry.py), inside each frame's deadline
    ]


def channel_credentials(s: EdgeSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials of the channel, or None for an insecure one (no SPLITCLIP_TLS_CA).

    A configured CA file that is missing is a SettingsError, unless SPLITCLIP_TLS_CA_OPTIONAL says it
    is an optional mount (the edge DaemonSet's TLS Secret): then TLS trusting the system's CAs, with
    one warning. Never plaintext in its place: that would send the node token in clear to a TLS port.
    """
    if s.tls_ca is None:
        return None
    if s.tls_ca.is_file():
        return grpc.ssl_channel_credentials(root_certificates=s.tls_ca.read_bytes())
    if not s.tls_ca_optional:
        raise SettingsError(
            f"SPLITCLIP_TLS_CA={str(s.tls_ca)!r} is not a file "
            "(set SPLITCLIP_TLS_CA_OPTIONAL=true if it may be absent)"
        )
    log.warning(
        "TLS CA %s is absent (SPLITCLIP_TLS_CA_OPTIONAL): TLS to %s trusting the system's CAs; "
        "if they do not trust its certificate, this node answers locally",
        s.tls_ca,
        s.cloud,
    )
    return grpc.ssl_channel_credentials()


def make_channel(s: EdgeSettings) -> grpc.Channel:
    assert s.cloud is not None
    options = channel_options(s)
    creds = channel_credentials(s)
    if creds is None:
        return grpc.insecure_channel(s.cloud, options=options)
    if s.tls_server_name:
        options.append(("grpc.ssl_target_name_override", s.tls_server_name))
    return grpc.secure_channel(s.cloud, creds, options=options)


class CloudClient:
    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.channel = make_channel(settings)
        self.stub = pb_grpc.SplitClipStub(self.channel)
        token = settings.node_token
        self.metadata: tuple[tuple[str, str], ...] = ((TOKEN_METADATA_KEY, token),) if token else ()

    def _retrying(self, fn: Callable[[float], T], timeout: float) -> T:
        s = self.settings
        return call_with_retry(
            fn,
            deadline=time.monotonic() + timeout,
            attempts=s.retry_attempts,
            backoff=s.retry_backoff_s,
            backoff_max=s.retry_backoff_max_s,
        )

    def hello(self, req: pb.HelloRequest, timeout: float) -> pb.HelloResponse:
        # No retries: a probe that fails is simply tried again later by the prober.
        return self.stub.Hello(req, timeout=timeout, metadata=self.metadata)

    def encode_text(self, req: pb.TextRequest, timeout: float) -> pb.TextResponse:
        return self._retrying(lambda t: self.stub.EncodeText(req, timeout=t, metadata=self.metadata), timeout)

    def classify(self, frame: pb.Frame, timeout: float) -> pb.Result:
        return self._retrying(lambda t: self.stub.Classify(frame, timeout=t, metadata=self.metadata), timeout)

    def upload(self, req: pb.UploadRequest, timeout: float) -> pb.UploadResponse:
        """Journal frames to the fleet-search store; retried on transient statuses (the store is
        idempotent on bundle, node and frame, so a retry of a call that did store is harmless)."""
        return self._retrying(lambda t: self.stub.Upload(req, timeout=t, metadata=self.metadata), timeout)

    def search(self, req: pb.SearchRequest, timeout: float) -> pb.SearchResponse:
        return self._retrying(lambda t: self.stub.Search(req, timeout=t, metadata=self.metadata), timeout)

    def open_stream(
        self,
        *,
        on_result: Callable[[T, pb.Result], None],
        on_lost: Callable[[T, Lost], None],
        on_late: Callable[[], None] | None = None,
    ) -> FrameStream[T]:
        return FrameStream(
            self, self.settings.window, self.settings.frame_deadline_s, on_result, on_lost, on_late
        )

    def close(self) -> None:
        self.channel.close()


@dataclass(frozen=True)
class Lost:
    """Why an in-flight frame got no Result: its deadline, or the stream's end (status, kind)."""

    why: str
    code: grpc.StatusCode | None = None
    kind: str = ""  # the structured error kind in the stream's trailing metadata, if any


DEADLINE = Lost("deadline", grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class _InFlight(Generic[T]):
    handle: T
    deadline: float  # time.monotonic() value


class FrameStream(Generic[T]):
    """One ClassifyStream call. `submit` blocks while `window` frames are in flight; callbacks run on
    the stream's threads and must be quick (hand the work to another thread)."""

    _END = object()

    def __init__(
        self,
        client: CloudClient,
        window: int,
        deadline_s: float,
        on_result: Callable[[T, pb.Result], None],
        on_lost: Callable[[T, Lost], None],
        on_late: Callable[[], None] | None = None,
    ) -> None:
        self._window = threading.Semaphore(window)
        self._deadline_s = deadline_s
        self._on_result = on_result
        self._on_lost = on_lost
        self._on_late = on_late
        self._lock = threading.Lock()
        self._pending: dict[int, _InFlight[T]] = {}  # frame_id -> in-flight frame
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._dead = threading.Event()
        self.failure: Lost | None = None  # why the stream ended, once it has
        self.late = 0  # results that arrived after their frame was answered otherwise
        self.sent = 0
        self.max_in_flight = 0  # the most frames ever in flight at once (<= window)
        self._call = client.stub.ClassifyStream(self._request_iter(), metadata=client.metadata)
        self._receiver = threading.Thread(target=self._receive, name="edge-stream-recv", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="edge-stream-deadlines", daemon=True)
        self._receiver.start()
        self._watchdog.start()

    @property
    def alive(self) -> bool:
        return not self._dead.is_set()

    @property
    def threads_running(self) -> bool:
        return self._receiver.is_alive() or self._watchdog.is_alive()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._pending)

    def submit(self, frame: pb.Frame, handle: T) -> bool:
        """Send a frame once a window slot is free. False if the stream is (or went) dead: the frame
        was not sent and the caller still owns its answer."""
        while not self._window.acquire(timeout=0.05):
            if self._dead.is_set():
                return False
        with self._lock:
            if self._dead.is_set():
                self._window.release()
                return False
            self._pending[frame.frame_id] = _InFlight(handle, time.monotonic() + self._deadline_s)
            self.sent += 1
            self.max_in_flight = max(self.max_in_flight, len(self._pending))
        self._requests.put(frame)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Half-close, wait up to `timeout` for outstanding results, then cancel; whatever is still
        pending is reported lost."""
        self._requests.put(self._END)
        self._receiver.join(timeout)
        self.abort("stream closed")
        self.join(timeout)

    def join(self, timeout: float = 5.0) -> None:
        """Wait for this stream's threads; both end promptly once the stream is dead."""
        for t in (self._receiver, self._watchdog):
            if t is not threading.current_thread():
                t.join(timeout)

    def abort(self, reason: str) -> None:
        """Cancel the call now; every pending frame is reported lost with `reason`."""
        self._fail(Lost(reason))
        self._call.cancel()

    # -- threads ---------------------------------------------------------------------------------
    def _request_iter(self):  # grpc pulls requests from this generator on its own thread
        while True:
            item = self._requests.get()
            if item is self._END:
                return
            yield item

    def _receive(self) -> None:
        lost = Lost("stream ended by the cloud")
        try:
            for result in self._call:
                self._answer(result)
        except grpc.RpcError as e:
            code = e.code()
            lost = Lost(f"{code.name if code else 'UNKNOWN'}: {e.details()}", code, error_kind(e))
        self._fail(lost)

    def _answer(self, result: pb.Result) -> None:
        with self._lock:
            entry = self._pending.pop(result.frame_id, None)
        if entry is None:
            with self._lock:
                self.late += 1
            log.info("dropped a late result for frame %d (already answered)", result.frame_id)
            if self._on_late is not None:
                self._on_late()
            return
        self._window.release()
        self._on_result(entry.handle, result)

    def _watch(self) -> None:
        while not self._dead.wait(0.02):
            now = time.monotonic()
            with self._lock:
                expired = [fid for fid, e in self._pending.items() if e.deadline <= now]
                entries = [self._pending.pop(fid) for fid in expired]
            for e in entries:
                self._window.release()
                self._on_lost(e.handle, DEADLINE)

    def _fail(self, lost: Lost) -> None:
        with self._lock:
            if not self._dead.is_set():
                self.failure = lost
                self._dead.set()
            entries = list(self._pending.values())
            self._pending.clear()
        self._requests.put(self._END)  # unblock grpc's request-consumer thread
        for e in entries:
            self._window.release()
            self._on_lost(e.handle, self.failure or lost)

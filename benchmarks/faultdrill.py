"""The parts of the fault drill (benchmarks/faults.py): the cloud, its Valkey, the link proxy and the edge
node (`Drill`), a node classifying a steady stream of named frames (`Feed`), and what one fault did to
those frames (`FaultRun`, `record`). Reusable from tests: tests/e2e/test_faults.py runs the same drill.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = ["a photo of a cat", "a photo of a dog", "red circle", "blue square"]


class DrillError(RuntimeError):
    """The drill could not run a step (a process it needs is missing)."""


@dataclass
class DrillSettings:
    fps: float = 20.0  # frames each node sends per second
    deadline_s: float = 1.0  # the nodes' frame deadline
    hold_s: float = 3.0  # how long a stall, a Redis outage or a stopped replica lasts
    delay_ms: float = 10.0  # the link's one-way delay
    window: int = 8  # frames in flight per stream
    warmup: int = 20  # split answers before a fault
    settle: int = 20  # split answers (of frames sent after it cleared) before the next
    recover_s: float = 30.0  # give up waiting for split mode after this
    num_cpus: int = 2  # the cloud's local Ray
    heartbeat_s: float = 1.0  # the cloud's; nodes Hello this often, so the registry refills fast

    def validate(self) -> None:
        if not self.hold_s > self.deadline_s:
            raise ValueError(
                f"hold_s ({self.hold_s}) must exceed deadline_s ({self.deadline_s}), or no frame misses it"
            )
        if self.fps <= 0 or self.warmup < 1 or self.settle < 1:
            raise ValueError("fps must be > 0, warmup and settle >= 1")


# -- one node's frames ---------------------------------------------------------------------------
class Feed:
    """One node classifying a steady stream of frames on a thread of its own, until the `with` ends.
    Frames are named `TAG:i`; answers are timed as the node counts them (a NodeStats listener)."""

    def __init__(self, node: Any, images: list[np.ndarray], fps: float, tag: str) -> None:
        self.node, self.images, self.period, self.tag = node, images, 1.0 / fps, tag
        self.sent_at: list[float] = []  # by frame index
        self.dispatched = 0  # frames the node has taken (sent, or answered locally)
        self.results: list[Any] = []  # EdgeResults as classify_many yielded them
        self.answered_at: dict[str, tuple[float, Any]] = {}  # source -> first (time, result) counted
        self.error: BaseException | None = None
        self.counted = 0  # answers the node counted (NodeStats), which must be one per frame too
        self.late0 = node.stats.late_dropped  # the node's late answers dropped before this feed ...
        self.late = 0  # ... and during it (set when the feed ends)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fault-feed-{tag}", daemon=True)

    def __enter__(self) -> Feed:
        self.node.stats.listeners.append(self._counted)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        with contextlib.suppress(ValueError):
            self.node.stats.listeners.remove(self._counted)
        self.late = self.node.stats.late_dropped - self.late0
        if exc[0] is not None:  # already failing: do not hide that
            return
        if self._thread.is_alive():
            raise DrillError(f"feed {self.tag}: the node did not answer its last frames within 60 s")
        if self.error is not None:
            raise DrillError(f"feed {self.tag} failed: {self.error!r}") from self.error

    def _frames(self) -> Iterator[np.ndarray]:
        due = time.monotonic()
        for i in itertools.count():
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            due = max(due + self.period, time.monotonic())  # late (the window was full): no burst after
            with self._lock:
                self.sent_at.append(time.monotonic())
            yield self.images[i % len(self.images)]
            with self._lock:
                self.dispatched = i + 1

    def _run(self) -> None:
        names = (f"{self.tag}:{i}" for i in itertools.count())
        try:
            for r in self.node.classify_many(self._frames(), PROMPTS, sources=names):
                with self._lock:
                    self.results.append(r)
        except BaseException as e:  # reported by __exit__
            self.error = e

    def _counted(self, r: Any) -> None:
        if r.source.startswith(self.tag + ":"):
            with self._lock:
                self.counted += 1
                self.answered_at.setdefault(r.source, (time.monotonic(), r))

    # -- queries (any thread) --------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        with self._lock:
            return self.dispatched - len(self.answered_at)

    def first(
        self, pred: Callable[[Any], bool], *, after: float, sent_after: bool = False
    ) -> tuple[float, Any] | None:
        """(time, result) of the first answer satisfying `pred` at or after `after` (of a frame sent after it)."""
        with self._lock:
            hits = [
                (t, r)
                for src, (t, r) in self.answered_at.items()
                if pred(r) and t >= after and (not sent_after or self.sent_at[_index(src)] >= after)
            ]
        return min(hits, key=lambda h: h[0], default=None)

    def count(self, pred: Callable[[Any], bool], *, after: float) -> int:
        with self._lock:
            return sum(1 for src, (t, r) in self.answered_at.items() if t >= after and pred(r))

    def wait(self, pred: Callable[[Any], bool], n: int, *, after: float, timeout: float) -> bool:
        """Until `n` answers counted at or after `after` satisfy `pred`; False after `timeout` s."""
        end = time.monotonic() + timeout
        while self.count(pred, after=after) < n:
            if time.monotonic() > end or self.error is not None:
                return False
            time.sleep(0.02)
        return True

    def wait_split(self, n: int, *, after: float, timeout: float) -> bool:
        return self.wait(lambda r: r.mode == "split", n, after=after, timeout=timeout)


def _index(source: str) -> int:
    return int(source.rsplit(":", 1)[1])


def _base(reason: str) -> str:
    return reason.split(":", 1)[0]


# -- what one fault did --------------------------------------------------------------------------
@dataclass
class FaultRun:
    fault: str
    sent: int = 0
    answered: int = 0  # answers the caller got
    counted: int = 0  # answers the node counted
    duplicates: int = 0
    missing: int = 0  # frames sent that got no answer
    answers: Counter[tuple[str, str]] = field(default_factory=Counter)  # (mode, reason) -> frames
    by_feed: dict[str, Counter[str]] = field(default_factory=dict)  # feed tag -> reason -> frames
    to_local_s: float | None = None  # fault -> first local answer
    to_split_s: float | None = None  # cleared -> first split answer of a frame sent after
    first_local: str = ""  # the reason of that first local answer
    late: int = 0  # cloud answers dropped: their frame had been answered locally
    registry_s: float | None = None  # redis: restart -> the node in the registry again
    note: str = ""

    @property
    def once_each(self) -> bool:
        return self.answered == self.counted == self.sent and not self.duplicates and not self.missing


def record(fault: str, feeds: list[Feed], t_fault: float, t_clear: float, note: str = "") -> FaultRun:
    run = FaultRun(fault, note=note)
    locals_, splits = [], []
    for f in feeds:
        names = Counter(r.source for r in f.results)
        run.sent += len(f.sent_at)
        run.answered += len(f.results)
        run.counted += f.counted
        run.duplicates += sum(n - 1 for n in names.values())
        run.missing += len({f"{f.tag}:{i}" for i in range(len(f.sent_at))} - set(names))
        run.answers.update((r.mode, _base(r.reason)) for r in f.results)
        run.by_feed[f.tag] = Counter(_base(r.reason) for r in f.results)
        run.late += f.late
        locals_.append(f.first(lambda r: r.mode == "local", after=t_fault))
        splits.append(f.first(lambda r: r.mode == "split", after=t_clear, sent_after=True))
    first_local = min((h for h in locals_ if h is not None), key=lambda h: h[0], default=None)
    first_split = min((h for h in splits if h is not None), key=lambda h: h[0], default=None)
    if first_local is not None:
        run.to_local_s, run.first_local = first_local[0] - t_fault, _base(first_local[1].reason)
    if first_split is not None:
        run.to_split_s = first_split[0] - t_clear
    return run


# -- the drill -----------------------------------------------------------------------------------
def rolled_copy(bundle: Path, dst: Path) -> Path:
    """The same weights under another bundle id (a NOTES.txt more, manifest re-written): a new release."""
    import json

    from splitclip.bundle import write_manifest

    shutil.copytree(bundle, dst)
    (dst / "NOTES.txt").write_text("the fault drill's rolled bundle: same weights, another bundle id\n")
    fields = {
        k: v
        for k, v in json.loads((dst / "manifest.json").read_text()).items()
        if k not in ("files", "bundle_id")
    }
    write_manifest(dst, fields)
    return dst


def replica_pids(session: int, deployment: str) -> list[int]:
    """Worker processes of a Serve deployment's replicas in the cloud's session (Ray sets their titles
    to `ray::ServeReplica:APP:DEPLOYMENT`)."""
    from demo.cloudproc import session_members

    out = []
    for pid in session_members(session):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "ServeReplica:" in cmd and f":{deployment}" in cmd:
                out.append(pid)
    return out


class Drill:
    """The cloud, its Valkey, the link proxy and the current edge node; `with Drill(...) as d`."""

    def __init__(
        self, bundle: Path, work: Path, s: DrillSettings, log: Callable[[str], None] = print
    ) -> None:
        s.validate()
        self.bundles = [Path(bundle).resolve(), (work / "rolled").resolve()]
        self.work, self.s, self.log = work, s, log
        rng = np.random.default_rng(3)
        self.images = [(rng.random((40 + i % 9, 48, 3)) * 255).astype(np.uint8) for i in range(8)]
        self._starts = 0
        self._nodes = itertools.count(1)
        self._stack = contextlib.ExitStack()
        self.node: Any = None

    def __enter__(self) -> Drill:
        from benchmarks.link import LinkProxy
        from cloud_service.embedded_redis import EmbeddedRedis
        from demo.cloudproc import CloudProcess
        from splitclip.procs import free_port

        try:
            self.redis = self._stack.enter_context(EmbeddedRedis(port=free_port()))
            env = {
                "SPLITCLIP_REDIS_URL": self.redis.url,
                "SPLITCLIP_HEARTBEAT_INTERVAL_S": str(self.s.heartbeat_s),
            }
            self.cloud = CloudProcess(self.bundles[0], env=env, num_cpus=self.s.num_cpus)
            self._stack.callback(self.cloud.stop)
            self.log(f"cloud up in {self.start_cloud():.1f} s at {self.cloud.address}")
            self.proxy = self._stack.enter_context(
                LinkProxy("127.0.0.1", self.cloud.port, delay_ms=self.s.delay_ms)
            )
            self._stack.callback(lambda: self.node is not None and self.node.close())
            self.node = self.edge(self.bundles[0])
            if self.node.mode != "split":
                raise DrillError(f"the edge does not start in split mode: {self.node.mode_reason}")
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def start_cloud(self) -> float:
        """Start the cloud (on its port, with its bundle) and wait until it answers; the seconds taken."""
        self._starts += 1
        self.cloud.log_path = self.work / f"cloud-{self._starts}.log"
        t0 = time.monotonic()
        self.cloud.start()
        wait_answering(self.cloud.address, self.bundle_id(self.cloud.bundle))
        return time.monotonic() - t0

    @staticmethod
    def bundle_id(bundle: Path) -> str:
        return _manifest(bundle).bundle_id

    def edge(self, bundle: Path, **overrides: Any) -> Any:
        """An EdgeNode through the proxy on a fixed plan (cut L/2, int8-zstd): every frame goes split
        while the cloud answers."""
        from edge_node.node import EdgeNode

        s = self.s
        settings: dict[str, Any] = dict(
            cut=_manifest(bundle).num_blocks // 2, codec="int8-zstd", window=s.window,
            frame_deadline_s=s.deadline_s, hello_timeout_s=1.0, probe_interval_s=0.25, probe_max_s=1.0,
            breaker_failures=3,
        )  # fmt: skip
        node_id = f"fault-drill-{os.getpid()}-{next(self._nodes)}"
        return EdgeNode(bundle, cloud=self.proxy.address, node_id=node_id, **{**settings, **overrides})

    def feed(self, node: Any = None, tag: str = "edge") -> Feed:
        return Feed(node or self.node, self.images, self.s.fps, tag)

    def warm(self, f: Feed) -> None:
        if not f.wait_split(self.s.warmup, after=0.0, timeout=self.s.recover_s):
            raise DrillError(f"the edge is not in split mode before the fault: {f.node.mode_reason}")

    def settle(self, f: Feed, after: float) -> bool:
        return f.wait(
            lambda r: r.mode == "split" and f.sent_at[_index(r.source)] >= after,
            self.s.settle, after=after, timeout=self.s.recover_s,
        )  # fmt: skip

    def registered(self, node_id: str, timeout: float) -> float | None:
        """Seconds until the node is in the cloud's registry (its Valkey), None if not within `timeout`."""
        from cloud_service.registry import RegistryError, list_nodes

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with contextlib.suppress(RegistryError):
                if any(n.node_id == node_id for n in list_nodes(self.redis.url, timeout_s=0.5)):
                    return time.monotonic() - t0
            time.sleep(0.05)
        return None


def _manifest(bundle: Path) -> Any:
    from splitclip.bundle import load_bundle

    return load_bundle(bundle, verify=False).manifest


def wait_answering(address: str, bundle_id: str, timeout_s: float = 120.0) -> None:
    """Until the cloud answers a Hello directly (not through the proxy): "gRPC on" is printed when the
    app is RUNNING, which can be before Serve's proxy routes to it on a loaded box."""
    import grpc

    from splitclip.wire import pb, pb_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.SplitClipStub(ch)
        while True:
            try:
                stub.Hello(pb.HelloRequest(node_id="fault-drill-probe", bundle_id=bundle_id), timeout=5)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)


def until(cond: Callable[[], bool], timeout: float) -> bool:
    """Poll `cond` until it holds (True) or `timeout` seconds pass (False)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True

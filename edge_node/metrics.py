"""The edge node's Prometheus metrics (prometheus_client), and the HTTP endpoint that serves them.

`NodeMetrics(node)` owns its own CollectorRegistry (never the global one, so several nodes and the
tests do not clash) and listens to the node's `NodeStats`, so every answered frame (split, local or
error, whoever asked for it) is observed exactly once, when it is counted. The breaker, the mode and
the plan are read from the node at scrape time. `serve(host, port)` starts prometheus_client's HTTP
server on that registry (`/metrics`; port 0 picks a free one) and returns a closable `MetricsServer`.

splitclip_edge_frames_total{mode, reason}     answered frames; reason is the result's Reason value
                                               without its detail (cloud, no_cloud, breaker_open, ...)
splitclip_edge_frame_latency_seconds{mode}    histogram of EdgeResult.latency_ms
splitclip_edge_bytes_sent_total                payload bytes put on the wire
splitclip_edge_late_results_total              cloud answers dropped because the frame was answered already
splitclip_edge_breaker_state{state}            1 for the breaker's state (closed/open/half_open), 0 others
splitclip_edge_breaker_opened_total            times the breaker opened
splitclip_edge_mode{mode}                      1 for where frames go now (split/local), 0 for the other
splitclip_edge_plan_info{plan}                 1, labelled with the plan source's current plan
splitclip_edge_plan_switches_total             the online planner's switches (0 for a fixed plan)
splitclip_edge_info{node_id, bundle_id, version}  1
splitclip_edge_journal_pending                 fleet search: locally answered frames not yet stored by the cloud
splitclip_edge_journal_uploaded_total          ... and those uploaded since the node started (0 with index off)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_node.breaker import State
from edge_node.reasons import base
from edge_node.results import EdgeResult

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from edge_node.node import EdgeNode

PREFIX = "splitclip_edge"
# seconds: a local answer of a small model takes a few ms, a split one over a slow link up to the deadline
LATENCY_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MODES = ("split", "local")


def _version() -> str:
    try:
        return metadata.version("splitclip")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class MetricsServer:
    """The running endpoint: `url` is http://HOST:PORT/metrics with the port actually bound."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NodeMetrics:
    """The metrics of one EdgeNode, in a registry of their own (`self.registry`)."""

    def __init__(self, node: EdgeNode) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter(f"{PREFIX}_frames", "Answered frames", ["mode", "reason"], registry=r)
        self.latency = Histogram(
            f"{PREFIX}_frame_latency_seconds",
            "Time from the start of preprocessing to the answer",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_sent = Counter(f"{PREFIX}_bytes_sent", "Payload bytes put on the wire", registry=r)
        info = Info(PREFIX, "The node, its bundle and the splitclip version", registry=r)
        info.info({"node_id": node.settings.node_id, "bundle_id": node.bundle_id, "version": _version()})
        for mode in MODES:  # both series exist from the start, so rate() sees the first frame
            self.latency.labels(mode)
        r.register(_NodeState(node))
        node.stats.listeners.append(self.observe)

    def observe(self, result: EdgeResult) -> None:
        """Count one answered frame (the node calls this once per frame, via its NodeStats)."""
        self.frames.labels(result.mode, base(result.reason)).inc()
        self.latency.labels(result.mode).observe(max(result.latency_ms, 0.0) / 1e3)
        self.bytes_sent.inc(result.bytes_sent)

    def detach(self) -> None:
        """Stop observing the node's frames (the scrape-time metrics keep reading it)."""
        if self.observe in self.node.stats.listeners:
            self.node.stats.listeners.remove(self.observe)

    def serve(self, host: str = "0.0.0.0", port: int = 0) -> MetricsServer:
        """Serve /metrics on HOST:PORT (0: a free port, see `.port`) until `close()`."""
        if not 0 <= port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, got {port}")
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(host, int(server.server_port), server, thread)


class _NodeState(Collector):
    """What is read from the node at scrape time: breaker, mode, plan, late answers."""

    def __init__(self, node: EdgeNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        late = CounterMetricFamily(
            f"{PREFIX}_late_results", "Cloud answers dropped: the frame was answered already"
        )
        late.add_metric([], node.stats.late_dropped)
        yield late
        state = node.breaker.state
        breaker = GaugeMetricFamily(
            f"{PREFIX}_breaker_state", "1 for the circuit breaker's current state", labels=["state"]
        )
        for s in State:
            breaker.add_metric([s.value], 1.0 if s is state else 0.0)
        yield breaker
        opened = CounterMetricFamily(f"{PREFIX}_breaker_opened", "Times the circuit breaker opened")
        opened.add_metric([], node.breaker.opened)
        yield opened
        mode = node.mode
        modes = GaugeMetricFamily(f"{PREFIX}_mode", "1 for where frames go now", labels=["mode"])
        for m in MODES:
            modes.add_metric([m], 1.0 if m == mode else 0.0)
        yield modes
        plans = node.plans
        auto = plans.auto
        label = auto.current.label if auto is not None else plans.fixed.label if plans.fixed else "none"
        plan = GaugeMetricFamily(
            f"{PREFIX}_plan_info",
            "The plan source's current plan (local or cut<k>/<preset>)",
            labels=["plan"],
        )
        plan.add_metric([label], 1.0)
        yield plan
        switches = CounterMetricFamily(f"{PREFIX}_plan_switches", "Plan switches of the online planner")
        switches.add_metric([], auto.switches if auto is not None else 0)
        yield switches
        pending = GaugeMetricFamily(
            f"{PREFIX}_journal_pending", "Locally answered frames the cloud's search store does not have yet"
        )
        pending.add_metric([], node.index.pending)
        yield pending
        uploaded = CounterMetricFamily(
            f"{PREFIX}_journal_uploaded", "Journal frames uploaded to the search store since the start"
        )
        uploaded.add_metric([], node.index.uploaded)
        yield uploaded

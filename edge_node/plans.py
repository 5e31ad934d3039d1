"""The node's source of plans: a fixed one, or the online planner (edge_node/autoplan.py) behind a lock, and the Hello timer that feeds it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from edge_node.autoplan import AutoPlanner, Candidate, Policy, candidates
from splitclip import codec

if TYPE_CHECKING:
    from edge_node.settings import EdgeSettings
    from splitclip.bundle import Bundle
    from splitclip.runtime import BundleRuntime

log = logging.getLogger("splitclip.edge")


class NodePlans:
    """The node's source of plans: one fixed plan, or an AutoPlanner behind a lock (stream threads
    observe while the caller chooses)."""

    def __init__(self, fixed: Candidate | None = None, auto: AutoPlanner | None = None) -> None:
        if (fixed is None) == (auto is None):
            raise ValueError("expected a fixed plan or an AutoPlanner")
        self.fixed = fixed
        self.auto = auto
        self._lock = threading.Lock()

    @staticmethod
    def for_node(bundle: Bundle, runtime: BundleRuntime, s: EdgeSettings) -> NodePlans:
        """The planner of a node with `--cut auto`: this device's profile (cached) and the bundle's table."""
        from edge_node.profile import load_or_measure

        policy = Policy(
            min_agreement=s.min_agreement,
            allow_image_upload=s.allow_image_upload,
            objective=s.objective,
            latency_budget_ms=s.latency_budget_ms,
            margin=s.plan_margin,
            patience=s.plan_patience,
        )
        table = bundle.agreement()
        if table is not None:
            presets = list(dict.fromkeys(r.preset for r in table.allowed(policy.min_agreement)))
        elif policy.min_agreement > 0:
            presets = [p.name for p in codec.ALL_PRESETS.values() if p.lossless]
        else:
            presets = list(codec.PRESETS)
        prof = load_or_measure(bundle, runtime, presets, cache_dir=s.cache_dir)
        auto = AutoPlanner(candidates(prof, table, policy), policy, num_blocks=prof.num_blocks)
        log.info(
            "auto plan over %d plans (%d with int8 edge stages; floor %g%s): starting with %s",
            len(auto.plans),
            sum(c.edge == "int8" for c in auto.plans),
            policy.min_agreement,
            "" if policy.allow_image_upload else ", no image upload",
            auto.current.label,
        )
        return NodePlans(auto=auto)

    def next(self) -> Candidate:
        if self.auto is None:
            assert self.fixed is not None
            return self.fixed
        with self._lock:
            return self.auto.choose()

    def answered(
        self, cut: int, payload_bytes: int, frame_bytes: int, wall_ms: float, timings: Mapping[str, float]
    ) -> None:
        if self.auto is not None:
            with self._lock:
                self.auto.observe(cut, payload_bytes, frame_bytes, wall_ms, timings)

    def hello_rtt(self, ms: float, resp: Any = None) -> None:
        """A Hello's round trip, and the cloud's report of its speed and queue in the answer."""
        if self.auto is not None:
            with self._lock:
                self.auto.observe_rtt(ms)
                if resp is not None and getattr(resp, "tail_ms_per_block", 0) > 0:
                    self.auto.observe_cloud_report(resp.tail_ms_per_block, resp.queue_ms)

    def forbid_cut(self, cut: int) -> bool:
        """Stop choosing `cut`; False for a fixed plan (the node must handle it)."""
        if self.auto is None:
            return False
        with self._lock:
            self.auto.forbid_cut(cut)
        return True


class TimedHello:
    """A cloud client whose Hellos (the heartbeat the node sends anyway) feed the planner: their round
    trip (the rtt) and the answer (the cloud's own speed and queue)."""

    def __init__(self, client: Any, on_rtt: Callable[[float, Any], None]) -> None:
        self._client = client
        self._on_rtt = on_rtt

    def hello(self, request: Any, timeout: float) -> Any:
        t0 = time.perf_counter()
        resp = self._client.hello(request, timeout)  # a failed Hello raises: no sample
        self._on_rtt((time.perf_counter() - t0) * 1e3, resp)
        return resp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

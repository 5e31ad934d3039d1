"""The online planner: per frame, which plan (local, or cut k with a preset) answers soonest, learnt from the node's own traffic.

Pure: numbers in, a plan out (no gRPC, no ONNX Runtime), so it is tested on synthetic profiles.

    predicted(local)     = preprocess + the whole tower                  (the profile)
    predicted(k, preset) = preprocess + edge stages[0:k] + encode       (the profile; fp32 or int8 stages)
                           + rtt + frame bytes * 8 / bandwidth          (LinkEstimate)
                           + cloud decode + tail + queue + text + score (CloudEstimate)

Bytes per (cut, preset) are the bundle's measured means (agreement.json) when it has them, else the
profile's own encodes. Estimates come from answered frames only (no probe traffic): the node's wall
time from send to answer minus the cloud's reported server time (Result.timings_ms["total"]) is one
(frame bytes, transfer + rtt) sample; a recency-weighted least-squares line through the recent samples
gives rtt (intercept) and bandwidth (slope); while every frame is about the same size the line goes
through the round trip of the node's Hellos (heartbeats; the least of the last 5) at 0 bytes. The cloud's speed is learnt as a ratio to this device's own stage times, so a cut never sent
is predicted from the cuts that were, and from the cloud's own report in each Hello (its tail ms per
block, what a plan at cut L never shows). Hysteresis: the node moves to another plan only after it has
been predicted better than the current one by `margin` for `patience` frames in a row. While it
answers locally nothing is learnt, so the first frame and then one every `explore_every` frames
(doubling while local stays best) go with the best remote plan: real frames, answered by the cloud.
Likewise a plan whose frames are too small to show the bandwidth (the embedding at cut L) sends one
frame of the best plan with 8x larger frames every `explore_thin_every` frames (doubling up to
`explore_thin_max`: on such a plan a faster link is invisible between those frames).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from edge_node.profile import EdgeProfile
from splitclip import codec
from splitclip.agreement import AgreementTable

log = logging.getLogger("splitclip.edge")

PLANNED_LOCAL = "planned"  # the reason of a frame the planner chose to answer locally


@dataclass(frozen=True)
class Candidate:
    cut: int | None  # None: answer locally
    preset: str  # "" for local
    payload_bytes: float
    edge_ms: float  # on this device: preprocess + edge stages + encode (local: the whole tower)
    cloud_compute_ms: float  # stages[k:L] + head at this device's speed (the cloud's speed is learnt)
    decode_ms: float  # this device's decode time: the prior of the cloud's
    agreement: float | None = None  # measured, when the bundle says
    edge: str = "fp32"  # which edge stages compute the tensor at the cut (the cloud always runs fp32)

    @property
    def is_local(self) -> bool:
        return self.cut is None

    @property
    def label(self) -> str:
        if self.cut is None:
            return "local"
        return (
            f"cut{self.cut}/{self.preset}"
            if self.edge == "fp32"
            else f"cut{self.cut}/{self.edge}/{self.preset}"
        )


@dataclass(frozen=True)
class Policy:
    min_agreement: float = 0.99
    allow_image_upload: bool = True
    objective: str = "latency"  # "latency" | "bytes"
    latency_budget_ms: float = 0.0  # objective bytes: predicted latency allowed
    margin: float = 0.05  # a new plan must be predicted this much better ...
    patience: int = 3  # ... for this many frames in a row
    explore_every: int = 50  # frames answered locally before one goes remote (then doubling) ...
    explore_max: int = 800  # ... up to this
    thin_bytes: float = 2500  # a plan's frames under this show little of the bandwidth: ...
    explore_thin_every: int = 10  # ... one frame in this many (then doubling) goes with a larger plan ...
    explore_thin_max: int = 20  # ... up to this: a faster link is seen at most this many frames late


def candidates(
    profile: EdgeProfile,
    table: AgreementTable | None,
    policy: Policy,
    *,
    say: Callable[[str], None] = log.info,
) -> list[Candidate]:
    """ "local" and every (cut, preset) the floor and the privacy setting allow, with its costs; with int8
    edge stages profiled, also every (cut >= 1, preset, int8) whose own measured row clears the floor
    (never without a table: int8 stages are not lossless)."""
    st = profile.stages
    L = profile.num_blocks
    out = [Candidate(None, "", 0.0, st.edge_ms(-1), 0.0, 0.0, 1.0)]
    if table is None and policy.min_agreement > 0:
        say(
            f"bundle {profile.bundle_id} has no agreement table: only lossless presets count as "
            f">= the agreement floor {policy.min_agreement:g}"
        )
    edges = ["fp32", *(["int8"] if profile.int8 is not None and table is not None else [])]
    for edge in edges:
        est = profile.edge_stages(edge)
        assert est is not None
        for (k, name), cost in sorted(profile.codecs.items()):
            if not 0 <= k <= L or (k == 0 and not policy.allow_image_upload) or (k == 0 and edge != "fp32"):
                continue
            agreement: float | None = None
            payload = cost.payload_bytes
            if table is not None:
                row = table.get(k, name, edge)
                if row is None or row.agreement < policy.min_agreement:
                    continue
                agreement, payload = row.agreement, row.bytes
            elif policy.min_agreement > 0 and not _lossless(name):
                continue
            edge_ms = est.edge_ms(k) + cost.encode_ms
            # the cloud's share is stages[k:L] + head in fp32 whichever stages the edge ran
            out.append(Candidate(k, name, payload, edge_ms, st.cloud_ms(k), cost.decode_ms, agreement, edge))
    return out


def _lossless(name: str) -> bool:
    p = codec.ALL_PRESETS.get(name)
    return p is not None and p.lossless


class LinkEstimate:
    """ms from send to answer, less the cloud's server time, for a frame of b bytes: rtt + b / rate."""

    def __init__(self, rtt_ms: float = 20.0, mbps: float = 10.0, decay: float = 0.85, size: int = 64) -> None:
        self.prior_rtt_ms = rtt_ms  # the anchor while frames are all one size: a guess, then Hello's
        self.hello_ms: deque[float] = deque(maxlen=5)
        self.decay = decay  # weight of a sample one frame older
        self.samples: deque[tuple[float, float]] = deque(maxlen=size)  # (frame bytes, ms), newest last
        self.rtt_ms = rtt_ms
        self.ms_per_byte = 8.0 / (mbps * 1e3)
        self._surprises = 0  # consecutive samples off the line: + above, - below

    @property
    def mbps(self) -> float:
        return 8.0 / (self.ms_per_byte * 1e3)

    def observe(self, frame_bytes: float, ms: float, *, fresh: bool = False) -> None:
        """One frame's (bytes, ms). Off the line by > 35 % three times in a row the same way (a step
        change: ±20 % noise never is), or once when `fresh` (the first frame after a while), and the
        older samples are forgotten."""
        b, t = max(0.0, frame_bytes), max(0.0, ms)
        rel = (t - self.predict(b)) / max(self.predict(b), 1e-3)
        if abs(rel) > 0.35:
            same = self._surprises != 0 and (rel > 0) == (self._surprises > 0)
            self._surprises = (self._surprises + (1 if rel > 0 else -1)) if same else (1 if rel > 0 else -1)
        else:
            self._surprises = 0
        self.samples.append((b, t))
        if (fresh and self._surprises != 0) or abs(self._surprises) >= 3:
            keep = 1 if fresh else 3
            recent = list(self.samples)[-keep:]
            self.samples.clear()
            self.samples.extend(recent)
            self._surprises = 0
        self._fit()

    def observe_rtt(self, ms: float) -> None:
        """A round trip with (almost) no payload, e.g. Hello: the least of the last few is the rtt."""
        self.hello_ms.append(max(0.0, ms))
        self.prior_rtt_ms = min(self.hello_ms)
        if self.samples:
            self._fit()

    def predict(self, frame_bytes: float) -> float:
        return self.rtt_ms + frame_bytes * self.ms_per_byte

    def _fit(self) -> None:
        # recency-weighted least squares of ms on bytes; while the frames are about one size (the same
        # plan) the line goes through (0 bytes, prior rtt) instead and the frames give only the slope
        pts = []
        w = 1.0
        for b, t in reversed(self.samples):
            pts.append((b, t, w))
            w *= self.decay
        sw = sum(p[2] for p in pts)
        mb = sum(b * w for b, _, w in pts) / sw
        if sum(w * (b - mb) ** 2 for b, _, w in pts) / sw < (0.1 * mb) ** 2:
            pts.append((0.0, self.prior_rtt_ms, 0.1))
            sw += 0.1
            mb = sum(b * w for b, _, w in pts) / sw
        mt = sum(t * w for _, t, w in pts) / sw
        sbb = sum(w * (b - mb) ** 2 for b, _, w in pts)
        sbt = sum(w * (b - mb) * (t - mt) for b, t, w in pts)
        slope = max(sbt / sbb if sbb > 0 else 0.0, 8.0 / 1e8)  # at most 100 Gbit/s
        rtt = mt - slope * mb
        if rtt < 0:  # through the origin instead
            rtt = 0.0
            sb2 = sum(w * b * b for b, _, w in pts)
            slope = max(sum(w * b * t for b, t, w in pts) / sb2 if sb2 > 0 else slope, 8.0 / 1e8)
        self.rtt_ms, self.ms_per_byte = rtt, slope


class CloudEstimate:
    """The cloud's server time for a frame: overhead (decode, queue, the tail call's fixed cost, text,
    score) + speed * tail compute, where tail compute is what stages[k:L] + head take on this device
    (speed 1 = as fast as here) and the cloud's share of it is its reported ORT time ("compute").
    The speed comes from answered frames that ran at least about a block in the cloud, and from the
    cloud's own report in Hello (its tail ms per block), which is all there is while the node's plan
    leaves the cloud nothing to compute (cut L)."""

    def __init__(self, speed: float = 1.0, overhead_ms: float = 2.0, alpha: float = 0.2) -> None:
        self.speed = speed  # the conservative prior: the cloud no faster than this device
        self.overhead_ms = overhead_ms
        self.alpha = alpha
        self.seen = 0  # frames answered
        self.tails_seen = 0  # ... of which ran at least about a block in the cloud
        self.reported = False  # a Hello said the cloud's speed

    def _learn_speed(self, ratio: float, first: bool) -> None:
        a = 1.0 if first else self.alpha
        self.speed = math.exp((1 - a) * math.log(self.speed) + a * math.log(max(ratio, 1e-4)))

    def observe(self, cloud_compute_ms: float, timings: Mapping[str, float], block_ms: float = 0.0) -> None:
        total = float(timings.get("total", 0.0))
        if total <= 0:
            return
        # the tail's own ORT time when the cloud says it (else the tail call less its queueing, which
        # also holds the Serve call's fixed cost: read as speed, that makes a one-block tail look slow)
        if "compute" in timings:
            tail = max(0.0, float(timings["compute"]))
        else:
            tail = max(0.0, float(timings.get("tail", 0.0)) - float(timings.get("queue", 0.0)))
        a = 1.0 if self.seen == 0 else self.alpha  # the first answer replaces the prior
        if cloud_compute_ms > max(0.05, 0.5 * block_ms) and tail > 0:
            self._learn_speed(tail / cloud_compute_ms, first=self.tails_seen == 0)
            self.tails_seen += 1
        self.overhead_ms = (1 - a) * self.overhead_ms + a * max(0.0, total - tail)
        self.seen += 1

    def observe_report(self, cloud_block_ms: float, queue_ms: float, block_ms: float) -> None:
        """The cloud's Hello: its recent tail ms per block (this device's: `block_ms`) and queue."""
        if cloud_block_ms > 0 and block_ms > 0:
            self._learn_speed(cloud_block_ms / block_ms, first=self.tails_seen == 0 and not self.reported)
            self.reported = True
        if self.seen == 0:
            self.overhead_ms = max(self.overhead_ms, 2.0 + queue_ms)

    def predict(self, c: Candidate) -> float:
        decode = c.decode_ms if self.seen == 0 else 0.0  # once seen, the overhead has the cloud's decode
        return self.overhead_ms + decode + self.speed * c.cloud_compute_ms


class AutoPlanner:
    """Chooses a plan per frame (`choose`) and learns from each answered frame (`observe`)."""

    def __init__(
        self,
        plans: Sequence[Candidate],
        policy: Policy,
        link: LinkEstimate | None = None,
        cloud: CloudEstimate | None = None,
        *,
        num_blocks: int | None = None,
    ) -> None:
        if not plans:
            raise ValueError("no plans to choose from")
        self.plans = list(plans)
        L = num_blocks if num_blocks is not None else max((c.cut or 0) for c in self.plans)
        inner = [c for c in self.plans if c.cut is not None and c.cut < L and c.cloud_compute_ms > 0]
        lowest = min(inner, key=lambda c: c.cut or 0, default=None)
        # this device's ms per block of the cloud's share (the cloud reports its own per block)
        self.block_ms = lowest.cloud_compute_ms / (L - (lowest.cut or 0)) if lowest is not None else 0.0
        self.policy = policy
        self.link = link or LinkEstimate()
        self.cloud = cloud or CloudEstimate()
        self.overhead_bytes = 0.0  # frame bytes beyond the payload (ids, prompts): learnt from frames
        self._ranked: list[tuple[float, Candidate]] = []
        self._ranked_key: tuple[float | bool, ...] | None = None
        self._ranked_plans: list[Candidate] | None = None
        self.current = self.best()
        self.switches = 0
        self._streak = 0
        self._explore_every = policy.explore_every
        self._thin_frames = 0
        self._thin_every = policy.explore_thin_every
        # the cloud's speed is a guess until one frame was answered: the first frame goes remote
        self._local_frames = self._explore_every - 1
        self._fresh = False  # the next answer is the first after a stretch of local answers

    def predict(self, c: Candidate) -> float:
        if c.is_local:
            return c.edge_ms
        return c.edge_ms + self.link.predict(c.payload_bytes + self.overhead_bytes) + self.cloud.predict(c)

    def ranked(self) -> list[tuple[float, Candidate]]:
        """Every plan with its predicted latency, fastest first. Kept while the estimates it rests on
        are unchanged: between two answers from the cloud every locally answered frame would sort the
        same plans again (~40 us of a weak device's CPU per frame)."""
        link, cloud = self.link, self.cloud
        key = (
            link.rtt_ms,
            link.ms_per_byte,
            cloud.overhead_ms,
            cloud.speed,
            cloud.seen == 0,
            self.overhead_bytes,
        )
        if key != self._ranked_key or self._ranked_plans is not self.plans:
            self._ranked = sorted(
                ((self.predict(c), c) for c in self.plans), key=lambda x: (x[0], x[1].payload_bytes)
            )
            self._ranked_key, self._ranked_plans = key, self.plans
        return self._ranked

    def best(self) -> Candidate:
        ranked = self.ranked()
        if self.policy.objective == "bytes":
            fits = [c for ms, c in ranked if ms <= self.policy.latency_budget_ms]
            if fits:
                return min(fits, key=lambda c: c.payload_bytes)
        return ranked[0][1]

    def _better(self, new: Candidate, old: Candidate) -> bool:
        m = self.policy.margin
        new_ms, old_ms = self.predict(new), self.predict(old)
        if self.policy.objective == "bytes" and old_ms <= self.policy.latency_budget_ms * (1 + m):
            return new_ms <= self.policy.latency_budget_ms and new.payload_bytes < (1 - m) * old.payload_bytes
        if self.policy.objective == "bytes" and new_ms <= self.policy.latency_budget_ms:
            return True  # the current plan is over its budget and this one is within it
        return new_ms < (1 - m) * old_ms

    def choose(self) -> Candidate:
        """The plan of the next frame (call once per frame)."""
        best = self.best()
        if best != self.current and self._better(best, self.current):
            self._streak += 1
            if self._streak >= self.policy.patience:
                self._switch(best)
        else:
            self._streak = 0
        # local learns nothing; a plan that leaves the cloud no block learns nothing of its speed until
        # a frame with a tail or the cloud's own report has said it
        blind = self.current.cloud_compute_ms <= 0.5 * self.block_ms and self.cloud.tails_seen == 0
        if self.current.is_local or (blind and not self.cloud.reported):
            self._local_frames += 1
            if self._local_frames >= self._explore_every:
                # one real frame to learn about the link and the cloud (a cut < L, so the cloud computes)
                remote = self._first(lambda c: not c.is_local and c.cloud_compute_ms > 0.5 * self.block_ms)
                if remote is not None:
                    self._local_frames = 0
                    self._explore_every = min(2 * self._explore_every, self.policy.explore_max)
                    return remote
        elif self.current.payload_bytes < self.policy.thin_bytes:
            # its frames are too small to show the bandwidth: now and then one of a larger plan does
            self._thin_frames += 1
            if self._thin_frames >= self._thin_every:
                big = self._first(lambda c: c.payload_bytes >= 8 * max(self.current.payload_bytes, 512))
                if big is not None:
                    self._thin_frames = 0
                    self._thin_every = min(2 * self._thin_every, self.policy.explore_thin_max)
                    return big
        return self.current

    def _first(self, wanted: Callable[[Candidate], bool]) -> Candidate | None:
        """The fastest predicted plan that `wanted` accepts, as an exploring frame (its answer is fresh)."""
        pick = next((c for _, c in self.ranked() if wanted(c)), None)
        self._fresh = self._fresh or pick is not None
        return pick

    def _switch(self, to: Candidate) -> None:
        log.info(
            "plan %s -> %s (predicted %.1f -> %.1f ms; link %.3g Mbit/s, rtt %.1f ms; cloud %.2fx this device)",
            self.current.label,
            to.label,
            self.predict(self.current),
            self.predict(to),
            self.link.mbps,
            self.link.rtt_ms,
            self.cloud.speed,
        )
        self.current = to
        self.switches += 1
        self._streak = 0
        if not to.is_local:
            self._explore_every = self.policy.explore_every
        self._thin_frames, self._thin_every = 0, self.policy.explore_thin_every

    def observe(
        self,
        cut: int,
        payload_bytes: float,
        frame_bytes: float,
        wall_ms: float,
        timings: Mapping[str, float],
    ) -> None:
        """One frame answered by the cloud: `wall_ms` from send to answer, `timings` the cloud's."""
        server = float(timings.get("total", 0.0))
        self.link.observe(frame_bytes, wall_ms - server, fresh=self._fresh)
        self._fresh = False
        self.overhead_bytes = 0.8 * self.overhead_bytes + 0.2 * max(0.0, frame_bytes - payload_bytes)
        plan = next((c for c in self.plans if c.cut == cut), None)
        if plan is not None:
            self.cloud.observe(plan.cloud_compute_ms, timings, self.block_ms)

    def observe_rtt(self, ms: float) -> None:
        """A Hello's round trip (the heartbeat the node sends anyway)."""
        self.link.observe_rtt(ms)

    def observe_cloud_report(self, tail_ms_per_block: float, queue_ms: float) -> None:
        """The cloud's own speed and queue, from a Hello's answer."""
        self.cloud.observe_report(tail_ms_per_block, queue_ms, self.block_ms)

    def forbid_cut(self, cut: int) -> None:
        """Drop every plan at `cut` (e.g. the cloud refuses cut-0 frames)."""
        self.plans = [c for c in self.plans if c.cut != cut] or [c for c in self.plans if c.is_local]
        if self.current.cut == cut:
            self.current = self.best()

"""One frame on its way to its one answer (`Ticket`), the answers it can get, and the node's counts of them."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_node.local import Prepared
from edge_node.reasons import Reason, base
from edge_node.results import EdgeResult
from splitclip.preprocess import ImageLike
from splitclip.prompts import PromptSet, top_k
from splitclip.wire import pb

log = logging.getLogger("splitclip.edge")


def frame_ids(clock_ns: Callable[[], int] = time.time_ns) -> Iterator[int]:
    """A node's frame ids: consecutive, starting at the wall clock in microseconds.

    Fleet search stores frames idempotently on (bundle, node, frame id): a restarted node that counted
    from 1 again would have every new frame dropped as a duplicate of one it saw before the restart.
    Started from the clock, a new run's ids begin after every id of the runs before it, unless a run
    answered more than one frame per microsecond it ran (it cannot). They fit the store's int64
    (2**63 µs is the year 294,000). If the clock steps back between runs (a device without an RTC
    battery, an NTP correction) by D, the new run's first D·10⁶ ids may repeat earlier ones, and those
    frames are left out of the index as duplicates (their answers are not affected); a step forward
    only skips ids. Within one run the ids never repeat, whatever the clock does.
    """
    return itertools.count(max(1, clock_ns() // 1000))


def source_name(image: ImageLike) -> str:
    """The default `source` of a frame: its path, else the image's type."""
    if isinstance(image, str | Path):
        return str(image)
    return type(image).__name__


@dataclass
class NodeStats:
    frames: int = 0
    split: int = 0
    local: int = 0
    errors: int = 0
    bytes_sent: int = 0
    late_dropped: int = 0  # cloud answers that arrived after the frame was answered locally
    by_reason: Counter[str] = field(default_factory=Counter)
    # called with every counted result, once, before it reaches the caller (edge_node/metrics.py)
    listeners: list[Callable[[EdgeResult], None]] = field(default_factory=list, repr=False, compare=False)

    def count(self, r: EdgeResult) -> None:
        self.frames += 1
        self.bytes_sent += r.bytes_sent
        self.by_reason[base(r.reason)] += 1
        if r.error is not None:
            self.errors += 1
        elif r.mode == "split":
            self.split += 1
        else:
            self.local += 1
        for listener in self.listeners:
            try:
                listener(r)
            except Exception:  # a broken listener must not cost the frame its answer
                log.exception("a result listener failed on frame %d", r.frame_id)


class Ticket:
    """One frame: whoever `claim()`s it first gives its answer, to `sink`."""

    def __init__(
        self, frame_id: int, source: str, prompts: PromptSet, sink: queue.SimpleQueue[EdgeResult]
    ) -> None:
        self.frame_id = frame_id
        self.source = source
        self.prompts = prompts
        self.sink = sink
        self.t0 = time.perf_counter()
        self.captured_at = time.time()  # when the node got the image (fleet search's frame time)
        self.embedding: np.ndarray | None = None  # [embed_dim] of a local answer (the journal's)
        self.prepared: Prepared | None = None
        self.bytes_sent = 0  # payload bytes
        self.frame_bytes = 0  # the whole serialised Frame
        self.sent_at = 0.0  # perf_counter when it was handed to the stream / unary call
        self.cut: int | None = None  # the plan it was sent with
        self.codec: str | None = None
        self.plan: str | None = None  # its label (autoplan.Candidate.label), e.g. cut2/int8/klt-q20-ans
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

    def _label(self, lab: pb.Label) -> str:
        """The label as the caller gave it (the cloud may echo it normalised), by its index."""
        labels = self.prompts.labels
        return labels[lab.index] if lab.index < len(labels) else lab.prompt

    def _timings(self) -> dict[str, float]:
        return dict(self.prepared.timings_ms) if self.prepared else {}

    # -- its possible answers --------------------------------------------------------------------
    def split_result(self, res: pb.Result, *, cut: int, codec: str) -> EdgeResult:
        timings = self._timings()
        timings.update({f"cloud_{k}": float(v) for k, v in res.timings_ms.items()})
        return EdgeResult(
            frame_id=self.frame_id,
            source=self.source,
            mode="split",
            reason=Reason.CLOUD,
            labels=[self._label(lab) for lab in res.top],
            top_probs=[float(lab.probability) for lab in res.top],
            probabilities=[float(p) for p in res.probabilities],
            bytes_sent=self.bytes_sent,
            latency_ms=self.elapsed_ms(),
            cut=cut,
            codec=codec,
            plan=self.plan or f"cut{cut}/{codec}",
            timings_ms=timings,
        )

    def local_result(
        self, probs: np.ndarray, reason: str, *, k: int, cut: int | None, codec: str | None
    ) -> EdgeResult:
        """`probs` [n_labels] computed here; `cut` and `codec` are kept only if the frame was sent."""
        best = top_k(probs[None], k)[0]
        return EdgeResult(
            frame_id=self.frame_id,
            source=self.source,
            mode="local",
            reason=reason,
            labels=[self.prompts.labels[i] for i, _ in best],
            top_probs=[p for _, p in best],
            probabilities=[float(p) for p in probs],
            bytes_sent=self.bytes_sent,
            latency_ms=self.elapsed_ms(),
            cut=cut if self.bytes_sent else None,
            codec=codec if self.bytes_sent else None,
            plan="local",
            timings_ms=self._timings(),
        )

    def error_result(self, e: Exception) -> EdgeResult:
        return EdgeResult(
            frame_id=self.frame_id,
            source=self.source,
            mode="local",
            reason=Reason.ERROR,
            error=f"{type(e).__name__}: {e}",
            bytes_sent=self.bytes_sent,
            latency_ms=self.elapsed_ms(),
        )

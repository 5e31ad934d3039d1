"""What the edge answers for one frame, whichever side computed it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from edge_node.reasons import Reason

__all__ = ["EdgeResult", "Mode", "Reason"]

Mode = Literal["split", "local"]


@dataclass
class EdgeResult:
    frame_id: int
    source: str  # image path or caller-given name
    mode: Mode
    reason: str  # a Reason value, optionally followed by ": detail"
    labels: list[str] = field(default_factory=list)  # top-k prompts, best first
    top_probs: list[float] = field(default_factory=list)  # their probabilities
    probabilities: list[float] = field(default_factory=list)  # every prompt, in request order
    bytes_sent: int = 0  # payload bytes put on the wire for this frame (0 when never sent)
    latency_ms: float = 0.0  # from the start of preprocessing to the answer
    cut: int | None = None
    codec: str | None = None
    plan: str | None = None  # the plan that answered it: "local" or "cut<k>/<preset>" (None: an error)
    error: str | None = None  # set only when mode could not produce an answer (reason == error)
    timings_ms: dict[str, float] = field(default_factory=dict)  # edge and cloud stage times

    def __post_init__(self) -> None:
        self.reason = str(self.reason)  # a Reason member becomes its plain value

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def top_label(self) -> str | None:
        return self.labels[0] if self.labels else None

    @property
    def top_prob(self) -> float | None:
        return self.top_probs[0] if self.top_probs else None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

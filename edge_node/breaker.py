"""Circuit breaker: closed -> open after repeated failures -> half-open probe -> closed (or open again).

While closed, frames go to the cloud. `failures` consecutive failures (errors or timeouts) open it;
`trip()` opens it at once (bundle mismatch, refused token, a dropped link). While open, frames are
answered locally and no cloud call is made. After `probe_interval` the breaker lets exactly one
probe through (half-open); its success closes the breaker, its failure reopens it with the interval
doubled, capped at `probe_max` so the node notices a recovered cloud within a few seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        *,
        failures: int = 3,
        probe_interval: float = 0.5,
        probe_max: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State, State, str], None] | None = None,
    ) -> None:
        self.threshold = failures
        self.probe_interval = probe_interval
        self.probe_max = probe_max
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state = State.CLOSED
        self._reason = ""
        self._consecutive = 0
        self._interval = probe_interval
        self._next_probe = 0.0
        self.opened = 0  # how many times it opened (for stats and tests)

    # -- queries ---------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    @property
    def reason(self) -> str:
        """Why the breaker is open (empty when closed)."""
        with self._lock:
            return self._reason

    def allow(self) -> bool:
        """May a frame go to the cloud now? Only while closed."""
        with self._lock:
            return self._state is State.CLOSED

    def seconds_to_probe(self) -> float | None:
        """None while closed or half-open; else seconds until the next probe is due (>= 0)."""
        with self._lock:
            if self._state is not State.OPEN:
                return None
            return max(0.0, self._next_probe - self._clock())

    # -- transitions -----------------------------------------------------------------------------
    def record_success(self) -> None:
        with self._lock:
            self._consecutive = 0
            if self._state is State.HALF_OPEN:
                self._set(State.CLOSED, "")

    def record_failure(self, reason: str) -> None:
        with self._lock:
            self._consecutive += 1
            if self._state is State.CLOSED and self._consecutive >= self.threshold:
                self._open(reason, reset_interval=True)

    def trip(self, reason: str) -> None:
        """Open now, whatever the count (a dropped link, a mismatch, a refused token)."""
        with self._lock:
            if self._state is not State.OPEN:
                self._open(reason, reset_interval=self._state is State.CLOSED)
            else:
                self._reason = reason

    def try_probe(self) -> bool:
        """If a probe is due, move to half-open and return True: the caller must report the outcome
        with `probe_succeeded()` or `probe_failed()`. At most one probe runs at a time."""
        with self._lock:
            if self._state is not State.OPEN or self._clock() < self._next_probe:
                return False
            self._set(State.HALF_OPEN, self._reason)
            return True

    def probe_succeeded(self) -> None:
        with self._lock:
            self._consecutive = 0
            if self._state is State.HALF_OPEN:
                self._set(State.CLOSED, "")

    def probe_failed(self, reason: str) -> None:
        with self._lock:
            if self._state is State.HALF_OPEN:
                self._interval = min(self._interval * 2, self.probe_max)
                self._next_probe = self._clock() + self._interval
                self._set(State.OPEN, reason)

    def wait_change(self, timeout: float) -> None:
        """Sleep until the state changes or `timeout` passes (used by the prober thread)."""
        with self._changed:
            self._changed.wait(timeout)

    def notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # -- internals (lock held) -------------------------------------------------------------------
    def _open(self, reason: str, *, reset_interval: bool) -> None:
        if reset_interval:
            self._interval = self.probe_interval
        self._next_probe = self._clock() + self._interval
        self.opened += 1
        self._set(State.OPEN, reason)

    def _set(self, state: State, reason: str) -> None:
        old = self._state
        self._state = state
        self._reason = reason
        self._changed.notify_all()
        if old is not state and self._on_change is not None:
            self._on_change(old, state, reason)

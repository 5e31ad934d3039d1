from __future__ import annotations

from edge_node.breaker import CircuitBreaker, State


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(**kw) -> tuple[CircuitBreaker, Clock, list[tuple[State, State]]]:
    clock = Clock()
    changes: list[tuple[State, State]] = []
    b = CircuitBreaker(clock=clock, on_change=lambda old, new, why: changes.append((old, new)), **kw)
    return b, clock, changes


def test_opens_after_consecutive_failures_only() -> None:
    b, _, _ = make(failures=3)
    b.record_failure("x")
    b.record_failure("x")
    b.record_success()  # resets the count
    b.record_failure("x")
    b.record_failure("x")
    assert b.state is State.CLOSED and b.allow()
    b.record_failure("timeout")
    assert b.state is State.OPEN and not b.allow()
    assert b.reason == "timeout"


def test_half_open_probe_closes_on_success() -> None:
    b, clock, changes = make(failures=1, probe_interval=0.5)
    b.record_failure("down")
    assert not b.try_probe()  # not due yet
    assert b.seconds_to_probe() == 0.5
    clock.t += 0.5
    assert b.try_probe()
    assert b.state is State.HALF_OPEN and not b.allow()
    assert not b.try_probe()  # only one probe at a time
    b.probe_succeeded()
    assert b.state is State.CLOSED and b.allow() and b.reason == ""
    assert changes == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]


def test_failed_probes_back_off_up_to_the_cap() -> None:
    b, clock, _ = make(failures=1, probe_interval=0.5, probe_max=2.0)
    b.trip("down")
    waits = []
    for _ in range(5):
        waits.append(b.seconds_to_probe())
        clock.t += waits[-1]
        assert b.try_probe()
        b.probe_failed("still down")
    assert waits == [0.5, 1.0, 2.0, 2.0, 2.0]
    assert b.state is State.OPEN and b.reason == "still down"


def test_reopening_after_recovery_starts_from_the_short_interval() -> None:
    b, clock, _ = make(failures=1, probe_interval=0.5, probe_max=2.0)
    b.trip("down")
    for _ in range(3):
        clock.t += 10
        b.try_probe()
        b.probe_failed("down")
    clock.t += 10
    b.try_probe()
    b.probe_succeeded()
    b.record_failure("down again")
    assert b.seconds_to_probe() == 0.5
    assert b.opened == 2


def test_trip_opens_immediately() -> None:
    b, _, _ = make(failures=5)
    b.trip("bundle_mismatch: x")
    assert b.state is State.OPEN and b.reason.startswith("bundle_mismatch")

from __future__ import annotations

import time

import grpc
import pytest

from edge_node.retry import DeadlineSpent, call_with_retry, is_transient


class Err(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name


def flaky(codes: list[grpc.StatusCode]):
    calls: list[float] = []

    def fn(timeout: float) -> str:
        calls.append(timeout)
        if codes:
            raise Err(codes.pop(0))
        return "ok"

    return fn, calls


def test_transient_statuses() -> None:
    assert is_transient(Err(grpc.StatusCode.UNAVAILABLE))
    assert is_transient(Err(grpc.StatusCode.RESOURCE_EXHAUSTED))
    for c in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "UNAUTHENTICATED", "DEADLINE_EXCEEDED"):
        assert not is_transient(Err(grpc.StatusCode[c]))
    assert not is_transient(ValueError())


def test_retries_transient_until_success() -> None:
    fn, calls = flaky([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
    assert call_with_retry(fn, deadline=time.monotonic() + 5, attempts=3, backoff=0.001) == "ok"
    assert len(calls) == 3
    assert all(0 < t <= 5 for t in calls)
    assert calls[0] >= calls[1] >= calls[2]  # each attempt gets only what is left of the deadline


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "FAILED_PRECONDITION", "UNAUTHENTICATED"])
def test_never_retries_permanent_errors(code: str) -> None:
    fn, calls = flaky([grpc.StatusCode[code]])
    with pytest.raises(grpc.RpcError) as e:
        call_with_retry(fn, deadline=time.monotonic() + 5, attempts=5)
    assert e.value.code() is grpc.StatusCode[code]
    assert len(calls) == 1


def test_gives_up_after_attempts() -> None:
    fn, calls = flaky([grpc.StatusCode.UNAVAILABLE] * 10)
    with pytest.raises(grpc.RpcError):
        call_with_retry(fn, deadline=time.monotonic() + 5, attempts=3, backoff=0.001)
    assert len(calls) == 3


def test_never_runs_past_the_deadline() -> None:
    fn, calls = flaky([grpc.StatusCode.UNAVAILABLE] * 100)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError):
        call_with_retry(fn, deadline=start + 0.3, attempts=100, backoff=0.05, backoff_max=0.2)
    assert time.monotonic() - start < 2.0  # stopped near the deadline (0.3 s), far from 100 attempts
    assert 1 < len(calls) < 100


def test_spent_deadline_is_deadline_exceeded() -> None:
    fn, calls = flaky([])
    with pytest.raises(DeadlineSpent) as e:
        call_with_retry(fn, deadline=time.monotonic() - 1)
    assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert calls == []

"""Which gRPC failures are worth retrying, and the tenacity policy that retries them.

Transient (retried): UNAVAILABLE (connection refused or reset, proxy restarting), RESOURCE_EXHAUSTED
(the cloud sheds load; backing off is what it asks for), ABORTED (a replica died mid-call). Never
retried: INVALID_ARGUMENT, FAILED_PRECONDITION (bundle mismatch), UNAUTHENTICATED, PERMISSION_DENIED,
NOT_FOUND, UNIMPLEMENTED: the same request would fail the same way. DEADLINE_EXCEEDED is not retried
either: the frame's deadline is spent, so there is no time left to retry in; the breaker counts it.

Every attempt gets the time left until the frame's deadline as its gRPC timeout, and retries stop
once that deadline is reached: a retry never makes a frame later than its deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import grpc
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from edge_node.reasons import TRANSIENT

T = TypeVar("T")


def status_of(e: BaseException) -> grpc.StatusCode | None:
    return e.code() if isinstance(e, grpc.RpcError) and hasattr(e, "code") else None


def is_transient(e: BaseException) -> bool:
    return status_of(e) in TRANSIENT


def call_with_retry(
    fn: Callable[[float], T],
    *,
    deadline: float,
    attempts: int = 3,
    backoff: float = 0.05,
    backoff_max: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call `fn(timeout_s)` until it succeeds, a non-transient error, `attempts` tries, or `deadline`
    (a `clock()` value). `fn` gets the seconds left to the deadline as its timeout. Waits between
    tries are exponential with full jitter (AWS-style), capped at `backoff_max`."""
    start = clock()
    budget = deadline - start
    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(attempts) | stop_before_delay(max(budget, 0.0)),
        wait=wait_random_exponential(multiplier=backoff, max=backoff_max),
        reraise=True,
    )

    def attempt() -> T:
        left = deadline - clock()
        if left <= 0:
            raise DeadlineSpent()
        return fn(left)

    return retrying(attempt)


class DeadlineSpent(grpc.RpcError):
    """Raised instead of calling when a frame's deadline passed between retries."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "frame deadline spent before the call"

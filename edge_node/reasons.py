"""Why a frame was answered where it was: the Reason values and the one mapping from a gRPC outcome to them.

Every failure the edge sees (a unary status, a stream that broke, an error Result, a refused Hello)
goes through `outcome()`, which says the frame's reason and what it does to the circuit breaker.
A bundle mismatch is FAILED_PRECONDITION *and* the structured kind "bundle-mismatch" (Result.error.kind,
or trailing metadata x-splitclip-error on a unary refusal); the message text is never parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import grpc

from splitclip.constants import ERROR_BUNDLE_MISMATCH, ERROR_IMAGE_UPLOAD_REFUSED, ERROR_KIND_METADATA_KEY


class Reason(StrEnum):
    """Why a frame was answered the way it was (the `reason` field of every result)."""

    CLOUD = "cloud"  # split mode, the cloud answered
    NO_CLOUD = "no_cloud"  # no cloud configured: local only
    BREAKER_OPEN = "breaker_open"  # the cloud failed repeatedly; waiting for a probe to succeed
    LINK_LOST = "link_lost"  # the stream broke while the frame was in flight; re-run locally
    DEADLINE = "deadline"  # no answer within the frame deadline; re-run locally
    CLOUD_ERROR = "cloud_error"  # the cloud answered this frame with an error; re-run locally
    BUNDLE_MISMATCH = "bundle_mismatch"  # the cloud runs another bundle
    IMAGE_UPLOAD_REFUSED = "image_upload_refused"  # the cloud does not take pixels (cut 0)
    UNAUTHENTICATED = "unauthenticated"  # the cloud refused the node token
    REJECTED = "rejected"  # the cloud refused the node (Hello not accepted)
    ERROR = "error"  # the frame could not be answered at all (e.g. unreadable image)


REFUSALS = frozenset(
    {Reason.BUNDLE_MISMATCH, Reason.IMAGE_UPLOAD_REFUSED, Reason.UNAUTHENTICATED, Reason.REJECTED}
)  # waiting won't fix

# Worth retrying (retry.py) and counted against the breaker: the cloud is away, busy or restarting.
TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
)
_TRANSIENT_NAMES = frozenset(c.name for c in TRANSIENT)
# Counted against the breaker too: the cloud is unwell rather than refusing this one request.
_UNWELL = _TRANSIENT_NAMES | {"DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN"}


class Breaker(StrEnum):
    """What an outcome does to the circuit breaker."""

    TRIP = "trip"  # open it now: a refusal
    FAILURE = "failure"  # one more consecutive failure
    NONE = "none"  # about this request only (e.g. INVALID_ARGUMENT): the cloud is fine


class Where(StrEnum):
    UNARY = "unary"  # a unary Classify failed with a status
    STREAM = "stream"  # the frame was in flight on a stream that failed (or its deadline passed)
    RESULT = "result"  # the cloud answered the frame with Result.error
    HELLO = "hello"  # Hello (start, heartbeat, probe) failed with a status


@dataclass(frozen=True)
class Outcome:
    reason: str  # a Reason value, optionally followed by ": detail"
    breaker: Breaker

    @property
    def refusal(self) -> bool:
        return self.breaker is Breaker.TRIP


def outcome(code: grpc.StatusCode | str | None, details: str, *, where: Where, kind: str = "") -> Outcome:
    """The one mapping. `code`: a status (or its name; None when a stream ended without one), `details`:
    the status details or error message (for STREAM, the stream's whole failure text), `kind`: the
    structured error kind the cloud sent, if any."""
    name = code.name if isinstance(code, grpc.StatusCode) else (code or "")
    if name == "UNAUTHENTICATED":
        return Outcome(f"{Reason.UNAUTHENTICATED}: {details}", Breaker.TRIP)
    if name == "FAILED_PRECONDITION" and kind == ERROR_BUNDLE_MISMATCH:
        return Outcome(f"{Reason.BUNDLE_MISMATCH}: {details}", Breaker.TRIP)
    if name == "FAILED_PRECONDITION" and kind == ERROR_IMAGE_UPLOAD_REFUSED:
        return Outcome(f"{Reason.IMAGE_UPLOAD_REFUSED}: {details}", Breaker.TRIP)
    health = Breaker.FAILURE if name in _UNWELL else Breaker.NONE
    status = f"{name or 'UNKNOWN'}: {details}"
    match where:
        case Where.HELLO:
            return Outcome(f"hello failed: {status}", Breaker.FAILURE)
        case Where.STREAM if name == "DEADLINE_EXCEEDED":
            return Outcome(Reason.DEADLINE, Breaker.FAILURE)
        case Where.STREAM:  # whatever ended the stream, the frame was lost in flight
            return Outcome(f"{Reason.LINK_LOST}: {details}", Breaker.FAILURE)
        case Where.UNARY if name == "DEADLINE_EXCEEDED":
            return Outcome(Reason.DEADLINE, Breaker.FAILURE)
        case Where.UNARY if name in _TRANSIENT_NAMES:
            return Outcome(f"{Reason.LINK_LOST}: {status}", Breaker.FAILURE)
        case _:
            return Outcome(f"{Reason.CLOUD_ERROR}: {status}", health)


def error_kind(e: grpc.RpcError) -> str:
    """The structured kind of a failed call (trailing metadata x-splitclip-error), or ""."""
    trailing = getattr(e, "trailing_metadata", None)
    try:
        md = trailing() if callable(trailing) else None
    except Exception:  # a call object that never completed has no metadata to give
        md = None
    for key, value in md or ():
        if key == ERROR_KIND_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def rpc_outcome(e: grpc.RpcError, where: Where) -> Outcome:
    code = e.code() if callable(getattr(e, "code", None)) else None
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    return outcome(code, details or "", where=where, kind=error_kind(e))


def result_outcome(error: object) -> Outcome:
    """An error Result (pb.Error: code, message, kind)."""
    return outcome(
        getattr(error, "code", ""),
        getattr(error, "message", ""),
        where=Where.RESULT,
        kind=getattr(error, "kind", ""),
    )


def hello_refusal(*, accepted: bool, cloud_bundle_id: str, bundle_id: str, message: str) -> Outcome | None:
    """A Hello the cloud answered but did not accept: another bundle (its id in the response), or a
    refused node. None when accepted."""
    if cloud_bundle_id and cloud_bundle_id != bundle_id:
        why = f"cloud runs {cloud_bundle_id}, this node runs {bundle_id}"
        return Outcome(f"{Reason.BUNDLE_MISMATCH}: {why}", Breaker.TRIP)
    if not accepted:
        return Outcome(f"{Reason.REJECTED}: {message or 'Hello not accepted'}", Breaker.TRIP)
    return None


def base(reason: str) -> str:
    """The Reason value of a reason string ("link_lost: UNAVAILABLE ..." -> "link_lost")."""
    return reason.split(":", 1)[0]


def is_refusal(reason: str) -> bool:
    return base(reason) in REFUSALS


def local_reason(breaker_reason: str, *, has_cloud: bool) -> str:
    """The reason of a frame answered locally without trying the cloud."""
    if not has_cloud:
        return Reason.NO_CLOUD
    if not breaker_reason:
        return Reason.BREAKER_OPEN
    if is_refusal(breaker_reason):
        return breaker_reason
    return f"{Reason.BREAKER_OPEN}: {breaker_reason}"

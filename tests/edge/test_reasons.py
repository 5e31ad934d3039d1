"""The one mapping from a gRPC outcome to the edge's reason and breaker action (edge_node/reasons.py)."""

from __future__ import annotations

import grpc
import pytest

from edge_node.reasons import Breaker, Where, hello_refusal, local_reason, outcome
from splitclip.constants import ERROR_BUNDLE_MISMATCH, ERROR_IMAGE_UPLOAD_REFUSED

C = grpc.StatusCode


@pytest.mark.parametrize(
    ("code", "where", "kind", "reason", "breaker"),
    [
        (C.UNAUTHENTICATED, Where.UNARY, "", "unauthenticated: d", Breaker.TRIP),
        (C.UNAUTHENTICATED, Where.HELLO, "", "unauthenticated: d", Breaker.TRIP),
        (C.FAILED_PRECONDITION, Where.UNARY, ERROR_BUNDLE_MISMATCH, "bundle_mismatch: d", Breaker.TRIP),
        (C.FAILED_PRECONDITION, Where.HELLO, ERROR_BUNDLE_MISMATCH, "bundle_mismatch: d", Breaker.TRIP),
        ("FAILED_PRECONDITION", Where.RESULT, ERROR_BUNDLE_MISMATCH, "bundle_mismatch: d", Breaker.TRIP),
        (
            "FAILED_PRECONDITION",
            Where.RESULT,
            ERROR_IMAGE_UPLOAD_REFUSED,
            "image_upload_refused: d",
            Breaker.TRIP,
        ),
        (
            C.FAILED_PRECONDITION,
            Where.UNARY,
            ERROR_IMAGE_UPLOAD_REFUSED,
            "image_upload_refused: d",
            Breaker.TRIP,
        ),
        ("FAILED_PRECONDITION", Where.RESULT, "", "cloud_error: FAILED_PRECONDITION: d", Breaker.NONE),
        (C.FAILED_PRECONDITION, Where.UNARY, "", "cloud_error: FAILED_PRECONDITION: d", Breaker.NONE),
        (C.DEADLINE_EXCEEDED, Where.UNARY, "", "deadline", Breaker.FAILURE),
        (C.DEADLINE_EXCEEDED, Where.STREAM, "", "deadline", Breaker.FAILURE),
        (C.UNAVAILABLE, Where.UNARY, "", "link_lost: UNAVAILABLE: d", Breaker.FAILURE),
        (C.UNAVAILABLE, Where.STREAM, "", "link_lost: d", Breaker.FAILURE),
        (None, Where.STREAM, "", "link_lost: d", Breaker.FAILURE),
        (C.INVALID_ARGUMENT, Where.UNARY, "", "cloud_error: INVALID_ARGUMENT: d", Breaker.NONE),
        ("INVALID_ARGUMENT", Where.RESULT, "", "cloud_error: INVALID_ARGUMENT: d", Breaker.NONE),
        ("RESOURCE_EXHAUSTED", Where.RESULT, "", "cloud_error: RESOURCE_EXHAUSTED: d", Breaker.FAILURE),
        (C.INTERNAL, Where.UNARY, "", "cloud_error: INTERNAL: d", Breaker.FAILURE),
        (C.UNAVAILABLE, Where.HELLO, "", "hello failed: UNAVAILABLE: d", Breaker.FAILURE),
    ],
)
def test_outcome_table(code, where, kind, reason, breaker) -> None:
    o = outcome(code, "d", where=where, kind=kind)
    assert (o.reason, o.breaker) == (reason, breaker)


def test_a_bundle_is_never_recognised_by_the_message_text() -> None:
    o = outcome("FAILED_PRECONDITION", "bundle mismatch: the node runs another bundle", where=Where.RESULT)
    assert o.reason.startswith("cloud_error") and o.breaker is Breaker.NONE
    o = outcome("INVALID_ARGUMENT", "x", where=Where.RESULT, kind=ERROR_BUNDLE_MISMATCH)
    assert o.reason.startswith("cloud_error")  # the kind only refines FAILED_PRECONDITION


def test_hello_refusals_and_local_reasons() -> None:
    assert hello_refusal(accepted=True, cloud_bundle_id="b1", bundle_id="b1", message="") is None
    mm = hello_refusal(accepted=False, cloud_bundle_id="b2", bundle_id="b1", message="")
    assert mm is not None and mm.reason == "bundle_mismatch: cloud runs b2, this node runs b1" and mm.refusal
    no = hello_refusal(accepted=False, cloud_bundle_id="b1", bundle_id="b1", message="full")
    assert no is not None and no.reason == "rejected: full"
    assert local_reason("", has_cloud=False) == "no_cloud"
    assert local_reason("", has_cloud=True) == "breaker_open"
    assert local_reason("link_lost: x", has_cloud=True) == "breaker_open: link_lost: x"
    assert local_reason("bundle_mismatch: y", has_cloud=True) == "bundle_mismatch: y"

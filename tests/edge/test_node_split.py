"""Split mode against a real gRPC server (tests/edge/refcloud.py): equality, window, deadlines,
dropped links, breaker recovery, bundle mismatch, token refusal, unary retries."""

from __future__ import annotations

import queue
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from edge_node.node import EdgeNode
from edge_node.results import EdgeResult
from tests.edge.conftest import PROMPTS
from tests.edge.refcloud import RefCloud

FAST = {"probe_interval_s": 0.2, "probe_max_s": 0.5, "hello_timeout_s": 3.0, "codec": "int8-zstd"}


def by_id(results) -> list[EdgeResult]:
    out = sorted(results, key=lambda r: r.frame_id)
    assert len({r.frame_id for r in out}) == len(out), "a frame was answered twice"
    return out


@pytest.mark.parametrize("cut", [0, 1, 3])
def test_split_equals_local_with_the_lossless_codec(bundle: Path, images, cloud: RefCloud, cut: int) -> None:
    with (
        EdgeNode(bundle, cloud=f"127.0.0.1:{cloud.port}", cut=cut, codec="lossless") as node,
        EdgeNode(bundle) as local,
    ):
        split = by_id(node.classify_many(images, PROMPTS))
        ref = by_id(local.classify_many(images, PROMPTS))
        one = node.classify(images[0], PROMPTS)  # the unary path
    assert [r.mode for r in split] == ["split"] * len(images)
    assert all(r.reason == "cloud" and r.bytes_sent > 0 and r.cut == cut for r in split)
    for s, r in zip(split, ref, strict=True):
        assert s.labels == r.labels
        np.testing.assert_allclose(s.probabilities, r.probabilities, atol=1e-5)
    assert one.mode == "split"
    np.testing.assert_allclose(one.probabilities, ref[0].probabilities, atol=1e-5)
    assert cloud.frames == len(images) and cloud.classify_calls == 1


def test_window_bounds_frames_in_flight(bundle: Path, images, cloud: RefCloud) -> None:
    cloud.faults.delay_s = 0.05
    with EdgeNode(bundle, cloud=f"127.0.0.1:{cloud.port}", window=3, codec="fp16") as node:
        results = by_id(node.classify_many(images, PROMPTS))
        stream = node._stream
        assert stream is not None
        assert stream.max_in_flight == 3  # filled, never exceeded
    assert [r.mode for r in results] == ["split"] * len(images)


def test_frame_past_its_deadline_is_answered_locally_once(bundle: Path, images, cloud: RefCloud) -> None:
    cloud.faults.delay_s = 2.5
    cloud.faults.delay_frames = {3}  # the node's third frame (refcloud counts a node's frames from 1)
    with EdgeNode(
        bundle, cloud=f"127.0.0.1:{cloud.port}", codec="int8-zstd", frame_deadline_s=1.0, breaker_failures=5
    ) as node:
        results = by_id(node.classify_many(images[:6], PROMPTS))
        stream = node._stream
        assert stream is not None
        until = time.monotonic() + 10
        while stream.late < 1 and time.monotonic() < until:  # let the late cloud answer arrive
            time.sleep(0.05)
        node.close()
        assert node.stats.late_dropped == 1  # the cloud's answer came after the local one: dropped
        assert node.stats.frames == 6
    modes = {n: (r.mode, r.reason) for n, r in enumerate(results, start=1)}  # by the node's frame number
    assert modes[3] == ("local", "deadline")
    assert all(m == ("split", "cloud") for fid, m in modes.items() if fid != 3)
    assert results[2].bytes_sent > 0  # it was sent before it timed out


def test_dropped_link_reruns_in_flight_frames_locally_exactly_once(
    bundle: Path, images, cloud: RefCloud
) -> None:
    cloud.faults.cut_stream_after = 4
    cloud.faults.delay_s = 0.02
    with (
        EdgeNode(bundle, cloud=f"127.0.0.1:{cloud.port}", window=4, breaker_failures=100, **FAST) as node,
        EdgeNode(bundle) as local,
    ):
        results = by_id(node.classify_many(images, PROMPTS))
        ref = by_id(local.classify_many(images, PROMPTS))
    first = results[0].frame_id  # ids are consecutive from the clock (edge_node.tickets.frame_ids)
    assert [r.frame_id for r in results] == list(range(first, first + len(images)))
    reasons = Counter(r.reason.split(":")[0] for r in results)
    assert reasons["cloud"] >= 4 and reasons["link_lost"] >= 1, reasons
    for r, want in zip(results, ref, strict=True):  # whichever side answered, the answer is right
        np.testing.assert_allclose(r.probabilities, want.probabilities, atol=1e-2)


def test_cloud_death_opens_the_breaker_and_recovery_closes_it(bundle: Path, images, cloud: RefCloud) -> None:
    addr = f"127.0.0.1:{cloud.port}"
    with EdgeNode(bundle, cloud=addr, breaker_failures=2, **FAST) as node:
        first = list(node.classify_many(images[:3], PROMPTS))
        assert {r.mode for r in first} == {"split"}
        cloud.stop()
        down = by_id(node.classify_many(images, PROMPTS))
        assert len(down) == len(images)
        assert down[-1].mode == "local" and down[-1].reason.startswith("breaker_open")
        assert node.mode == "local"
        cloud.start(cloud.port)
        t0 = time.monotonic()
        while node.mode != "split":
            assert time.monotonic() - t0 < 5.0, "did not return to split mode within 5 s"
            time.sleep(0.05)
        again = node.classify(images[0], PROMPTS)
        assert again.mode == "split"
        assert node.breaker.opened == 1


def test_bundle_mismatch_goes_local_with_the_reason(bundle: Path, images, caplog) -> None:
    rc = RefCloud(bundle, cloud_bundle_id="b-0000000000000000")
    rc.start()
    try:
        with (
            caplog.at_level("WARNING", logger="splitclip.edge"),
            EdgeNode(bundle, cloud=f"127.0.0.1:{rc.port}", **FAST) as node,
        ):
            results = list(node.classify_many(images[:4], PROMPTS))
            time.sleep(1.2)  # the prober keeps asking; no crash loop, one log line
        assert {r.mode for r in results} == {"local"}
        assert all(
            r.reason.startswith("bundle_mismatch") and "b-0000000000000000" in r.reason for r in results
        )
        assert rc.frames == 0
        assert rc.hellos >= 2
        assert sum("bundle_mismatch" in m for m in caplog.messages) == 1
    finally:
        rc.stop()


def test_wrong_token_is_unauthenticated_and_answers_locally(bundle: Path, images) -> None:
    rc = RefCloud(bundle, token="right")
    rc.start()
    try:
        with EdgeNode(bundle, cloud=f"127.0.0.1:{rc.port}", node_token="wrong", **FAST) as node:
            r = node.classify(images[0], PROMPTS)
        assert (r.mode, r.reason.split(":")[0]) == ("local", "unauthenticated")
        with EdgeNode(bundle, cloud=f"127.0.0.1:{rc.port}", node_token="right", **FAST) as node:
            assert node.classify(images[0], PROMPTS).mode == "split"
    finally:
        rc.stop()


def test_unary_retries_transient_statuses_only(bundle: Path, images, cloud: RefCloud) -> None:
    with EdgeNode(bundle, cloud=f"127.0.0.1:{cloud.port}", retry_attempts=3, **FAST) as node:
        cloud.faults.unary_codes = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED]
        r = node.classify(images[0], PROMPTS)
        assert (r.mode, cloud.classify_calls) == ("split", 3)
        cloud.faults.unary_codes = [grpc.StatusCode.INVALID_ARGUMENT]
        r = node.classify(images[0], PROMPTS)
        assert (r.mode, cloud.classify_calls) == ("local", 4)  # not retried
        assert r.reason.startswith("cloud_error: INVALID_ARGUMENT")


def test_error_results_are_rerun_locally(bundle: Path, images, cloud: RefCloud) -> None:
    cloud.faults.error_frames = {2: "INVALID_ARGUMENT"}
    with EdgeNode(bundle, cloud=f"127.0.0.1:{cloud.port}", **FAST) as node:
        results = by_id(node.classify_many(images[:4], PROMPTS))
    assert [r.mode for r in results] == ["split", "local", "split", "split"]
    assert results[1].reason.startswith("cloud_error: INVALID_ARGUMENT")


def test_a_bundle_mismatch_result_is_known_by_its_kind_not_its_message(
    bundle: Path, images, cloud: RefCloud
) -> None:
    cloud.faults.error_frames = {2: "FAILED_PRECONDITION"}
    cloud.faults.error_message = "bundle mismatch (says the text, but no kind)"
    with EdgeNode(bundle, cloud=f"127.0.0.1:{cloud.port}", window=1, **FAST) as node:
        results = by_id(node.classify_many(images[:4], PROMPTS))
        assert node.breaker.opened == 0
    assert [r.mode for r in results] == ["split", "local", "split", "split"]
    assert results[1].reason.startswith("cloud_error: FAILED_PRECONDITION")

    cloud.faults.error_kind = "bundle-mismatch"
    with EdgeNode(
        bundle,
        cloud=f"127.0.0.1:{cloud.port}",
        codec="int8-zstd",
        window=1,
        probe_interval_s=30,
        probe_max_s=30,
    ) as node:
        results = by_id(node.classify_many(images[:4], PROMPTS))
        assert node.mode == "local" and node.mode_reason.startswith("bundle_mismatch")
    assert [r.mode for r in results] == ["split", "local", "local", "local"]
    assert all(r.reason.startswith("bundle_mismatch") for r in results[1:]), results


def test_a_unary_refusal_with_the_bundle_mismatch_kind_opens_the_breaker(
    bundle: Path, images, cloud: RefCloud
) -> None:
    with EdgeNode(
        bundle, cloud=f"127.0.0.1:{cloud.port}", codec="int8-zstd", probe_interval_s=30, probe_max_s=30
    ) as node:
        cloud.faults.unary_codes = [grpc.StatusCode.FAILED_PRECONDITION]
        cloud.faults.unary_kind = "bundle-mismatch"
        r = node.classify(images[0], PROMPTS)
        assert (r.mode, r.reason) == ("local", "bundle_mismatch: injected")
        assert node.mode == "local"
        cloud.faults.unary_codes = [grpc.StatusCode.FAILED_PRECONDITION]
        cloud.faults.unary_kind = ""
    with EdgeNode(bundle, cloud=f"127.0.0.1:{cloud.port}", **FAST) as node:
        r = node.classify(images[0], PROMPTS)  # without the kind: an error about this request only
        assert (r.mode, r.reason) == ("local", "cloud_error: FAILED_PRECONDITION: injected")
        assert node.mode == "split"


def test_a_healthy_node_says_hello_every_heartbeat_interval(bundle: Path, images) -> None:
    rc = RefCloud(bundle, heartbeat_interval_s=0.3)
    rc.start()
    try:
        with EdgeNode(bundle, cloud=f"127.0.0.1:{rc.port}", **FAST) as node:
            list(node.classify_many(images[:2], PROMPTS))
            time.sleep(1.6)
            assert node.mode == "split"
        after_close = rc.hellos
        time.sleep(0.7)
        assert rc.hellos == after_close, "a closed node kept saying Hello"
    finally:
        rc.stop()
    reqs = rc.hello_requests
    assert len(reqs) >= 1 + 3, len(reqs)  # the first Hello, then one per 0.3 s
    assert {r.mode for r in reqs} == {"split"}
    assert reqs[0].frames_answered == 0 and reqs[-1].frames_answered == 2
    assert reqs[-1].node_id == node.settings.node_id and reqs[-1].bundle_id == node.bundle_id


def test_probes_say_the_node_answers_locally(bundle: Path, images, cloud: RefCloud) -> None:
    addr = f"127.0.0.1:{cloud.port}"
    with EdgeNode(bundle, cloud=addr, breaker_failures=1, **FAST) as node:
        cloud.stop()
        assert node.classify(images[0], PROMPTS).mode == "local"
        cloud.start(cloud.port)
        t0 = time.monotonic()
        while node.mode != "split":
            assert time.monotonic() - t0 < 5.0
            time.sleep(0.05)
    probe = cloud.hello_requests[-1]
    assert probe.mode == "local" and probe.frames_answered == 1


def test_late_answers_are_counted_as_they_arrive_and_never_overwritten(
    bundle: Path, images, cloud: RefCloud
) -> None:
    """stats.late_dropped used to be recomputed from the retired streams' counts: a late answer on
    the live stream did not show, and retiring a stream overwrote the drops counted elsewhere."""
    from edge_node.tickets import Ticket
    from splitclip.prompts import prompt_set

    cloud.faults.delay_s = 2.0
    cloud.faults.delay_frames = {2}
    with EdgeNode(
        bundle, cloud=f"127.0.0.1:{cloud.port}", codec="int8-zstd", frame_deadline_s=0.8, breaker_failures=5
    ) as node:
        results = by_id(node.classify_many(images[:3], PROMPTS))
        assert [r.reason for r in results] == ["cloud", "deadline", "cloud"]
        until = time.monotonic() + 10
        while node.stats.late_dropped < 1:  # the live stream's late answer, counted at once
            assert time.monotonic() < until, "the late answer was not counted"
            time.sleep(0.05)
        assert node._stream is not None and node._stream.alive
        t = Ticket(99, "x", prompt_set(PROMPTS), queue.SimpleQueue())
        node._deliver(t, t.error_result(RuntimeError("first")))
        node._deliver(t, t.error_result(RuntimeError("second, dropped")))  # a second answer to one frame
        assert node.stats.late_dropped == 2
        node.close()  # retires the stream
        assert node.stats.late_dropped == 2


def test_no_prober_or_stream_threads_outlive_closed_nodes(bundle: Path, images, cloud: RefCloud) -> None:
    import threading

    for _ in range(2):
        with EdgeNode(bundle, cloud=f"127.0.0.1:{cloud.port}", **FAST) as node:
            list(node.classify_many(images[:2], PROMPTS))
    names = [t.name for t in threading.enumerate()]
    assert not [n for n in names if n.startswith(("edge-prober", "edge-stream", "edge-local"))], names


def test_a_cloud_that_refuses_pixels_keeps_a_cut_0_node_local_for_good(bundle: Path, images) -> None:
    """The refusal is about cut 0, not the link: one refused frame, then every frame local with the reason,
    even after probes and heartbeats succeed (no flapping back to split)."""
    rc = RefCloud(bundle, allow_image_upload=False)
    rc.start()
    try:
        with EdgeNode(bundle, cloud=f"127.0.0.1:{rc.port}", cut=0, **{**FAST, "codec": "lossless"}) as node:
            first = node.classify(images[0], PROMPTS)
            time.sleep(0.8)  # longer than a probe interval
            rest = list(node.classify_many(images[:4], PROMPTS))
            assert node.mode == "local" and node.mode_reason.startswith("image_upload_refused")
        assert [r.mode for r in [first, *rest]] == ["local"] * 5
        assert all(r.reason.startswith("image_upload_refused") for r in [first, *rest])
        assert rc.frames + rc.classify_calls == 1  # only the first frame ever reached the cloud
    finally:
        rc.stop()

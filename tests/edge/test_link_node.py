"""An EdgeNode talking gRPC to the reference cloud through benchmarks/link.LinkProxy: split mode, stall, reset, refusal."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.link import LinkProxy
from edge_node.node import EdgeNode
from edge_node.results import EdgeResult
from tests.edge.conftest import PROMPTS
from tests.edge.refcloud import RefCloud

# a fixed plan (cut 1), so every frame is a split frame while the link is up
FAST = {"probe_interval_s": 0.2, "probe_max_s": 0.5, "hello_timeout_s": 1.0, "cut": 1, "codec": "int8-zstd"}


def by_id(results: list[EdgeResult], sent: int) -> list[EdgeResult]:
    out = sorted(results, key=lambda r: r.frame_id)
    assert len({r.frame_id for r in out}) == len(out), "a frame was answered twice"
    assert len(out) == sent, "a frame got no answer"
    return out


def wait_split(node: EdgeNode, within_s: float = 8.0) -> float:
    t0 = time.monotonic()
    while node.mode != "split":
        assert time.monotonic() - t0 < within_s, (
            f"not back to split mode within {within_s} s: {node.mode_reason}"
        )
        time.sleep(0.05)
    return time.monotonic() - t0


def wait_for(cond, within_s: float = 5.0) -> None:
    until = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < until
        time.sleep(0.01)


@pytest.fixture
def proxy(cloud: RefCloud) -> Iterator[LinkProxy]:
    with LinkProxy("127.0.0.1", cloud.port) as p:
        yield p


def test_frames_are_answered_in_split_mode_through_the_proxy(bundle: Path, images, proxy: LinkProxy) -> None:
    proxy.set(mbps_up=20, mbps_down=20, delay_ms=10)
    with EdgeNode(bundle, cloud=proxy.address, **FAST) as node:
        results = by_id(list(node.classify_many(images[:6], PROMPTS)), 6)
        one = node.classify(images[0], PROMPTS)
    assert [r.mode for r in [*results, one]] == ["split"] * 7
    st = proxy.stats()
    assert st.connections >= 1 and st.bytes_up > sum(r.bytes_sent for r in results) and st.bytes_down > 0


def test_a_stalled_link_is_noticed_by_the_deadline_and_split_mode_returns_after_resume(
    bundle: Path, images, cloud: RefCloud, proxy: LinkProxy
) -> None:
    with EdgeNode(bundle, cloud=proxy.address, frame_deadline_s=1.0, breaker_failures=2, **FAST) as node:
        assert {r.mode for r in node.classify_many(images[:3], PROMPTS)} == {"split"}
        proxy.stall()
        t0 = time.monotonic()
        stalled = by_id(list(node.classify_many(images[:5], PROMPTS)), 5)
        took = time.monotonic() - t0
        assert node.mode == "local"
        time.sleep(0.6)  # probes fail on the silent link
        assert node.mode == "local"
        proxy.resume()
        wait_split(node)
        after = by_id(list(node.classify_many(images[:4], PROMPTS)), 4)
        node.close()
        late = node.stats.late_dropped
    assert {r.mode for r in stalled} == {"local"}
    assert {r.reason.split(":")[0] for r in stalled} <= {"deadline", "link_lost"}, [r.reason for r in stalled]
    assert 0.9 <= took <= 4.0, took  # the frame deadline, not sooner (nothing was closed) nor much later
    assert {r.mode for r in after} == {"split"}
    assert late <= 5  # answers to stalled frames that arrived after the resume were dropped, not delivered


def test_a_reset_link_answers_in_flight_frames_locally_then_split_mode_returns(
    bundle: Path, images, cloud: RefCloud, proxy: LinkProxy
) -> None:
    cloud.faults.delay_s = 1.0  # hold the frames in the cloud so they are in flight at the reset
    with EdgeNode(bundle, cloud=proxy.address, frame_deadline_s=5.0, breaker_failures=2, **FAST) as node:
        assert node.classify(images[0], PROMPTS).mode == "split"
        results: list[EdgeResult] = []
        worker = threading.Thread(target=lambda: results.extend(node.classify_many(images[:4], PROMPTS)))
        worker.start()
        wait_for(lambda: cloud.frames >= 4)
        proxy.reset()
        worker.join(10)
        lost = by_id(results, 4)
        cloud.faults.delay_s = 0.0
        wait_split(node)
        after = by_id(list(node.classify_many(images[:4], PROMPTS)), 4)
    assert [r.mode for r in lost] == ["local"] * 4
    assert Counter(r.reason.split(":")[0] for r in lost) == {"link_lost": 4}, [r.reason for r in lost]
    assert {r.mode for r in after} == {"split"}
    assert proxy.connections >= 2  # the node reconnected through the proxy


def test_a_refusing_link_keeps_the_node_local_until_it_accepts_again(
    bundle: Path, images, proxy: LinkProxy
) -> None:
    with EdgeNode(bundle, cloud=proxy.address, breaker_failures=2, **FAST) as node:
        assert node.classify(images[0], PROMPTS).mode == "split"
        proxy.refuse()
        assert node.classify(images[0], PROMPTS).mode == "split"  # the open connection carries on
        proxy.reset()  # ... until it is gone: now the cloud is unreachable
        down = by_id(list(node.classify_many(images[:5], PROMPTS)), 5)
        time.sleep(0.6)  # probes are refused
        local = node.classify(images[0], PROMPTS)
        proxy.accept()
        back_s = wait_split(node)
        after = by_id(list(node.classify_many(images[:3], PROMPTS)), 3)
    assert {r.mode for r in [*down, local]} == {"local"}
    assert {r.reason.split(":")[0] for r in down} <= {"link_lost", "breaker_open"}, [r.reason for r in down]
    assert local.reason.startswith("breaker_open")
    assert back_s < 5.0
    assert {r.mode for r in after} == {"split"}


def test_a_stopped_proxy_leaves_no_threads(bundle: Path, images, cloud: RefCloud) -> None:
    before = set(threading.enumerate())
    p = LinkProxy("127.0.0.1", cloud.port, delay_ms=5).start()
    with EdgeNode(bundle, cloud=p.address, **FAST) as node:
        assert {r.mode for r in node.classify_many(images[:2], PROMPTS)} == {"split"}
        p.stop()
        assert "link-proxy" not in {t.name for t in threading.enumerate()}
    # the reference cloud's gRPC server starts its pool's workers (ThreadPoolExecutor-N_M) on first use and
    # keeps them until it stops; its per-stream pool winds down as the node's stream ends
    until = time.monotonic() + 5
    while extra := {
        t.name for t in set(threading.enumerate()) - before if not t.name.startswith("ThreadPool")
    }:
        assert time.monotonic() < until, extra
        time.sleep(0.05)

"""edge_node.metrics: real nodes answer frames, the endpoint is scraped over HTTP and parsed as Prometheus
text; frames by mode and reason, latency, bytes, breaker state, mode and plan match what was answered."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from edge_node.metrics import MetricsServer, NodeMetrics
from edge_node.node import EdgeNode
from splitclip.procs import free_port
from tests.edge.conftest import PROMPTS
from tests.edge.refcloud import RefCloud

ROOT = Path(__file__).resolve().parents[2]
FAST = {"probe_interval_s": 0.2, "probe_max_s": 0.5, "hello_timeout_s": 3.0, "codec": "int8-zstd"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    """{value of `label`: sample value} of every sample of `name`."""
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name}


@pytest.fixture
def served() -> Iterator[list[MetricsServer]]:
    servers: list[MetricsServer] = []
    yield servers
    for s in servers:
        s.close()


def serve(node: EdgeNode, servers: list[MetricsServer]) -> tuple[NodeMetrics, str]:
    metrics = NodeMetrics(node)
    server = metrics.serve("127.0.0.1", 0)
    servers.append(server)
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
    return metrics, server.url


def test_local_frames_by_reason_latency_and_the_node(bundle: Path, images, tmp_path: Path, served) -> None:
    with EdgeNode(bundle, node_id="cam-1") as node:
        _, url = serve(node, served)
        results = list(node.classify_many(images[:5], PROMPTS))
        results.append(node.classify(images[5], PROMPTS))  # the unary path is counted too
        results.append(node.classify(tmp_path / "missing.png", PROMPTS))  # an error result
        s = scrape(url)
        assert node.stats.frames == 7
    assert [r.reason for r in results] == ["no_cloud"] * 6 + ["error"]
    assert labelled(s, "splitclip_edge_frames_total", "reason") == {"no_cloud": 6, "error": 1}
    assert get(s, "splitclip_edge_frames_total", mode="local", reason="no_cloud") == 6
    assert get(s, "splitclip_edge_frame_latency_seconds_count", mode="local") == 7
    assert get(s, "splitclip_edge_frame_latency_seconds_count", mode="split") == 0
    assert get(s, "splitclip_edge_frame_latency_seconds_sum", mode="local") == pytest.approx(
        sum(r.latency_ms for r in results) / 1e3
    )
    assert get(s, "splitclip_edge_frame_latency_seconds_bucket", mode="local", le="+Inf") == 7
    assert get(s, "splitclip_edge_bytes_sent_total") == 0
    assert labelled(s, "splitclip_edge_breaker_state", "state") == {"closed": 1, "open": 0, "half_open": 0}
    assert labelled(s, "splitclip_edge_mode", "mode") == {"split": 0, "local": 1}
    assert labelled(s, "splitclip_edge_plan_info", "plan") == {"cut1/int8-zstd": 1}  # the fixed L // 2
    assert get(s, "splitclip_edge_plan_switches_total") == 0
    (info,) = [dict(labels) for (n, labels) in s if n == "splitclip_edge_info"]
    assert info["node_id"] == "cam-1" and info["bundle_id"] == node.bundle_id and info["version"]


def test_split_frames_count_their_bytes(bundle: Path, images, cloud: RefCloud, served) -> None:
    with EdgeNode(bundle, cloud=f"127.0.0.1:{cloud.port}", cut=2, codec="fp16") as node:
        _, url = serve(node, served)
        results = list(node.classify_many(images, PROMPTS))
        s = scrape(url)
    assert {r.mode for r in results} == {"split"}
    assert labelled(s, "splitclip_edge_frames_total", "reason") == {"cloud": len(images)}
    assert get(s, "splitclip_edge_frames_total", mode="split", reason="cloud") == len(images)
    sent = sum(r.bytes_sent for r in results)
    assert sent > 0 and get(s, "splitclip_edge_bytes_sent_total") == sent
    assert get(s, "splitclip_edge_frame_latency_seconds_count", mode="split") == len(images)
    assert labelled(s, "splitclip_edge_mode", "mode") == {"split": 1, "local": 0}
    assert labelled(s, "splitclip_edge_plan_info", "plan") == {"cut2/fp16": 1}


def test_a_dead_cloud_shows_an_open_breaker(bundle: Path, images, served) -> None:
    # nothing listens on port 1; probes far apart, so no half-open probe runs during the test
    with EdgeNode(
        bundle, cloud="127.0.0.1:1", codec="int8-zstd", probe_interval_s=60, probe_max_s=60
    ) as node:
        _, url = serve(node, served)
        results = list(node.classify_many(images[:3], PROMPTS))
        s = scrape(url)
    assert {r.reason.split(":")[0] for r in results} == {"breaker_open"}
    assert labelled(s, "splitclip_edge_breaker_state", "state") == {"closed": 0, "open": 1, "half_open": 0}
    assert get(s, "splitclip_edge_breaker_opened_total") == 1
    assert labelled(s, "splitclip_edge_mode", "mode") == {"split": 0, "local": 1}
    assert get(s, "splitclip_edge_frames_total", mode="local", reason="breaker_open") == 3


def test_breaker_state_follows_cloud_death_and_recovery(
    bundle: Path, images, cloud: RefCloud, served
) -> None:
    with EdgeNode(bundle, cloud=f"127.0.0.1:{cloud.port}", breaker_failures=2, **FAST) as node:
        _, url = serve(node, served)
        up = list(node.classify_many(images[:3], PROMPTS))
        assert get(scrape(url), "splitclip_edge_breaker_state", state="closed") == 1
        cloud.stop()
        down = list(node.classify_many(images, PROMPTS))
        s = scrape(url)
        assert get(s, "splitclip_edge_breaker_state", state="closed") == 0  # open, or half-open probing
        assert get(s, "splitclip_edge_breaker_opened_total") == 1
        cloud.start(cloud.port)
        deadline = time.monotonic() + 30
        while node.mode != "split" and time.monotonic() < deadline:
            time.sleep(0.05)
        s = scrape(url)
        answered = node.stats.frames
    assert labelled(s, "splitclip_edge_breaker_state", "state") == {"closed": 1, "open": 0, "half_open": 0}
    assert labelled(s, "splitclip_edge_mode", "mode") == {"split": 1, "local": 0}
    results = up + down
    assert total(s, "splitclip_edge_frames_total") == len(results) == answered  # each frame once
    by_mode = {m: sum(r.mode == m for r in results) for m in ("split", "local")}
    for mode, n in by_mode.items():
        assert get(s, "splitclip_edge_frame_latency_seconds_count", mode=mode) == n
    assert get(s, "splitclip_edge_bytes_sent_total") == sum(r.bytes_sent for r in results)


def test_the_plan_is_the_online_planners_current_one(
    bundle: Path, images, cloud: RefCloud, tmp_path: Path, served
) -> None:
    with EdgeNode(bundle, cloud=f"127.0.0.1:{cloud.port}", cut="auto", cache_dir=tmp_path, **FAST) as node:
        _, url = serve(node, served)
        auto = node.plans.auto
        assert auto is not None
        list(node.classify_many(images[:4], PROMPTS))
        s = scrape(url)
        assert labelled(s, "splitclip_edge_plan_info", "plan") == {auto.current.label: 1}
        assert get(s, "splitclip_edge_plan_switches_total") == auto.switches
        before = auto.switches
        other = next(c for c in auto.plans if c.label != auto.current.label)
        auto._switch(other)  # the planner's own switch, as when another plan is predicted better
        s = scrape(url)
    assert labelled(s, "splitclip_edge_plan_info", "plan") == {other.label: 1}
    assert get(s, "splitclip_edge_plan_switches_total") == before + 1


def test_two_nodes_keep_their_own_counts_and_a_failing_listener_costs_no_frame(
    bundle: Path, images, served
) -> None:
    def broken(_r: object) -> None:
        raise RuntimeError("listener bug")

    with EdgeNode(bundle) as a, EdgeNode(bundle) as b:
        _, url_a = serve(a, served)
        _, url_b = serve(b, served)
        b.stats.listeners.insert(0, broken)
        assert len(list(a.classify_many(images[:2], PROMPTS))) == 2
        assert len(list(b.classify_many(images[:5], PROMPTS))) == 5
        sa, sb = scrape(url_a), scrape(url_b)
    assert total(sa, "splitclip_edge_frames_total") == 2
    assert total(sb, "splitclip_edge_frames_total") == 5


def _watch(bundle: Path, tmp_path: Path, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "SPLITCLIP_METRICS_HOST": "127.0.0.1"}
    args = ["--prompt", "red", "--prompt", "blue", "--out", str(tmp_path / "out.jsonl"), "--interval", "0.05"]
    return subprocess.Popen(
        [sys.executable, "-m", "splitclip.cli", "edge", "watch", str(tmp_path / "inbox"), *args,
         "--bundle", str(bundle), "--metrics-port", str(port)],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_edge_watch_serves_metrics_on_its_port(bundle: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = _watch(bundle, tmp_path, port)
    try:
        assert proc.stderr is not None
        log = []
        for line in proc.stderr:  # until it is watching (or has died)
            log.append(line)
            if "watching" in line:
                break
        assert any(f"metrics on http://127.0.0.1:{port}/metrics" in line for line in log), "".join(log)
        inbox, out = tmp_path / "inbox", tmp_path / "out.jsonl"
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(inbox / f"{i}.png")
        (inbox / "bad.png").write_bytes(b"not a png")
        deadline = time.monotonic() + 60
        while (not out.exists() or len(out.read_text().splitlines()) < 5) and time.monotonic() < deadline:
            time.sleep(0.05)
        s = scrape(f"http://127.0.0.1:{port}/metrics")
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest
    assert "stopped after 5 images" in rest
    assert labelled(s, "splitclip_edge_frames_total", "reason") == {"no_cloud": 4, "error": 1}
    assert get(s, "splitclip_edge_frame_latency_seconds_count", mode="local") == 5


def test_edge_watch_on_a_taken_port_is_one_line_and_exit_2(bundle: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _watch(bundle, tmp_path, port)
        err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1] == f"error: metrics port {port}: Address already in use"

"""The edge's heartbeat against the real cloud (heartbeat interval 1 s, registry TTL 3 s): a healthy
node stays listed as long as it lives, and drops out about 3 intervals after it closes."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from demo.cloudproc import CloudProcess
from edge_node.node import EdgeNode
from splitclip.bundle import load_bundle
from tests.e2e.test_edge_cloud import FAST, PROMPTS, TOKEN, wait_answering

INTERVAL_S = 1.0


@pytest.fixture(scope="module")
def cloud(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudProcess]:
    log = tmp_path_factory.mktemp("cloud") / "cloud.log"
    env = {"SPLITCLIP_NODE_TOKEN": TOKEN, "SPLITCLIP_HEARTBEAT_INTERVAL_S": str(INTERVAL_S)}
    c = CloudProcess(tiny_bundle_dir, log_path=log, env=env)
    c.start()
    wait_answering(c, load_bundle(tiny_bundle_dir).manifest.bundle_id)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def redis_url(cloud: CloudProcess) -> str:
    m = re.search(r"embedded Valkey at (\S+)", cloud.log_path.read_text(errors="replace"))
    assert m, "the cloud did not say where its Valkey is"
    return m.group(1)


def listed(redis_url: str) -> dict[str, dict[str, Any]]:
    """node id -> its registry entry: through cloud_service.registry.list_nodes where it exists, else
    the `splitclip:v1:node:{id}` keys read the way the ingress writes them (JSON of the last Hello)."""
    try:
        from cloud_service.registry import list_nodes
    except ImportError:
        import json

        import redis

        r = redis.Redis.from_url(redis_url, socket_timeout=2)
        try:
            out = {}
            for key in r.scan_iter(match="splitclip:v1:node:*"):
                raw = r.get(key)
                if raw is not None:
                    out[key.decode().removeprefix("splitclip:v1:node:")] = json.loads(raw)
            return out
        finally:
            r.close()
    return {n.node_id: vars(n) for n in list_nodes(redis_url)}


def test_a_live_node_stays_listed_and_a_closed_one_drops_out(tiny_bundle_dir, cloud, redis_url) -> None:
    rng = np.random.default_rng(3)
    images = [(rng.random((40, 48, 3)) * 255).astype(np.uint8) for _ in range(3)]
    node = EdgeNode(tiny_bundle_dir, cloud=cloud.address, node_id="e2e-heartbeat", **FAST)
    try:
        assert node.mode == "split", node.mode_reason
        assert node.health is not None and node.health.heartbeat_interval_s == INTERVAL_S
        assert all(r.mode == "split" for r in node.classify_many(images, PROMPTS))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5 * INTERVAL_S:  # well past the 3-interval TTL
            entry = listed(redis_url).get("e2e-heartbeat")
            assert entry is not None, f"a live node dropped out after {time.monotonic() - t0:.1f} s"
            time.sleep(0.25)
        assert entry["bundle_id"] == node.bundle_id
        if "mode" in entry:  # the registry stores what the Hello said
            assert entry["mode"] == "split" and entry["frames_answered"] == len(images), entry
    finally:
        node.close()
    closed = time.monotonic()
    assert "e2e-heartbeat" in listed(redis_url)  # its last Hello is younger than the TTL
    while "e2e-heartbeat" in listed(redis_url):
        assert time.monotonic() - closed < 3 * INTERVAL_S + 2.0, "a closed node is still listed"
        time.sleep(0.1)
    gone_after = time.monotonic() - closed
    assert gone_after > 0.5 * INTERVAL_S, gone_after  # it expired; nothing removed it at once

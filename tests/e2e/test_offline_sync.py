"""An offline node's frames reach fleet search after it reconnects, exactly once, oldest first, through
the real cloud: the demo bundle on a local Ray running Serve with deploy/serve_config.yaml and search
on, a real embedded PostgreSQL, a real Valkey, and an EdgeNode with `index` on talking gRPC to it
through benchmarks/link.LinkProxy (which makes the cloud unreachable for real: listener closed and
every connection reset, then listening again on the same port). One cloud for the module.

The node answers a few frames in split mode (the cloud indexes them as it answers), then, with the
link gone, answers the rest locally (into its journal); when the link is back its prober closes the
breaker and the upload thread drains the journal through Upload. The store then holds every frame
of the node once (counted by node in PostgreSQL), the uploaded ones in journal order (the
transactions that wrote them, by xmin), and `splitclip search` finds them all.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from benchmarks.link import LinkProxy
from cloud_service.search.embedded_pg import EmbeddedPostgres
from demo.cloudproc import free_port
from demo.data import Scene, label_prompts, render_array
from edge_node import search_cli
from edge_node.node import EdgeNode

TOKEN = "offline-sync-token"
NODE = "gate-offline"
FAST = {"breaker_failures": 1, "probe_interval_s": 0.2, "probe_max_s": 0.5, "hello_timeout_s": 5.0}
UPLOAD = {"upload_batch": 4, "upload_rate_per_s": 100.0, "upload_retry_s": 0.5, "upload_timeout_s": 30.0}
SCENES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star")]


@dataclass
class Cloud:
    address: str
    pg: EmbeddedPostgres
    bundle_id: str


@pytest.fixture(scope="module")
def cloud(demo_bundle_dir: Path) -> Iterator[Cloud]:
    import ray
    from ray import serve

    from cloud_service import launch
    from cloud_service.embedded_redis import EmbeddedRedis
    from splitclip.bundle import load_bundle

    base = Path(tempfile.mkdtemp(prefix="splitclip-offline-sync-"))
    base.chmod(0o755)  # as root the server runs as user pgserver, which must traverse it
    pg = EmbeddedPostgres(base / "data").start()
    redis_server = EmbeddedRedis(port=free_port()).start()
    launch.init_ray(2, log_to_driver=False)
    try:
        grpc_port = free_port()
        cfg = launch.with_overrides(
            launch.load_config(),
            args={
                "bundle": str(demo_bundle_dir.resolve()),
                "redis_url": redis_server.url,
                "search": True,
                "pg_url": pg.url,
                "index_batch_rows": 16,
                "redis_timeout_s": 2.0,
            },
            grpc_port=grpc_port,
            http_port=free_port(),
            env={"SPLITCLIP_NODE_TOKEN": TOKEN},
        )
        launch.deploy(cfg)
        yield Cloud(f"127.0.0.1:{grpc_port}", pg, load_bundle(demo_bundle_dir).manifest.bundle_id)
    finally:
        serve.shutdown()
        ray.shutdown()
        pg.stop()
        redis_server.stop()
        shutil.rmtree(base, ignore_errors=True)


def scenes(n: int, start: int) -> list[np.ndarray]:
    out = []
    for i in range(start, start + n):
        color, shape = SCENES[i % len(SCENES)]
        scene = Scene(color, shape, "large", "center", ("gradient", "stripes", "checker", "blobs")[i % 4])
        out.append(render_array(scene, np.random.default_rng(2000 + i)))  # uint8 [64, 64, 3]
    return out


def wait_for(pred, what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def rows_of(pg: EmbeddedPostgres, bundle_id: str, node_id: str) -> list[tuple[int, int, str]]:
    """(frame_id, xmin, source) of a node's rows, by frame id: xmin is the transaction that wrote it."""
    import psycopg

    with psycopg.connect(pg.url) as conn:
        if conn.execute("SELECT to_regclass('splitclip_frames')").fetchone()[0] is None:
            return []  # the cloud migrates the store on its first write
        return [
            (int(f), int(x), str(s))
            for f, x, s in conn.execute(
                "SELECT frame_id, xmin::text::bigint, source FROM splitclip_frames"
                " WHERE bundle_id = %s AND node_id = %s ORDER BY frame_id",
                (bundle_id, node_id),
            ).fetchall()
        ]


def test_frames_answered_offline_are_searchable_after_reconnect_exactly_once(
    cloud: Cloud, demo_bundle_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    prompts = label_prompts()
    online, offline = scenes(4, 0), scenes(10, 4)
    with (
        LinkProxy("127.0.0.1", int(cloud.address.rsplit(":", 1)[1])) as link,
        EdgeNode(
            demo_bundle_dir,
            cloud=link.address,
            index=True,
            journal=tmp_path / "journal.sqlite",
            node_id=NODE,
            node_token=TOKEN,
            **FAST,
            **UPLOAD,
        ) as node,
    ):
        names = [f"{NODE}/online-{i}" for i in range(len(online))]
        split = sorted(node.classify_many(online, prompts, sources=names), key=lambda r: r.frame_id)
        assert {r.mode for r in split} == {"split"}, [r.reason for r in split]
        wait_for(lambda: len(rows_of(cloud.pg, cloud.bundle_id, NODE)) == len(online), "the cloud's rows")

        link.refuse()  # the cloud is unreachable: no new connections ...
        link.reset()  # ... and the open one is gone
        names = [f"{NODE}/offline-{i}" for i in range(len(offline))]
        local = sorted(node.classify_many(offline, prompts, sources=names), key=lambda r: r.frame_id)
        assert {r.mode for r in local} == {"local"} and all(r.ok for r in local), [r.reason for r in local]
        assert node.index.pending == len(offline)
        assert len(rows_of(cloud.pg, cloud.bundle_id, NODE)) == len(online)  # nothing got through

        t0 = time.monotonic()
        link.accept()  # the link is back
        wait_for(lambda: node.index.pending == 0, "the journal to be uploaded")
        synced_s = time.monotonic() - t0
        assert node.mode == "split" and node.index.uploaded == len(offline)

    rows = rows_of(cloud.pg, cloud.bundle_id, NODE)
    want = sorted(r.frame_id for r in [*split, *local])
    assert [f for f, _, _ in rows] == want  # every frame of the node, each once
    uploaded = [(f, x) for f, x, s in rows if "/offline-" in s]
    assert [f for f, _ in uploaded] == [r.frame_id for r in local]
    xmins = [x for _, x in uploaded]  # oldest first: batches of 4, written in journal order
    assert xmins == sorted(xmins) and len(set(xmins)) > 1, xmins

    monkeypatch.setenv("SPLITCLIP_NODE_TOKEN", TOKEN)
    p = argparse.ArgumentParser()
    search_cli.build_parser(p)
    args = p.parse_args(
        ["a photo of a red circle", "--node", NODE, "-k", "100", "--json", "--cloud", cloud.address]
    )
    capsys.readouterr()
    assert search_cli.run(args) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert sorted(h["frame_id"] for h in hits) == want  # each frame once in search, too
    by_id = {r.frame_id: r for r in [*split, *local]}
    for h in hits:
        r = by_id[h["frame_id"]]
        assert h["source"] == r.source and h["node_id"] == NODE
        assert h["labels"][0] == r.labels[0]  # the top label, whichever side computed it
    with capsys.disabled():
        print(f"\nreconnect to journal empty: {synced_s:.2f} s for {len(offline)} frames; {len(rows)} rows")

"""Fleet search through the real cloud: the demo bundle on a local Ray running Serve with
deploy/serve_config.yaml and search on, a real embedded PostgreSQL (owned by this module, so that it
can stop it), a real Valkey and gRPC over a socket. One cloud for the module.

Frames with `index` set, rendered from demo scenes of several classes, from two nodes at known
times, go through ClassifyStream like a node's; their rows reach the store through the indexer. Then:
text and image Search rank the red circles first, the node / time / label filters hold, a store
outage mid-run costs no answer (and the rows queued meanwhile land after the restart), and an Upload
sent twice is stored once. Ingress stats come through a driver handle (the cloud runs in-process).

Last (it adds a node's frames to the store): an offline node's frames reach fleet search after it
reconnects, exactly once, oldest first. An EdgeNode with `index` on talks to the cloud through
benchmarks/link.LinkProxy, which makes the cloud unreachable for real (listener closed and every
connection reset, then listening again on the same port). The node answers a few frames in split mode
(the cloud indexes them as it answers), then, with the link gone, the rest locally (into its journal);
when the link is back its prober closes the breaker and the upload thread drains the journal through
Upload. The store then holds every frame of the node once (counted by node in PostgreSQL), the
uploaded ones in journal order (the transactions that wrote them, by xmin), and `splitclip search`
finds them all.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from benchmarks.cloud_client import CloudClient, FrameMaker
from benchmarks.link import LinkProxy
from cloud_service.grpc_api import pb
from cloud_service.search.embedded_pg import EmbeddedPostgres
from demo.data import Scene, label_prompts, render_array
from edge_node import search_cli
from edge_node.node import EdgeNode
from splitclip.procs import free_port
from splitclip.runtime import BundleRuntime
from tests.conftest import pg_base_dir

TOKEN = "search-e2e-token"
T0 = 1_760_000_000.0
NODES = ("gate-1", "gate-2")
# Not ("red", "square"): the demo model never saw it (partitioner.synthetic.HELD_OUT) and embeds it
# like a red circle (cosine to "a photo of a red circle" 0.79 vs 0.75 for the circles themselves).
# The same shape in another colour, and other shapes, it tells apart (at most 0.47 vs at least 0.66).
CLASSES = [
    ("red", "circle"),
    ("blue", "circle"),
    ("green", "triangle"),
    ("yellow", "star"),
    ("pink", "cross"),
]
PER_CLASS = 2  # per node
SIZES_POS = [("large", "center"), ("medium", "left"), ("large", "right")]
NODE = "gate-offline"
FAST = {
    "breaker_failures": 1,
    "probe_interval_s": 0.2,
    "probe_max_s": 0.5,
    "hello_timeout_s": 5.0,
    "codec": "int8-zstd",
}
UPLOAD = {"upload_batch": 4, "upload_rate_per_s": 100.0, "upload_retry_s": 0.5, "upload_timeout_s": 30.0}
OFFLINE_SCENES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star")]


@dataclass
class SearchCloud:
    address: str
    pg: EmbeddedPostgres
    data_dir: Path
    bundle_id: str

    def ingress_stats(self) -> dict:
        from cloud_service.launch import driver_handle

        return driver_handle("Ingress").stats.remote().result()

    def index_stats(self) -> dict:
        return self.ingress_stats()["index"]


@pytest.fixture(scope="module")
def runtime(demo_bundle_dir: Path) -> BundleRuntime:
    return BundleRuntime(demo_bundle_dir)


@pytest.fixture(scope="module")
def cloud(demo_bundle_dir: Path, runtime: BundleRuntime) -> Iterator[SearchCloud]:
    import ray
    from ray import serve

    from cloud_service import launch
    from cloud_service.embedded_redis import EmbeddedRedis

    base = pg_base_dir("splitclip-search-e2e-")
    pg = EmbeddedPostgres(base / "data").start()
    redis_server = EmbeddedRedis(port=free_port()).start()
    launch.init_ray(2, log_to_driver=False)
    holder = SearchCloud("", pg, base / "data", runtime.manifest.bundle_id)
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
        holder.address = f"127.0.0.1:{grpc_port}"
        yield holder
    finally:
        serve.shutdown()
        ray.shutdown()
        holder.pg.stop()
        redis_server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def client(cloud: SearchCloud) -> Iterator[CloudClient]:
    with CloudClient(cloud.address, TOKEN, timeout_s=60) as c:
        yield c


def scene_image(color: str, shape: str, i: int) -> np.ndarray:
    size, pos = SIZES_POS[i % len(SIZES_POS)]
    scene = Scene(color, shape, size, pos, ("gradient", "stripes", "checker", "blobs")[i % 4])
    return render_array(scene, np.random.default_rng(1000 + i))  # uint8 [64, 64, 3]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Sent:
    node: str
    frame_id: int
    ts: float
    cls: tuple[str, str]


def frames_of(maker: FrameMaker, prompts: list[str], start: int) -> tuple[list[pb.Frame], list[Sent]]:
    frames, sent = [], []
    L = maker.runtime.num_blocks
    n = start
    for node in NODES:
        for c, cls in enumerate(CLASSES):
            for j in range(PER_CLASS):
                n += 1
                ts = T0 + n * 60  # a minute apart
                img = scene_image(*cls, 7 * c + j + (3 if node == NODES[1] else 0))
                frames.append(
                    maker.frame(
                        img,
                        (1, L)[n % 2],
                        prompts,
                        frame_id=n,
                        node_id=node,
                        top_k=3,
                        index=True,
                        captured_at=ts,
                        source=f"{node}/{cls[0]}-{cls[1]}-{j}",
                    )
                )
                sent.append(Sent(node, n, ts, cls))
    return frames, sent


def stream_all(client: CloudClient, frames: list[pb.Frame]) -> dict[int, pb.Result]:
    results = {r.frame_id: r for r in client.stream(frames)}
    assert sorted(results) == sorted(f.frame_id for f in frames)
    bad = {i: r.error for i, r in results.items() if r.error.code}
    assert not bad, bad
    return results


def wait_for(pred, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while not (value := pred()):
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.2)
    return value


def search(client: CloudClient, **kw: object) -> pb.SearchResponse:
    return client.stub.Search(pb.SearchRequest(**kw), metadata=client.md, timeout=60)


@pytest.fixture(scope="module")
def indexed(cloud: SearchCloud, client: CloudClient, runtime: BundleRuntime) -> list[Sent]:
    frames, sent = frames_of(FrameMaker(runtime), label_prompts(), start=0)
    stream_all(client, frames)
    wait_for(lambda: cloud.index_stats()["written"] >= len(frames))
    return sent


def red_circle_ranks_first(resp: pb.SearchResponse, sent: list[Sent]) -> None:
    by_id = {(s.node, s.frame_id): s for s in sent}
    classes = [by_id[(h.node_id, h.frame_id)].cls for h in resp.hits]
    n_red = sum(s.cls == ("red", "circle") for s in sent)
    assert classes[:n_red] == [("red", "circle")] * n_red, classes
    assert ("red", "circle") not in classes[n_red:]


def test_text_and_image_search_rank_the_red_circles_first(cloud, client, indexed) -> None:
    n = len(indexed)
    text = search(client, text="a red circle", templates=["a photo of a {}"], k=n)
    assert text.bundle_id == cloud.bundle_id and len(text.hits) == n
    red_circle_ranks_first(text, indexed)
    h = text.hits[0]
    assert h.node_id in NODES and h.source.startswith(f"{h.node_id}/red-circle") and h.captured_at >= T0
    assert "a photo of a red circle" in list(h.labels)  # its top labels as the cloud scored it
    scores = [x.score for x in text.hits]
    assert scores == sorted(scores, reverse=True)

    query = scene_image("red", "circle", 99)  # a red circle not among the stored ones
    image = search(client, image=png(query), k=n)
    red_circle_ranks_first(image, indexed)


def test_node_time_and_label_filters(cloud, client, indexed) -> None:
    by_node = search(client, text="a red circle", node_ids=[NODES[1]], k=100)
    assert {h.node_id for h in by_node.hits} == {NODES[1]}
    assert len(by_node.hits) == sum(s.node == NODES[1] for s in indexed)

    lo, hi = indexed[3].ts, indexed[8].ts
    window = search(client, text="a red circle", since=lo, until=hi, k=100)
    assert sorted(h.frame_id for h in window.hits) == [s.frame_id for s in indexed if lo <= s.ts <= hi]

    labelled = search(client, text="a red circle", label="a photo of a red circle", k=100)
    assert labelled.hits and all("a photo of a red circle" in h.labels for h in labelled.hits)
    unlabelled = search(client, text="a red circle", k=100)
    assert len(labelled.hits) < len(unlabelled.hits)

    with pytest.raises(grpc.RpcError) as e:
        search(client, text="a red circle", since=hi, until=lo)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_store_outage_loses_no_answers_and_the_queued_rows_land_later(
    cloud, client, runtime, indexed
) -> None:
    before = cloud.index_stats()
    cloud.pg.stop()  # the real server goes away mid-run
    try:
        frames, _ = frames_of(FrameMaker(runtime), label_prompts(), start=1000)
        results = stream_all(client, frames)  # every frame answered OK while its row cannot be stored
        assert all(r.top for r in results.values())
        down = wait_for(lambda: (s := cloud.index_stats())["write_errors"] > before["write_errors"] and s)
        assert not down["store_up"] and down["queued"] == len(frames) and down["dropped"] == 0
        with pytest.raises(grpc.RpcError) as e:
            search(client, text="a red circle")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "search store is unavailable" in (e.value.details() or "")
    finally:
        cloud.pg = EmbeddedPostgres(cloud.data_dir).start()  # the same data dir: the rows stored so far
    after = wait_for(lambda: (s := cloud.index_stats())["queued"] == 0 and s, timeout_s=90)
    assert after["written"] - before["written"] == len(frames)
    assert after["retried"] - before["retried"] == len(frames) and after["dropped"] == 0
    ids = {h.frame_id for h in search(client, text="a red circle", k=1000).hits}
    assert {f.frame_id for f in frames} <= ids  # searchable again, the outage's frames included
    print(f"\noutage: {len(frames)} frames answered OK, rows retried {after['retried'] - before['retried']}, "
          f"dropped {after['dropped']}, write errors {after['write_errors'] - before['write_errors']}")  # fmt: skip


def test_an_upload_sent_twice_is_stored_once(cloud, client, runtime, indexed) -> None:
    dim = runtime.manifest.embed_dim
    embs = np.random.default_rng(5).standard_normal((4, dim)).astype(np.float32)
    embs /= np.linalg.norm(embs, axis=1, keepdims=True)
    req = pb.UploadRequest(
        node_id="offline-7",
        bundle_id=cloud.bundle_id,
        frames=[
            pb.IndexedFrame(
                frame_id=i,
                captured_at=T0 + i,
                source="journal",
                labels=["a photo of a red circle"],
                embedding=embs[i].astype("<f4").tobytes(),
            )
            for i in range(4)
        ],
    )
    first = client.stub.Upload(req, metadata=client.md, timeout=60)
    again = client.stub.Upload(req, metadata=client.md, timeout=60)
    assert (first.stored, first.duplicates, again.stored, again.duplicates) == (4, 0, 0, 4)
    hits = search(client, text="a red circle", node_ids=["offline-7"], k=100).hits
    assert sorted(h.frame_id for h in hits) == [0, 1, 2, 3]

    bad = pb.UploadRequest(node_id="offline-7", bundle_id=cloud.bundle_id,
                           frames=[pb.IndexedFrame(frame_id=9, embedding=b"\0" * 8)])  # fmt: skip
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Upload(bad, metadata=client.md, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "frame 9" in (e.value.details() or "")


# -- an offline node, last: its frames join the store ------------------------------------------
def offline_scenes(n: int, start: int) -> list[np.ndarray]:
    out = []
    for i in range(start, start + n):
        color, shape = OFFLINE_SCENES[i % len(OFFLINE_SCENES)]
        scene = Scene(color, shape, "large", "center", ("gradient", "stripes", "checker", "blobs")[i % 4])
        out.append(render_array(scene, np.random.default_rng(2000 + i)))  # uint8 [64, 64, 3]
    return out


def wait_until(pred, what: str, timeout_s: float = 90.0) -> None:
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
    cloud: SearchCloud, demo_bundle_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    prompts = label_prompts()
    online, offline = offline_scenes(4, 0), offline_scenes(10, 4)
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
        wait_until(lambda: len(rows_of(cloud.pg, cloud.bundle_id, NODE)) == len(online), "the cloud's rows")

        link.refuse()  # the cloud is unreachable: no new connections ...
        link.reset()  # ... and the open one is gone
        names = [f"{NODE}/offline-{i}" for i in range(len(offline))]
        local = sorted(node.classify_many(offline, prompts, sources=names), key=lambda r: r.frame_id)
        assert {r.mode for r in local} == {"local"} and all(r.ok for r in local), [r.reason for r in local]
        assert node.index.pending == len(offline)
        assert len(rows_of(cloud.pg, cloud.bundle_id, NODE)) == len(online)  # nothing got through

        t0 = time.monotonic()
        link.accept()  # the link is back
        wait_until(lambda: node.index.pending == 0, "the journal to be uploaded")
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

"""The edge node against the real cloud: `python -m cloud_service.cli` (local Ray + Serve + embedded
Valkey) in its own session, real gRPC over a socket. One cloud per module; it is SIGKILLed and
restarted in the last test."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from demo.cloudproc import CloudProcess, session_members
from edge_node.node import EdgeNode
from edge_node.results import EdgeResult
from splitclip import codec
from splitclip.bundle import load_bundle, write_manifest

TOKEN = "e2e-node-token"
PROMPTS = ["a photo of a cat", "a photo of a dog", "red circle", "blue square"]
FAST = {
    "probe_interval_s": 0.25,
    "probe_max_s": 1.0,
    "hello_timeout_s": 3.0,
    "node_token": TOKEN,
    "codec": "int8-zstd",
}


def wait_answering(c: CloudProcess, bundle_id: str, timeout_s: float = 120.0) -> None:
    """Until the cloud answers a Hello through Serve's proxy: "gRPC on" is printed when the app is
    RUNNING, which can be before the proxy routes to it on a loaded box. Test clocks start after this."""
    import grpc

    from benchmarks.cloud_client import CloudClient
    from splitclip.wire import pb

    deadline = time.monotonic() + timeout_s
    with CloudClient(c.address, TOKEN, timeout_s=10) as client:
        while True:
            try:
                client.hello(pb.HelloRequest(node_id="e2e-probe", bundle_id=bundle_id))
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)


@pytest.fixture(scope="module")
def cloud(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudProcess]:
    log = tmp_path_factory.mktemp("cloud") / "cloud.log"
    c = CloudProcess(tiny_bundle_dir, log_path=log, env={"SPLITCLIP_NODE_TOKEN": TOKEN})
    c.start()
    wait_answering(c, load_bundle(tiny_bundle_dir).manifest.bundle_id)
    yield c
    sid = c.proc.pid if c.proc else None
    c.stop()
    if sid is not None:
        assert session_members(sid) == [], "the cloud left processes behind"


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [(rng.random((36 + i % 7, 48, 3)) * 255).astype(np.uint8) for i in range(16)]


def by_id(results) -> list[EdgeResult]:
    out = sorted(results, key=lambda r: r.frame_id)
    assert len({r.frame_id for r in out}) == len(out), "a frame was answered twice"
    return out


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_split_results_equal_local_results_with_the_lossless_codec(
    tiny_bundle_dir, cloud, images, where
) -> None:
    with EdgeNode(tiny_bundle_dir) as local:
        L = local.num_blocks
        cut = {"first": 0, "middle": L // 2, "last": L}[where]
        ref = by_id(local.classify_many(images, PROMPTS))
    with EdgeNode(tiny_bundle_dir, cloud=cloud.address, cut=cut, **{**FAST, "codec": "lossless"}) as node:
        assert node.mode == "split", node.mode_reason
        split = by_id(node.classify_many(images, PROMPTS))
        unary = node.classify(images[0], PROMPTS)
    assert [(r.mode, r.reason) for r in split] == [("split", "cloud")] * len(images)
    for s, r in zip([*split, unary], [*ref, ref[0]], strict=True):
        assert s.labels[0] == r.labels[0]
        np.testing.assert_allclose(s.probabilities, r.probabilities, atol=1e-4)


def test_every_codec_preset_goes_split_through_the_real_cloud(tiny_bundle_dir, cloud, images) -> None:
    """Each preset encoded by the edge decodes in the cloud's ingress (the PCA/KLT ones with the
    bundle's calibration on both sides) at an inner cut, and at cuts 0 and L for one of them."""
    with EdgeNode(tiny_bundle_dir) as local:
        L = local.num_blocks
    plans = [(1, name) for name in codec.PRESETS] + [(0, "int8-zstd"), (L, "fp16")]
    for cut, name in plans:
        with EdgeNode(tiny_bundle_dir, cloud=cloud.address, cut=cut, **{**FAST, "codec": name}) as node:
            got = by_id(node.classify_many(images[:3], PROMPTS))
        assert [(r.mode, r.reason) for r in got] == [("split", "cloud")] * 3, (cut, name, got[0])


def test_a_mismatched_bundle_goes_local_with_the_reason(
    tiny_bundle_dir, cloud, images, tmp_path, caplog
) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle_dir, other)
    (other / "NOTES.txt").write_text("same weights, another bundle id\n")
    other_id = write_manifest(other, _fields(other)).bundle_id
    with (
        caplog.at_level("WARNING", logger="splitclip.edge"),
        EdgeNode(other, cloud=cloud.address, **FAST) as node,
    ):
        results = list(node.classify_many(images[:4], PROMPTS))
        assert node.mode == "local"
    assert all(r.mode == "local" and r.reason.startswith("bundle_mismatch") for r in results)
    assert other_id in results[0].reason
    assert any("bundle_mismatch" in m for m in caplog.messages)


def test_a_wrong_token_is_unauthenticated_and_the_node_answers_locally(
    tiny_bundle_dir, cloud, images
) -> None:
    import grpc

    from edge_node.client import CloudClient
    from edge_node.settings import EdgeSettings
    from splitclip.wire import pb

    client = CloudClient(EdgeSettings.from_env(cloud=cloud.address, node_token="wrong"))
    with pytest.raises(grpc.RpcError) as e:
        client.hello(pb.HelloRequest(node_id="n", bundle_id="b"), timeout=5)
    client.close()
    assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with EdgeNode(tiny_bundle_dir, cloud=cloud.address, **{**FAST, "node_token": "wrong"}) as node:
        r = node.classify(images[0], PROMPTS)
        many = list(node.classify_many(images[:3], PROMPTS))
    assert (r.mode, r.reason.split(":")[0]) == ("local", "unauthenticated")
    assert all(x.mode == "local" and x.reason.startswith("unauthenticated") for x in many)


def test_cloud_death_mid_run_answers_every_frame_once_then_split_mode_returns(
    tiny_bundle_dir, cloud, images
) -> None:
    n_frames, kill_at = 60, 20
    killed_at: list[float] = []

    def frames() -> Iterator[np.ndarray]:
        for i in range(n_frames):
            if i == kill_at:
                killed_at.append(time.monotonic())
                cloud.kill()  # frames are in flight in the window right now
            yield images[i % len(images)]

    with EdgeNode(tiny_bundle_dir, cloud=cloud.address, window=8, **FAST) as node:
        assert node.mode == "split"
        arrivals: list[tuple[float, EdgeResult]] = []
        for r in node.classify_many(frames(), PROMPTS):
            arrivals.append((time.monotonic(), r))
        results = by_id(r for _, r in arrivals)
        assert [r.frame_id for r in results] == list(
            range(results[0].frame_id, results[0].frame_id + n_frames)
        )
        assert node.stats.frames == n_frames and node.stats.errors == 0
        reasons = Counter(r.reason.split(":")[0] for r in results)
        assert reasons["cloud"] >= 1 and reasons["cloud"] <= kill_at, reasons
        assert all(r.mode == "local" for r in results[kill_at:])  # nothing sent after the death is lost
        assert reasons["link_lost"] >= 1, reasons  # frames in flight or sent into the dead link
        assert results[-1].reason.startswith("breaker_open")
        first_local = min(t for t, r in arrivals if r.mode == "local")
        print(
            f"\ncloud death -> first local answer: {(first_local - killed_at[0]) * 1e3:.0f} ms; {dict(reasons)}"
        )

        cloud.start()
        wait_answering(cloud, node.bundle_id)
        back = time.monotonic()
        while True:
            r = node.classify(images[0], PROMPTS)
            if r.mode == "split":
                break
            assert time.monotonic() - back < 5.0, f"still local 5 s after the cloud came back: {r.reason}"
            time.sleep(0.05)
        print(f"cloud back -> split mode: {(time.monotonic() - back) * 1e3:.0f} ms")
        again = list(node.classify_many(images[:8], PROMPTS))
        assert {r.mode for r in again} == {"split"}


def _fields(root: Path) -> dict:
    import json

    data = json.loads((root / "manifest.json").read_text())
    return {k: v for k, v in data.items() if k not in ("files", "bundle_id")}


def test_no_threads_leak_from_closed_nodes() -> None:
    names = [t.name for t in threading.enumerate()]
    assert not [n for n in names if n.startswith(("edge-prober", "edge-stream", "edge-local"))], names

"""Fleet search on the edge (edge_node/indexing.py) against a real gRPC server (tests/edge/refcloud.py,
whose in-memory store is keyed like the cloud's: bundle, node, frame; first write wins): the index
fields of each Frame, the journal of local answers, its upload on reconnect (oldest first, once, a
lost acknowledgement included), and frame ids that stay unique across node restarts."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from edge_node.metrics import NodeMetrics
from edge_node.node import EdgeNode
from edge_node.tickets import frame_ids
from splitclip.runtime import BundleRuntime
from splitclip.settings import SettingsError
from splitclip.tower import Tower
from tests.edge.conftest import PROMPTS
from tests.edge.refcloud import RefCloud

FAST = {"probe_interval_s": 0.2, "probe_max_s": 0.5, "hello_timeout_s": 3.0, "codec": "int8-zstd"}
UPLOAD = {"upload_batch": 2, "upload_rate_per_s": 1000.0, "upload_retry_s": 0.2}


def indexed(bundle: Path, journal: Path, cloud: RefCloud | None = None, **kw) -> EdgeNode:
    addr = f"127.0.0.1:{cloud.port}" if cloud is not None else None
    return EdgeNode(
        bundle, cloud=addr, index=True, journal=journal, node_id="cam-1", **{"codec": "int8-zstd", **kw}
    )


def wait_for(cond, what: str, timeout: float = 20.0) -> None:
    until = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < until, f"timed out waiting for {what}"
        time.sleep(0.05)


def by_id(results):
    return sorted(results, key=lambda r: r.frame_id)


def test_frame_ids_start_at_the_clock_and_stay_unique_across_restarts(bundle: Path, images) -> None:
    ids = frame_ids(lambda: 1_764_662_400_123_456_789)
    assert [next(ids) for _ in range(3)] == [1_764_662_400_123_456 + i for i in range(3)]  # µs, consecutive
    runs = []
    for _ in range(2):  # the same node id twice, as a restarted node would be
        with EdgeNode(bundle, node_id="gate-3") as node:
            runs.append([r.frame_id for r in node.classify_many(images[:4], PROMPTS)])
    assert max(runs[0]) < min(runs[1])  # the second run never repeats the first run's ids
    assert all(len(set(r)) == 4 for r in runs)
    assert min(runs[0]) > 1_700_000_000 * 10**6  # from the clock, not from 1
    assert max(runs[1]) < 2**63  # within the store's int64


def test_frames_carry_the_index_fields_when_on_and_not_when_off(
    bundle: Path, images, cloud: RefCloud, tmp_path: Path
) -> None:
    names = [f"cam/{i}.png" for i in range(3)]
    before = time.time()
    with indexed(bundle, tmp_path / "j.sqlite", cloud) as node:
        streamed = list(node.classify_many(images[:3], PROMPTS, sources=names))
        one = node.classify(images[3], PROMPTS, source="cam/3.png")
        assert node.index.pending == 0  # the cloud answered (and indexed) them: nothing to journal
    after = time.time()
    assert [r.mode for r in [*streamed, one]] == ["split"] * 4
    sent = {f.frame_id: f for f in cloud.frame_requests}
    for r in [*streamed, one]:
        f = sent[r.frame_id]
        assert f.index and before <= f.captured_at <= after and f.source == r.source
    stored = cloud.stored("cam-1", via="frame")
    assert sorted(r.frame_id for r in stored) == sorted(r.frame_id for r in [*streamed, one])
    assert {r.source for r in stored} == {*names, "cam/3.png"}

    cloud.frame_requests.clear()
    with EdgeNode(bundle, cloud=f"127.0.0.1:{cloud.port}", codec="int8-zstd", node_id="cam-2") as off:
        assert off.index.journal is None and off.classify(images[0], PROMPTS, source="x").mode == "split"
    (f,) = cloud.frame_requests
    assert (f.index, f.captured_at, f.source) == (False, 0.0, "")  # nothing for search: not asked
    assert cloud.stored("cam-2") == []


def test_local_answers_are_journalled_with_their_embedding_and_labels(
    bundle: Path, images, tmp_path: Path
) -> None:
    names = [f"cam/{i}.png" for i in range(5)]
    before = time.time()
    with indexed(bundle, tmp_path / "j.sqlite", top_k=2) as node:
        results = by_id(node.classify_many(images[:5], PROMPTS, sources=names))
        bad = node.classify(tmp_path / "missing.png", PROMPTS)  # an error result: nothing to store
        entries = node.index.journal.oldest(100)
    assert bad.error is not None and [r.mode for r in results] == ["local"] * 5
    assert [e.frame_id for e in entries] == [r.frame_id for r in results]  # oldest first
    want = Tower(BundleRuntime(bundle)).embed_images(images[:5])  # [5, embed_dim], the whole tower
    for e, r, w in zip(entries, results, want, strict=True):
        assert (e.node_id, e.source, e.labels) == ("cam-1", r.source, tuple(r.labels))
        assert len(e.labels) == 2 and before <= e.ts <= time.time()
        assert e.embedding.dtype == np.float32 and abs(float(np.linalg.norm(e.embedding)) - 1) < 1e-5
        np.testing.assert_allclose(e.embedding, w, atol=1e-4)


def test_on_reconnect_the_journal_is_uploaded_oldest_first_exactly_once(
    bundle: Path, images, cloud: RefCloud, tmp_path: Path
) -> None:
    with indexed(bundle, tmp_path / "j.sqlite", cloud, breaker_failures=1, **FAST, **UPLOAD) as node:
        metrics = NodeMetrics(node)
        first = node.classify(images[0], PROMPTS)
        cloud.stop()
        down = by_id(node.classify_many(images[1:6], PROMPTS))
        assert first.mode == "split" and {r.mode for r in down} == {"local"}
        assert node.index.pending == 5
        assert metrics.registry.get_sample_value("splitclip_edge_journal_pending") == 5
        cloud.faults.lose_upload_acks = 1  # the first batch is stored, but the node does not hear it
        cloud.start(cloud.port)
        wait_for(lambda: node.index.pending == 0, "the journal to be uploaded")
        assert node.mode == "split" and node.index.uploaded == 5
        assert node.index.duplicates == 2  # the resent first batch: stored already, nothing new
        assert metrics.registry.get_sample_value("splitclip_edge_journal_uploaded_total") == 5
    ids = [r.frame_id for r in down]
    sent = [f.frame_id for u in cloud.uploads for f in u.frames]
    assert sent == [ids[0], ids[1], *ids]  # oldest first, the first batch twice (its ack was lost)
    uploaded = cloud.stored("cam-1", via="upload")
    assert [r.frame_id for r in uploaded] == ids  # stored once each, in order
    assert [r.frame_id for r in cloud.stored("cam-1", via="frame")] == [first.frame_id]
    assert all(u.node_id == "cam-1" and u.bundle_id == node.bundle_id for u in cloud.uploads)


def test_frames_rerun_locally_in_split_mode_are_uploaded_and_a_refusal_keeps_them(
    bundle: Path, images, tmp_path: Path
) -> None:
    rc = RefCloud(bundle, search_on=False)
    rc.start()
    try:
        rc.faults.error_frames = {2: "INVALID_ARGUMENT"}  # the node's 2nd frame comes back an error
        with indexed(bundle, tmp_path / "j.sqlite", rc, **FAST, **UPLOAD) as node:
            results = by_id(node.classify_many(images[:3], PROMPTS))
            assert [r.mode for r in results] == ["split", "local", "split"]
            assert node.index.pending == 1  # the re-run frame, computed here
            wait_for(lambda: node.index.uploader.stats.failures >= 2, "Upload to be refused and retried")
            assert node.index.pending == 1 and "FAILED_PRECONDITION" in node.index.uploader.stats.last_error
            rc.search_on = True
            wait_for(lambda: node.index.pending == 0, "the upload after search was turned on")
        assert [r.frame_id for r in rc.stored("cam-1", via="upload")] == [results[1].frame_id]
        assert len(rc.stored("cam-1")) == 1  # the cloud's own answers were not indexed: search was off
    finally:
        rc.stop()


def test_a_restarted_node_uploads_what_it_journalled_offline(
    bundle: Path, images, cloud: RefCloud, tmp_path: Path
) -> None:
    journal = tmp_path / "j.sqlite"
    with indexed(bundle, journal) as offline:  # no cloud configured at all
        ids = [r.frame_id for r in by_id(offline.classify_many(images[:3], PROMPTS))]
        assert offline.index.uploader is None and offline.index.pending == 3
    with indexed(bundle, journal, cloud, **UPLOAD) as node:
        wait_for(lambda: node.index.pending == 0, "the upload of the previous run's journal")
        thread = node.index._thread
    assert thread is not None and not thread.is_alive()  # close() stopped the uploader
    assert [r.frame_id for r in cloud.stored("cam-1", via="upload")] == ids


def test_a_long_source_and_many_labels_are_journalled_as_the_cloud_takes_them(
    bundle: Path, images, cloud: RefCloud, tmp_path: Path
) -> None:
    """The cloud (here refcloud, which checks an Upload as the cloud does) refuses a whole batch for
    one frame with a source over 300 characters, a NUL or more than 32 labels."""
    journal = tmp_path / "j.sqlite"
    source = "/data/" + "recordings/" * 40 + "gate-3/frame-000042.png\0"
    prompts = [f"thing number {i}" for i in range(40)]
    with indexed(bundle, journal, top_k=40) as offline:
        (r,) = offline.classify_many(images[:1], prompts, sources=[source])
        assert r.mode == "local" and len(r.labels) == 40
    with indexed(bundle, journal, cloud, **UPLOAD) as node:
        wait_for(lambda: node.index.pending == 0, "the upload of the cleaned entry")
    (row,) = cloud.stored("cam-1", via="upload")
    assert row.frame_id == r.frame_id and len(row.source) == 300
    assert row.source.startswith("…") and row.source.endswith("gate-3/frame-000042.png")
    assert row.labels == tuple(r.labels[:32])  # the best 32


def test_a_frame_the_cloud_refuses_is_dropped_and_the_journal_behind_it_uploaded(
    bundle: Path, images, cloud: RefCloud, tmp_path: Path, caplog
) -> None:
    journal = tmp_path / "j.sqlite"
    with indexed(bundle, journal) as offline:  # no cloud: all five journalled
        ids = [r.frame_id for r in by_id(offline.classify_many(images[:5], PROMPTS))]
    cloud.faults.refuse_upload_frames = {ids[1]}  # INVALID_ARGUMENT for any Upload holding it
    with indexed(bundle, journal, cloud, **UPLOAD) as node:
        wait_for(lambda: node.index.pending == 0, "the journal behind the refused frame")
        assert (node.index.rejected, node.index.uploaded, node.index.uploader.stats.failures) == (1, 4, 0)
    assert [r.frame_id for r in cloud.stored("cam-1", via="upload")] == [ids[0], *ids[2:]]
    (warning,) = [r.getMessage() for r in caplog.records if "refused frame" in r.getMessage()]
    assert f"refused frame {ids[1]} of node cam-1" in warning
    assert f"INVALID_ARGUMENT: frames[0] (frame {ids[1]}): injected refusal" in warning
    with indexed(bundle, journal) as again:  # dropped for good, not found again after a restart
        assert again.index.pending == 0


def test_a_refusal_that_names_no_frame_keeps_the_batch(
    bundle: Path, images, cloud: RefCloud, tmp_path: Path
) -> None:
    """INVALID_ARGUMENT about the call itself (not `frames[i] ...`) would refuse each entry alone too:
    dropping them all would lose the journal, so it is a failure like any other, retried later."""
    journal = tmp_path / "j.sqlite"
    with indexed(bundle, journal) as offline:
        ids = [r.frame_id for r in by_id(offline.classify_many(images[:3], PROMPTS))]
    cloud.faults.upload_codes = [grpc.StatusCode.INVALID_ARGUMENT]  # "injected": no frame named
    with indexed(bundle, journal, cloud, **UPLOAD) as node:
        wait_for(lambda: node.index.pending == 0, "the retry after the refused call")
        assert (node.index.rejected, node.index.uploader.stats.failures) == (0, 1)
    assert [r.frame_id for r in cloud.stored("cam-1", via="upload")] == ids


def test_an_unreachable_cloud_keeps_the_journal(
    bundle: Path, images, cloud: RefCloud, tmp_path: Path
) -> None:
    cloud.faults.upload_codes = [grpc.StatusCode.DEADLINE_EXCEEDED]  # not retried at once: a failure
    with indexed(bundle, tmp_path / "j.sqlite", cloud, **UPLOAD) as node:
        cloud.faults.error_frames = {1: "INTERNAL"}
        (r,) = node.classify_many(images[:1], PROMPTS)
        assert r.mode == "local"
        wait_for(lambda: node.index.uploaded == 1, "the retry after the failed Upload")
        assert node.index.uploader.stats.failures == 1
    assert [x.frame_id for x in cloud.stored("cam-1", via="upload")] == [r.frame_id]


def test_a_journal_that_cannot_be_opened_is_a_settings_error(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SettingsError, match="journal .*cannot be opened"):
        EdgeNode(bundle, index=True, journal=tmp_path / "file" / "j.sqlite")


def test_index_with_the_default_node_id_warns_that_a_restart_loses_the_journal(
    bundle: Path, tmp_path: Path, caplog
) -> None:
    with EdgeNode(bundle, index=True, cache_dir=tmp_path) as node:
        assert node.index.journal is not None
        assert node.index.journal.path.parent == tmp_path / "journal"
    assert "default node id" in caplog.text and "SPLITCLIP_NODE_ID" in caplog.text

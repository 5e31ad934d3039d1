"""The indexer (cloud_service/search/ingest.py) against a real embedded PostgreSQL: rows arrive in few
COPYs, a batch sent again is stored once, a full queue drops (and counts) instead of blocking, and a
real outage (the server stopped, then started again on the same data dir) loses only what did not
fit in the queue."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from cloud_service.grpc_api import pb
from cloud_service.search.embedded_pg import EmbeddedPostgres
from cloud_service.search.ingest import Indexer, RowError, check_row, connect, frame_row, upload_row
from cloud_service.search.store import FrameStore, Row
from splitclip.constants import INDEX_MAX_LABELS, INDEX_MAX_TEXT_CHARS
from tests.conftest import pg_base_dir

DIM = 16
T0 = 1_760_000_000.0


def rows(bundle: str, n: int, start: int = 0, node: str = "n0") -> list[Row]:
    rng = np.random.default_rng(start)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [Row(bundle, node, start + i, T0 + start + i, "cam", ("cat",), x[i]) for i in range(n)]


def count(url: str, bundle: str) -> int:
    with FrameStore(url) as s:
        s.migrate()
        return s.count(bundle)


def wait_for(pred, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_rows_arrive_in_few_copies_and_a_resent_batch_is_stored_once(pg: EmbeddedPostgres) -> None:
    ix = Indexer(pg.url, "b-batch", DIM, batch_rows=256, batch_wait_s=1.0)
    try:
        batch = rows("b-batch", 600)
        assert all(ix.offer(r) for r in batch)
        assert ix.wait_idle(60)
        s = ix.stats()
        assert (s["written"], s["duplicates"], s["dropped"], s["queued"]) == (600, 0, 0, 0)
        assert s["batches"] <= 4, s  # 256 + 256 + 88 (one more if the writer woke between offers)
        assert s["store_up"] and s["write_errors"] == 0
        assert count(pg.url, "b-batch") == 600

        assert all(ix.offer(r) for r in batch)  # the same frames again: skipped by the store
        assert ix.wait_idle(60)
        s = ix.stats()
        assert (s["written"], s["duplicates"]) == (600, 600)
        assert count(pg.url, "b-batch") == 600
    finally:
        assert ix.close() == 0


def test_bad_rows_are_refused_at_offer_and_never_block_a_batch(pg: EmbeddedPostgres) -> None:
    ix = Indexer(pg.url, "b-bad", DIM, batch_wait_s=0.2)
    try:
        good = rows("b-bad", 3)
        g = good[0]
        bad = [
            Row("b-bad", "n0", 10, T0, "cam", ("cat",), np.zeros(DIM, np.float32)),  # no unit vector
            Row("b-bad", "n0", 11, T0, "cam", ("cat",), g.embedding[:8].copy()),  # wrong dim
            Row("b-bad", "n0", 2**63, T0, "cam", ("cat",), g.embedding),  # beyond bigint
            Row("b-bad", "n0", 12, float("nan"), "cam", ("cat",), g.embedding),
            Row("b-bad", "n\x00", 13, T0, "cam", ("cat",), g.embedding),  # NUL: PostgreSQL refuses it
            Row("b-other", "n0", 14, T0, "cam", ("cat",), g.embedding),
        ]
        assert [ix.offer(r) for r in [*bad, *good]] == [False] * len(bad) + [True] * 3
        assert ix.wait_idle(60)
        s = ix.stats()
        assert (s["rejected"], s["written"], s["write_errors"]) == (len(bad), 3, 0)
        assert check_row(bad[1], DIM) is not None and "float32 [16]" in str(check_row(bad[1], DIM))
    finally:
        ix.close()


def test_one_set_of_row_rules_frames_are_cleaned_uploads_refused(pg: EmbeddedPostgres) -> None:
    """The limits Upload refuses by are the ones a frame's row is checked by; a frame's row over them
    is cleaned (and stored), an uploaded frame over them is refused naming the limit."""
    g = rows("b-rules", 1)[0]
    long_source = "/very/long/path/" + "d" * INDEX_MAX_TEXT_CHARS + "/gate-7.jpg"
    many = tuple(f"label {i}" for i in range(INDEX_MAX_LABELS + 8))
    for row, needle in (
        (Row("b-rules", "n0", 1, T0, long_source, ("cat",), g.embedding), "source: 327 characters"),
        (Row("b-rules", "n0", 1, T0, "cam", many, g.embedding), "labels: 40 given, at most 32"),
        (Row("b-rules", "", 1, T0, "cam", ("cat",), g.embedding), "node_id: must not be empty"),
        (Row("b-rules", "n" * 301, 1, T0, "cam", ("cat",), g.embedding), "node_id: 301 characters"),
        (Row("b-rules", "n0", 1, T0, "cam", ("x" * 301,), g.embedding), "labels[0]: 301 characters"),
    ):
        assert needle in str(check_row(row, DIM)), row
    frame = pb.Frame(node_id="n0", frame_id=5, captured_at=T0, source=long_source)
    result = pb.Result(top=[pb.Label(prompt=x) for x in ("y" * 400, "a\x00b", *many)])
    row = frame_row("b-rules", frame, result, g.embedding)
    assert check_row(row, DIM) is None
    assert len(row.source) == INDEX_MAX_TEXT_CHARS and row.source == "…" + long_source[-299:]
    assert row.labels == ("…" + "y" * 299, "ab", *many[: INDEX_MAX_LABELS - 2])  # the node's rule too
    ix = Indexer(pg.url, "b-rules", DIM, batch_wait_s=0.0)
    try:
        assert ix.offer(row) and ix.wait_idle(60) and ix.stats()["written"] == 1
    finally:
        ix.close()

    def uploaded(**kw: object) -> pb.IndexedFrame:
        base = {"frame_id": 3, "captured_at": T0, "embedding": g.embedding.astype("<f4").tobytes()}
        return pb.IndexedFrame(**{**base, **kw})

    assert upload_row("b-rules", "n0", uploaded(source="cam", labels=["cat"]), DIM, T0).labels == ("cat",)
    assert upload_row("b-rules", "n0", uploaded(captured_at=0), DIM, T0 + 9).ts == T0 + 9
    for frame_kw, needle in (
        ({"source": long_source}, "source: 327 characters"),
        ({"labels": list(many)}, "labels: 40 given"),
        ({"embedding": b"\0" * 12}, "embedding is 12 bytes"),
    ):
        with pytest.raises(RowError, match=needle):
            upload_row("b-rules", "n0", uploaded(**frame_kw), DIM, T0)
    with pytest.raises(RowError, match="node_id: must not be empty"):
        upload_row("b-rules", "", uploaded(), DIM, T0)


def test_a_full_queue_drops_and_counts_instead_of_blocking() -> None:
    # Nothing listens on this socket dir: the store is down from the start.
    url = "postgresql://postgres@/postgres?host=/nonexistent-splitclip-pg"
    ix = Indexer(url, "b-full", DIM, queue_rows=50, retry_min_s=0.05)
    try:
        accepted = [ix.offer(r) for r in rows("b-full", 80)]  # returns although no write can succeed
        assert accepted == [True] * 50 + [False] * 30
        wait_for(lambda: ix.stats()["write_errors"] >= 1)
        s = ix.stats()
        assert (s["queued"], s["dropped"], s["written"], s["store_up"]) == (50, 30, 0, False)
        assert "connect" in s["last_error"]
    finally:
        left = ix.close(timeout_s=0.5)  # all 50 unless a connect attempt held a batch just then
    ix._thread.join(10)  # a failed connect during close drops its batch and ends the writer
    assert not ix._thread.is_alive()
    assert (ix.stats()["dropped"], ix.stats()["queued"], left in (50, 0)) == (80, 0, True)


def test_close_during_a_slow_write_counts_each_row_once_and_the_writer_closes_its_store(
    pg: EmbeddedPostgres,
) -> None:
    """A write that outlasts close(): a real slow write, the table locked by another connection."""
    ix = Indexer(pg.url, "b-slow", DIM, batch_rows=4, batch_wait_s=0.0)
    first, more = rows("b-slow", 1), rows("b-slow", 10, start=1)
    assert ix.offer(first[0]) and ix.wait_idle(60)  # connected, the bundle registered
    writer_store = ix._store
    with FrameStore(pg.url) as blocker, FrameStore(pg.url) as watcher:
        with blocker._conn.transaction():
            blocker._conn.execute("LOCK TABLE splitclip_frames IN ACCESS EXCLUSIVE MODE")
            assert all(ix.offer(r) for r in more)
            wait_for(  # the writer's INSERT waits for the lock
                lambda: watcher._conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]
            )
            left = ix.close(timeout_s=0.3)
            assert ix._thread.is_alive() and 1 <= left < 10  # the batch in flight is the writer's
            assert ix.stats()["dropped"] == left
        # the lock is released: the writer finishes its batch, counts it, closes its store and ends
        ix._thread.join(60)
        assert not ix._thread.is_alive() and ix._store is None
        s = ix.stats()
        assert (s["written"], s["dropped"], s["duplicates"], s["queued"]) == (11 - left, left, 0, 0)
        assert watcher.count("b-slow") == 11 - left
    assert writer_store is not None and writer_store._conn.closed  # closed by the writer itself


def test_a_store_outage_retries_the_queued_rows_and_drops_beyond_the_queue() -> None:
    base = pg_base_dir("splitclip-ingest-")
    server = EmbeddedPostgres(base / "data").start()
    url = server.url
    ix = Indexer(url, "b-out", DIM, queue_rows=150, batch_rows=64, batch_wait_s=0.05, retry_min_s=0.05)
    try:
        assert all(ix.offer(r) for r in rows("b-out", 100))
        assert ix.wait_idle(60) and ix.stats()["written"] == 100

        server.stop()  # the real server goes away (pg_ctl stop): the writer's connection is lost
        during = rows("b-out", 200, start=100)
        accepted = [ix.offer(r) for r in during]
        assert accepted == [True] * 150 + [False] * 50
        wait_for(lambda: ix.stats()["write_errors"] >= 2)  # tried, failed, reconnect failed too
        s = ix.stats()
        assert (s["queued"], s["dropped"], s["store_up"]) == (150, 50, False)

        server = EmbeddedPostgres(base / "data").start()  # the same data dir, so the same rows
        assert server.url == url
        assert ix.wait_idle(60)
        s = ix.stats()
        assert (s["written"], s["retried"], s["dropped"], s["queued"]) == (250, 150, 50, 0)
        assert s["store_up"]
        with connect(url, "b-out", DIM) as store:
            assert store.count("b-out") == 250
            stored = {h.frame_id for h in store.search("b-out", during[0].embedding, k=300, exact=True)}
        assert stored == set(range(250))  # the first 150 of the outage, not the 50 beyond the queue
    finally:
        ix.close()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)

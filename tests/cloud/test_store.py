"""The fleet-search store against a real PostgreSQL + pgvector: the embedded pgserver one, one per module.

Covers cloud_service/search: migrations (versioned, once, in order, concurrent starts, rollback),
idempotent writes, bundle isolation, the node / time / label filters, HNSW against exact search, the
root handling of the embedded server, and the settings.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg.conninfo import make_conninfo

from cloud_service.search import open_store
from cloud_service.search.embedded_pg import (
    ROOT_DATA_DIR,
    EmbeddedPgError,
    EmbeddedPostgres,
    default_data_dir,
)
from cloud_service.search.migrations import MIGRATIONS, Migration, MigrationError, apply
from cloud_service.search.settings import SearchSettings, SettingsError, redacted
from cloud_service.search.store import FrameStore, Row, StoreError, index_name, search_sql
from splitclip.procs import free_port
from tests.conftest import pg_base_dir

T0 = 1_760_000_000.0  # unix seconds of the test frames
ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def store(pg: EmbeddedPostgres) -> Iterator[FrameStore]:
    s = FrameStore(pg.url)
    s.migrate()
    yield s
    s.close()


_db_counter = iter(range(1000))


def fresh_db(pg: EmbeddedPostgres) -> str:
    """A new, empty database on the embedded server; returns its URL."""
    name = f"fresh_{next(_db_counter)}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return make_conninfo(pg.url, dbname=name)


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows_of(bundle: str, vecs: np.ndarray, node: str = "n0", labels: tuple[str, ...] = ("cat",)) -> list[Row]:
    return [Row(bundle, node, i, T0 + i, f"cam-{i % 3}", labels, v) for i, v in enumerate(vecs)]


def test_migrations_apply_once_in_order_even_when_replicas_start_together(pg: EmbeddedPostgres) -> None:
    url = fresh_db(pg)
    with FrameStore(url) as early, pytest.raises(StoreError, match="call migrate"):
        early.ensure_bundle("b-x", 4)
    results: list[list[int]] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        with FrameStore(url) as s:
            barrier.wait()
            results.append(s.migrate())

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [[], [], [], [m.version for m in MIGRATIONS]]

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT version, name FROM splitclip_schema_version").fetchall()
        assert rows == [(m.version, m.name) for m in MIGRATIONS]
        more = (*MIGRATIONS, Migration(2, "extra", "CREATE TABLE t2 (a int); CREATE TABLE t2b (b int)"))
        assert apply(conn, more) == [2]
        assert apply(conn, more) == []
        # a failing migration leaves nothing behind, neither its tables nor its version
        bad = (*more, Migration(3, "bad", "CREATE TABLE t3 (a int); SELECT 1/0"))
        with pytest.raises(psycopg.errors.DivisionByZero):
            apply(conn, bad)
        assert conn.execute("SELECT to_regclass('t3')").fetchone() == (None,)
        assert [v for v, _ in conn.execute("SELECT version, name FROM splitclip_schema_version")] == [1, 2]
        # this code knows only version 1: a database at version 2 is refused, not written
        with pytest.raises(MigrationError, match=r"schema version\(s\) \[2\]"):
            apply(conn)
        with pytest.raises(MigrationError, match="unique and ascending"):
            apply(conn, (MIGRATIONS[0], MIGRATIONS[0]))


def test_writes_are_idempotent_and_hits_carry_the_frame(store: FrameStore) -> None:
    rng = np.random.default_rng(1)
    store.ensure_bundle("b-idem", 16)
    store.ensure_bundle("b-idem", 16)  # again: a no-op
    rows = rows_of("b-idem", unit(rng, 40, 16), labels=("cat", "sofa"))
    assert store.write(rows) == 40
    assert store.write(rows) == 0
    assert store.write(rows[:5] + rows[:5]) == 0  # duplicates inside one batch too
    assert store.count("b-idem") == 40
    # the stored row wins: a rewrite with other content for the same (bundle, node, frame) is skipped
    changed = Row("b-idem", "n0", 7, T0 + 999, "other", ("dog",), rows[0].embedding)
    assert store.write([changed]) == 0

    (hit,) = store.search("b-idem", rows[7].embedding, 1)
    assert (hit.node_id, hit.frame_id, hit.source, hit.labels) == ("n0", 7, "cam-1", ("cat", "sofa"))
    assert hit.ts == pytest.approx(T0 + 7, abs=1e-6)
    assert hit.score == pytest.approx(1.0, abs=1e-5)
    assert store.count("b-missing") == 0


def test_bad_writes_are_refused_whole(store: FrameStore) -> None:
    rng = np.random.default_rng(2)
    store.ensure_bundle("b-dim", 8)
    with pytest.raises(StoreError, match="stored with dim 8, not 16"):
        store.ensure_bundle("b-dim", 16)
    good = rows_of("b-dim", unit(rng, 3, 8))
    wrong = Row("b-dim", "n0", 99, T0, "", (), unit(rng, 1, 16)[0])
    with pytest.raises(StoreError, match=r"float32 \[8\].*\[16\]"):
        store.write([*good, wrong])
    with pytest.raises(StoreError, match="float32"):
        store.write([Row("b-dim", "n0", 98, T0, "", (), unit(rng, 1, 8)[0].astype(np.float64))])
    with pytest.raises(StoreError, match="unknown bundle b-never"):
        store.write([Row("b-never", "n0", 1, T0, "", (), unit(rng, 1, 8)[0])])
    with pytest.raises(StoreError, match="frame_id"):
        store.write([Row("b-dim", "n0", 2**63, T0, "", (), unit(rng, 1, 8)[0])])
    assert store.count("b-dim") == 0  # nothing of a refused batch is stored
    with pytest.raises(StoreError, match="query has shape"):
        store.search("b-dim", unit(rng, 1, 16)[0], 3)


def test_bundles_never_mix_even_with_closer_vectors(store: FrameStore) -> None:
    rng = np.random.default_rng(3)
    q = unit(rng, 1, 16)[0]
    store.ensure_bundle("b-A", 16)
    store.ensure_bundle("b-B", 16)
    store.write(rows_of("b-A", unit(rng, 30, 16), node="a-node"))
    store.write(rows_of("b-B", np.repeat(q[None], 30, axis=0), node="b-node"))  # all exactly the query
    for exact in (False, True):
        for k in (5, 30, 100):  # 100: more than A holds
            hits = store.search("b-A", q, k, exact=exact)
            assert len(hits) == min(k, 30)
            assert {h.node_id for h in hits} == {"a-node"}
            assert max(h.score for h in hits) < 0.99
        assert {h.node_id for h in store.search("b-B", q, 10, exact=exact)} == {"b-node"}


def test_filters_by_node_time_and_label(store: FrameStore) -> None:
    rng = np.random.default_rng(4)
    vecs = unit(rng, 300, 16)
    kinds = [("cat",), ("dog", "cat"), ("car",)]
    rows = [Row("b-F", f"n{i % 3}", i, T0 + i, "cam", kinds[i // 3 % 3], v) for i, v in enumerate(vecs)]
    store.ensure_bundle("b-F", 16)
    store.write(rows)
    q = unit(rng, 1, 16)[0]

    def brute(k: int, node=None, since=None, until=None, label=None) -> list[int]:
        keep = [
            r
            for r in rows
            if (node is None or r.node_id == node)
            and (since is None or r.ts >= since)
            and (until is None or r.ts <= until)
            and (label is None or label in r.labels)
        ]
        keep.sort(key=lambda r: -float(r.embedding @ q))
        return [r.frame_id for r in keep[:k]]

    cases = [
        {"node": "n1"},
        {"since": T0 + 100, "until": T0 + 149},
        {"label": "dog"},
        {"label": "car", "node": "n2"},
        {"node": "n0", "since": T0 + 30, "until": T0 + 45, "label": "cat"},  # fewer than k match
        {"label": "bird"},  # none match
    ]
    for filters in cases:
        want = brute(10, **filters)
        exact = store.search("b-F", q, 10, exact=True, **filters)
        assert [h.frame_id for h in exact] == want, filters
        approx = store.search("b-F", q, 10, **filters)
        assert len(approx) == len(want), filters  # HNSW + post-filter never returns short
        assert {h.frame_id for h in approx} <= set(brute(300, **filters)), filters
        assert approx[:1] == exact[:1] or approx[0].score == pytest.approx(exact[0].score), filters
    assert brute(10, node="n0", since=T0 + 30, until=T0 + 45, label="cat")  # the short case is not empty
    assert len(brute(10, node="n0", since=T0 + 30, until=T0 + 45, label="cat")) < 10


def test_hnsw_finds_the_same_top1_as_exact_search(pg: EmbeddedPostgres, store: FrameStore) -> None:
    rng = np.random.default_rng(5)
    dim, n = 64, 2000
    vecs = unit(rng, n, dim)
    store.ensure_bundle("b-R", dim)
    for i in range(0, n, 500):
        store.write([Row("b-R", "n0", i + j, T0 + i + j, "", (), v) for j, v in enumerate(vecs[i : i + 500])])
    assert store.count("b-R") == n

    with psycopg.connect(pg.url, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("ANALYZE splitclip_frames")
        for exact in (False, True):
            query, params = search_sql("b-R", dim, vecs[0], 10, None, None, None, None, exact)
            plan = "\n".join(r[0] for r in conn.execute(b"EXPLAIN " + query.as_bytes(conn), params))
            assert (index_name("b-R") in plan) is not exact, plan

    probes = rng.choice(n, 100, replace=False)
    recall = []
    for i in probes:
        approx = store.search("b-R", vecs[i], 10)
        exact = store.search("b-R", vecs[i], 10, exact=True)
        assert approx[0].frame_id == exact[0].frame_id == i
        recall.append(len({h.frame_id for h in approx} & {h.frame_id for h in exact}) / 10)
    assert exact == sorted(exact, key=lambda h: -h.score)
    assert np.mean(recall) >= 0.9, np.mean(recall)  # a floor for 2k random 64-dim vectors, m=16, ef=100


def test_embedded_server_runs_as_a_non_root_user(pg: EmbeddedPostgres) -> None:
    with psycopg.connect(pg.url) as conn:  # the backend exits with its connection: look while it is open
        pid, data_dir = conn.execute("SELECT pg_backend_pid(), current_setting('data_directory')").fetchone()
        user = psutil.Process(pid).username()
    assert Path(data_dir) == pg.data_dir
    assert user != "root"
    if ROOT:
        assert user == "pgserver"


@pytest.mark.skipif(not ROOT, reason="the check exists for root only")
def test_as_root_a_closed_parent_is_refused_not_opened() -> None:
    closed = Path(tempfile.mkdtemp(prefix="splitclip-closed-"))  # 0700
    try:
        with pytest.raises(EmbeddedPgError, match=f"{closed} is closed to other users"):
            EmbeddedPostgres(closed / "pg").start()
        assert stat.S_IMODE(closed.stat().st_mode) == 0o700
        assert list(closed.iterdir()) == []
        assert default_data_dir() == ROOT_DATA_DIR
    finally:
        closed.rmdir()


def test_open_store_on_a_url_or_an_embedded_server(pg: EmbeddedPostgres) -> None:
    store, server = open_store(SearchSettings(pg_url=pg.url, hnsw_ef_search=7))
    with store:
        assert server is None and store.settings.hnsw_ef_search == 7
        assert store.migrate() == []
    base = pg_base_dir("splitclip-pg-")
    try:
        store, server = open_store(SearchSettings(pg_data_dir=base / "own"))
        assert server is not None and server.data_dir == base / "own"
        with store:
            store.ensure_bundle("b-own", 4)
            assert store.count("b-own") == 0
        server.stop()
        assert not (base / "own" / "postmaster.pid").exists()  # stopped
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_store_errors_hide_the_password() -> None:
    with pytest.raises(StoreError, match="cannot connect") as err:
        FrameStore(f"postgresql://u:secret@127.0.0.1:{free_port()}/x?connect_timeout=5")
    assert "secret" not in str(err.value) and "u:***@" in str(err.value)


def test_settings_from_env_and_their_checks() -> None:
    s = SearchSettings.load(
        env={
            "SPLITCLIP_PG_URL": "postgresql://u:p@db/x",
            "SPLITCLIP_HNSW_M": "24",
            "SPLITCLIP_HNSW_EF_SEARCH": "",
        }
    )
    assert (s.pg_url, s.hnsw_m, s.hnsw_ef_construction, s.hnsw_ef_search) == (
        "postgresql://u:p@db/x",
        24,
        64,
        100,
    )
    assert SearchSettings.load({"hnsw_ef_search": 300}, env={}).hnsw_ef_search == 300
    for bad, match in (
        ({"hnsw_m": 1}, "hnsw_m must be in 2..100"),
        ({"hnsw_m": 40}, "hnsw_ef_construction must be in 2\\*hnsw_m..1000"),
        ({"hnsw_ef_search": 0}, "hnsw_ef_search"),
        ({"pg_url": "mysql://u:pw@h/x"}, "must start with postgresql://"),
        ({"hnsw_mm": 3}, "unknown search setting"),
    ):
        with pytest.raises(SettingsError, match=match) as err:
            SearchSettings.load(bad, env={})
        assert "pw" not in str(err.value)
    assert redacted("postgresql://u:pw@h:5432/x") == "postgresql://u:***@h:5432/x"
    assert redacted("postgresql:///x?host=/tmp") == "postgresql:///x?host=/tmp"

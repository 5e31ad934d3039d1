"""The fleet-search store: frame embeddings of every node in PostgreSQL + pgvector, searched by cosine.

Layout: one table, `splitclip_frames` (migrations.py), with a `bundle_id` column, and per bundle one
partial HNSW index on `embedding::vector(dim)` `WHERE bundle_id = '<id>'` (`ensure_bundle`). Chosen
over a table per bundle because the schema then stays one set of plain versioned migrations (a table
per bundle would need every later migration to loop over the bundles' tables), while each bundle
still gets an index of its own rows only, of its own dimension. Bundles never mix: every query this
store sends has `bundle_id = '<id>'` as a literal (so that the planner can match the partial index;
a bind parameter would hide it from generic plans), and an embedding of the wrong dimension is refused
by the index's cast. The cost: building an index (not CONCURRENTLY) holds writes to all bundles; a new
bundle's index is built while it is empty, so that is instant, but a rebuild (`build_index`) is not.

Search: cosine distance (`<=>`), score = 1 - distance. `exact=False` lets the planner use the HNSW
index with `hnsw.ef_search` set for that query (raised to k). pgvector 0.6 filters *after* the index
scan, so a filter can leave fewer than k of the ef_search candidates: a search that HNSW answers with
fewer than k hits is answered again exactly. `exact=True` computes every distance of the bundle's rows
that pass the filters (a MATERIALIZED CTE, which no index can shortcut).

pgvector here is 0.6.2 (the pgserver wheel), which has no `halfvec` (0.7+): embeddings are `vector`.
One connection, one operation at a time (a lock); a pool belongs to the wiring into the service.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from numpy.typing import NDArray
from pgvector.psycopg import register_vector
from psycopg import sql

from cloud_service.search import migrations
from cloud_service.search.settings import EF_SEARCH_MAX, SearchSettings, redacted
from splitclip.errors import SplitclipError

FRAMES = "splitclip_frames"
FRAME_ID_MAX = 2**63 - 1  # bigint; Frame.frame_id is uint64, real ids (counters) stay far below


class StoreError(SplitclipError, ValueError):
    """A request the store refuses (unknown bundle, wrong dimension, bad argument)."""


@dataclass(frozen=True)
class Row:
    bundle_id: str
    node_id: str
    frame_id: int
    ts: float  # unix seconds
    source: str
    labels: tuple[str, ...]  # the frame's top labels, best first
    embedding: NDArray[np.float32]  # L2-normalised, [dim]


@dataclass(frozen=True)
class Hit:
    node_id: str
    frame_id: int
    ts: float
    source: str
    labels: tuple[str, ...]
    score: float  # cosine similarity, 1 = same direction


def index_name(bundle_id: str) -> str:
    return "splitclip_frames_hnsw_" + hashlib.sha256(bundle_id.encode()).hexdigest()[:16]


class FrameStore:
    def __init__(self, url: str, settings: SearchSettings | None = None) -> None:
        self.settings = settings or SearchSettings()
        self.settings.validate()
        try:
            self._conn = psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as e:
            raise StoreError(f"cannot connect to PostgreSQL at {redacted(url)}: {e}".strip()) from e
        self._lock = threading.Lock()
        self._typed = False
        self._dims: dict[str, int] = {}

    def migrate(self) -> list[int]:
        """Bring the schema to the latest version; returns the versions applied now."""
        with self._lock:
            done = migrations.apply(self._conn)
            self._types()
            return done

    def _types(self) -> None:
        if not self._typed:
            versions = [v for v, _ in migrations.applied(self._conn)]
            if migrations.latest() not in versions:
                raise StoreError("the search store's schema is not migrated: call migrate() first")
            register_vector(self._conn)
            self._conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS splitclip_stage (bundle_id text, node_id text, frame_id bigint,"
                " ts float8, source text, labels text[], embedding vector) ON COMMIT DELETE ROWS"
            )
            self._typed = True

    def ensure_bundle(self, bundle_id: str, dim: int, *, index: bool = True) -> None:
        """Register `bundle_id` with embeddings of `dim` and (index=True) build its HNSW index if missing."""
        if not bundle_id or dim < 1:
            raise StoreError(f"bundle id must be non-empty and dim >= 1, got {bundle_id!r}, {dim}")
        with self._lock:
            self._types()
            try:
                with self._conn.transaction():
                    self._conn.execute(
                        "INSERT INTO splitclip_bundles (bundle_id, dim) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                        (bundle_id, dim),
                    )
                    stored = self._dim(bundle_id)
                    if stored != dim:
                        raise StoreError(f"bundle {bundle_id} is stored with dim {stored}, not {dim}")
                    if index:
                        self._create_index(bundle_id, dim)
            except BaseException:
                self._dims.pop(bundle_id, None)  # it may have been read inside the rolled-back transaction
                raise

    def build_index(self, bundle_id: str) -> None:
        """(Re)build the bundle's HNSW index with the current m / ef_construction (after a bulk load)."""
        with self._lock:
            self._types()
            with self._conn.transaction():
                dim = self._dim(bundle_id)
                self._conn.execute(
                    sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(index_name(bundle_id)))
                )
                self._create_index(bundle_id, dim)

    def _create_index(self, bundle_id: str, dim: int) -> None:
        # the lock serialises concurrent ensure_bundle calls, which IF NOT EXISTS alone does not
        self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (migrations.LOCK_KEY,))
        s = self.settings
        self._conn.execute(
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {name} ON {frames} USING hnsw ((embedding::vector({dim})) "
                "vector_cosine_ops) WITH (m = {m}, ef_construction = {efc}) WHERE bundle_id = {bundle}"
            ).format(
                name=sql.Identifier(index_name(bundle_id)),
                frames=sql.Identifier(FRAMES),
                dim=sql.Literal(dim),
                m=sql.Literal(s.hnsw_m),
                efc=sql.Literal(s.hnsw_ef_construction),
                bundle=sql.Literal(bundle_id),
            )
        )

    def _dim(self, bundle_id: str) -> int:
        if bundle_id not in self._dims:
            row = self._conn.execute(
                "SELECT dim FROM splitclip_bundles WHERE bundle_id = %s", (bundle_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"unknown bundle {bundle_id}: call ensure_bundle(bundle_id, dim) first")
            self._dims[bundle_id] = int(row[0])
        return self._dims[bundle_id]

    def write(self, rows: Iterable[Row]) -> int:
        """Store `rows` in one COPY; rows already stored (same bundle, node, frame) are skipped.
        Returns how many were new."""
        rows = list(rows)
        if not rows:
            return 0
        with self._lock:
            self._types()
            for r in rows:
                self._check(r)
            with self._conn.transaction(), self._conn.cursor() as cur:
                with cur.copy(
                    "COPY splitclip_stage (bundle_id, node_id, frame_id, ts, source, labels, embedding)"
                    " FROM STDIN WITH (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(["text", "text", "int8", "float8", "text", "text[]", "vector"])
                    for r in rows:
                        copy.write_row(
                            (r.bundle_id, r.node_id, r.frame_id, r.ts, r.source, list(r.labels), r.embedding)
                        )
                cur.execute(
                    f"INSERT INTO {FRAMES} (bundle_id, node_id, frame_id, ts, source, labels, embedding)"
                    " SELECT bundle_id, node_id, frame_id, to_timestamp(ts), source, labels, embedding"
                    " FROM splitclip_stage ON CONFLICT DO NOTHING"
                )
                return max(cur.rowcount, 0)

    def _check(self, r: Row) -> None:
        dim = self._dim(r.bundle_id)
        e = r.embedding
        if e.dtype != np.float32 or e.shape != (dim,):
            raise StoreError(
                f"bundle {r.bundle_id} stores float32 [{dim}] embeddings, got {e.dtype} {list(e.shape)} "
                f"(node {r.node_id}, frame {r.frame_id})"
            )
        if not 0 <= r.frame_id <= FRAME_ID_MAX:
            raise StoreError(f"frame_id must be in 0..{FRAME_ID_MAX}, got {r.frame_id}")

    def search(
        self,
        bundle_id: str,
        query_vec: NDArray[np.float32],
        k: int,
        node: str | None = None,
        since: float | None = None,
        until: float | None = None,
        label: str | None = None,
        ef_search: int | None = None,
        exact: bool = False,
    ) -> list[Hit]:
        """The k stored frames of `bundle_id` nearest to `query_vec` (best first) among those of `node`,
        with since <= ts <= until (unix seconds) and `label` among their labels, each filter if given."""
        if k < 1:
            raise StoreError(f"k must be >= 1, got {k}")
        ef = self.settings.hnsw_ef_search if ef_search is None else ef_search
        if not 1 <= ef <= EF_SEARCH_MAX:
            raise StoreError(f"ef_search must be in 1..{EF_SEARCH_MAX}, got {ef}")
        with self._lock:
            self._types()
            dim = self._dim(bundle_id)
            q = np.asarray(query_vec, dtype=np.float32)
            if q.shape != (dim,):
                raise StoreError(f"bundle {bundle_id} has dim {dim}, the query has shape {list(q.shape)}")
            exact = exact or k > EF_SEARCH_MAX  # HNSW returns at most ef_search rows
            query, params = search_sql(bundle_id, dim, q, k, node, since, until, label, exact)
            if not exact:
                with self._conn.transaction():
                    self._conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(max(ef, k)),))
                    rows = self._conn.execute(query, params).fetchall()
                if len(rows) == k:
                    return [_hit(r) for r in rows]
                query, params = search_sql(bundle_id, dim, q, k, node, since, until, label, exact=True)
            return [_hit(r) for r in self._conn.execute(query, params).fetchall()]

    def count(self, bundle_id: str) -> int:
        with self._lock:
            row = self._conn.execute(
                f"SELECT count(*) FROM {FRAMES} WHERE bundle_id = %s", (bundle_id,)
            ).fetchone()
            return int(row[0]) if row else 0

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> FrameStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def search_sql(
    bundle_id: str,
    dim: int,
    q: NDArray[np.float32],
    k: int,
    node: str | None,
    since: float | None,
    until: float | None,
    label: str | None,
    exact: bool,
) -> tuple[sql.Composed, dict[str, Any]]:
    """The search query and its parameters (tests EXPLAIN it to see which plan each mode gets)."""
    where = [sql.SQL("bundle_id = {}").format(sql.Literal(bundle_id))]
    params: dict[str, Any] = {"q": q, "k": k}
    for cond, name, value in (
        ("node_id = %(node)s", "node", node),
        ("ts >= to_timestamp(%(since)s)", "since", since),
        ("ts <= to_timestamp(%(until)s)", "until", until),
        ("labels @> ARRAY[%(label)s]::text[]", "label", label),  # @> so that the GIN index serves it
    ):
        if value is not None:
            where.append(sql.SQL(cond))
            params[name] = value
    dist = sql.SQL("embedding::vector({}) <=> %(q)s").format(sql.Literal(dim))
    cols = sql.SQL("node_id, frame_id, extract(epoch FROM ts)::float8, source, labels")
    body = {
        "cols": cols,
        "dist": dist,
        "frames": sql.Identifier(FRAMES),
        "where": sql.SQL(" AND ").join(where),
    }
    if exact:
        template = (
            "WITH c AS MATERIALIZED (SELECT {cols}, {dist} AS distance FROM {frames} WHERE {where}) "
            "SELECT * FROM c ORDER BY distance LIMIT %(k)s"
        )
    else:
        template = "SELECT {cols}, {dist} AS distance FROM {frames} WHERE {where} ORDER BY {dist} LIMIT %(k)s"
    return sql.SQL(template).format(**body), params


def _hit(r: Sequence[Any]) -> Hit:
    node_id, frame_id, ts, source, labels, distance = r
    return Hit(node_id, int(frame_id), float(ts), source, tuple(labels), 1.0 - float(distance))

"""The indexer: frames' rows go from the answer path to the store in batches, never on the critical path.

`offer(row)` is all a frame's answer does: it appends the row to a bounded in-memory queue and
returns at once (never blocks on the store, never raises). One writer thread takes up to
`batch_rows` rows from the head of the queue (or what arrived within `batch_wait_s` of the first) and
writes them with one `FrameStore.write` (one COPY, idempotent on (bundle, node, frame)).

The queue is the back-pressure and the retry buffer at once. A row leaves it only once the store has
it: the writer *peeks* its batch and pops it after the write succeeded. When the store is down
(connection refused or lost) the batch stays at the head and the writer reconnects with a doubling
backoff, migrating and `ensure_bundle`-ing again each time. Meanwhile new rows keep queueing until
the queue holds `queue_rows`; then every further row is dropped and counted. So: **rows are retried
while the queue holds them; beyond that they are dropped and counted** (`dropped`), and the answers
go out either way. A row the store refuses on its own (a batch with a bad row is refused whole) is
found by writing that batch row by row, and counted as `rejected`; `check_row` refuses the usual
ones before they queue.

Rows are built here for both paths, by the same rules (`check_row`, with the limits of
splitclip.constants that the node keeps too): `frame_row` for a frame the cloud answered, cleaned
by splitclip.storable (the rule the node cleans its journal entries by) rather than lost when a
field is over a limit (a long source or label keeps its end behind "…", NUL is removed, labels
beyond INDEX_MAX_LABELS are dropped), and `upload_row` for a frame of a node's Upload, refused as it
is (`RowError`) since the node keeps its journal within those limits.

`close` writes what is queued for up to its timeout; a write still running then is the writer's to
finish and count (each row is counted once: written, duplicate, rejected or dropped), and the writer
closes its store itself when it ends.

Stats (`stats()`): queued, written (new rows), duplicates, dropped, rejected, retried (rows that
were queued while the store was down, and landed after it came back), write_errors (failed attempts),
batches (successful writes), store_up, last_error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any

import numpy as np
import psycopg
from psycopg.conninfo import conninfo_to_dict

from cloud_service.grpc_api import pb
from cloud_service.search.settings import SearchSettings, redacted
from cloud_service.search.store import FRAME_ID_MAX, FrameStore, Row, StoreError
from splitclip.constants import INDEX_MAX_LABELS, INDEX_MAX_TEXT_CHARS
from splitclip.errors import SplitclipError
from splitclip.storable import storable_labels, storable_text

log = logging.getLogger("splitclip.cloud.index")

TS_MAX = 253_402_300_800.0  # 10000-01-01: PostgreSQL's timestamptz goes further, datetime does not
CONNECT_TIMEOUT_S = 5  # a black-holed host must not hold the writer (or a request) for minutes
NORM_TOL = 1e-2  # |norm - 1| allowed of a stored embedding (a node's fp32 head, sent as float32)


class RowError(SplitclipError, ValueError):
    """An uploaded frame the store would refuse; the message says why, in one line."""


def check_row(row: Row, dim: int) -> str | None:
    """Why the store would refuse `row` (or mis-store it), in one line; None when it is fine."""
    e = row.embedding
    if not isinstance(e, np.ndarray) or e.dtype != np.float32 or e.shape != (dim,):
        shape = list(getattr(e, "shape", ()))
        return f"embedding: float32 [{dim}] expected, got {getattr(e, 'dtype', type(e).__name__)} {shape}"
    n = float(np.linalg.norm(e.astype(np.float64)))
    if not math.isfinite(n) or abs(n - 1.0) > NORM_TOL:
        return f"embedding: must be finite and L2-normalised, its norm is {n:.4g}"
    if not 0 <= row.frame_id <= FRAME_ID_MAX:
        return f"frame_id: must be in 0..{FRAME_ID_MAX}, got {row.frame_id}"
    if not (math.isfinite(row.ts) and 0 <= row.ts < TS_MAX):
        return f"captured_at: must be in 0..{TS_MAX:.0f} seconds since the epoch, got {row.ts}"
    if not row.node_id:
        return "node_id: must not be empty"
    if len(row.labels) > INDEX_MAX_LABELS:
        return f"labels: {len(row.labels)} given, at most {INDEX_MAX_LABELS} allowed"
    for what, text in (
        ("node_id", row.node_id),
        ("source", row.source),
        *((f"labels[{j}]", x) for j, x in enumerate(row.labels)),
    ):
        if len(text) > INDEX_MAX_TEXT_CHARS:
            return f"{what}: {len(text)} characters, at most {INDEX_MAX_TEXT_CHARS} allowed"
        if "\x00" in text:  # PostgreSQL text cannot hold NUL
            return f"{what}: must not contain NUL characters"
    return None


def clean_row(row: Row) -> Row:
    """`row` with a source and labels within the limits: the first INDEX_MAX_LABELS labels (the best),
    each cleaned like the source (splitclip.storable, the node's rule too). The node id is left as it
    is (check_row judges it)."""
    source = storable_text(row.source)
    labels = storable_labels(row.labels)
    if labels == row.labels and source == row.source:
        return row
    return dataclasses.replace(row, source=source, labels=labels)


def frame_row(bundle_id: str, frame: pb.Frame, result: pb.Result, embedding: np.ndarray) -> Row:
    """The store row of a frame the cloud answered (its top labels, its image embedding [dim]),
    cleaned (`clean_row`): a long source or many labels must not lose the frame's row."""
    row = Row(
        bundle_id=bundle_id,
        node_id=frame.node_id,
        frame_id=frame.frame_id,
        ts=frame.captured_at or time.time(),
        source=frame.source,
        labels=tuple(label.prompt for label in result.top),
        embedding=np.asarray(embedding, dtype=np.float32),
    )
    return clean_row(row)


def upload_row(bundle_id: str, node_id: str, f: pb.IndexedFrame, dim: int, now: float) -> Row:
    """The store row of a frame of a node's Upload (`captured_at` 0 = `now`); RowError when the store
    would refuse it (an Upload is refused whole, naming the frame, rather than stored in part)."""
    if len(f.embedding) != 4 * dim:
        raise RowError(f"embedding is {len(f.embedding)} bytes, expected float32 [{dim}] ({4 * dim} bytes)")
    emb = np.frombuffer(f.embedding, dtype="<f4").astype(np.float32)  # [dim]
    ts = f.captured_at if f.captured_at != 0 else now
    row = Row(bundle_id, node_id, f.frame_id, ts, f.source, tuple(f.labels), emb)
    problem = check_row(row, dim)
    if problem is not None:
        raise RowError(problem)
    return row


def is_down(e: BaseException) -> bool:
    """The store is unreachable (refused, lost, shut down), as opposed to refusing the rows."""
    if isinstance(e, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    return isinstance(e, StoreError) and isinstance(e.__cause__, psycopg.OperationalError)


def with_timeout(url: str) -> str:
    """`url` with a connect timeout unless it sets one."""
    if "connect_timeout" in conninfo_to_dict(url):
        return url
    if "://" not in url:  # key=value form
        return f"{url} connect_timeout={CONNECT_TIMEOUT_S}"
    # kept a URL (not make_conninfo's key=value form), which is what `redacted` hides passwords of
    return f"{url}{'&' if '?' in url else '?'}connect_timeout={CONNECT_TIMEOUT_S}"


def connect(url: str, bundle_id: str, dim: int, settings: SearchSettings | None = None) -> FrameStore:
    """A store on `url`, migrated, with `bundle_id` registered (and indexed); raises when down."""
    store = FrameStore(with_timeout(url), settings)
    try:
        store.migrate()
        store.ensure_bundle(bundle_id, dim)
    except BaseException:
        store.close()
        raise
    return store


class Indexer:
    """Batches offered rows into the store from one writer thread; see the module docstring."""

    def __init__(
        self,
        url: str,
        bundle_id: str,
        dim: int,
        *,
        settings: SearchSettings | None = None,
        queue_rows: int = 10_000,
        batch_rows: int = 256,
        batch_wait_s: float = 0.05,
        retry_min_s: float = 0.1,
        retry_max_s: float = 2.0,
        opener: Callable[[], FrameStore] | None = None,
    ) -> None:
        if queue_rows < 1 or batch_rows < 1:
            raise ValueError(f"queue_rows and batch_rows must be >= 1, got {queue_rows}, {batch_rows}")
        self.url, self.bundle_id, self.dim = url, bundle_id, dim
        self.queue_rows, self.batch_rows, self.batch_wait_s = queue_rows, batch_rows, batch_wait_s
        self.retry_min_s, self.retry_max_s = retry_min_s, retry_max_s
        self._open = opener or (lambda: connect(url, bundle_id, dim, settings))
        self._rows: deque[Row] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._abandoned = False  # close() has given up waiting: the writer ends after its current write
        self._inflight = 0  # rows at the head of the queue the writer is writing now
        self._failed_head = 0  # rows at the head of the queue that were queued while the store was down
        self._down = False  # the last write or connect failed
        self._store: FrameStore | None = None
        self.counts = dict.fromkeys(
            ("written", "duplicates", "dropped", "rejected", "retried", "write_errors", "batches"), 0
        )
        self.store_up = False
        self.last_error = ""
        self._thread = threading.Thread(target=self._run, name="splitclip-indexer", daemon=True)
        self._thread.start()

    # -- the answer path ---------------------------------------------------------------------
    def offer(self, row: Row) -> bool:
        """Queue `row` for the store; False (and counted) when it is refused or the queue is full.
        Never blocks on the store and never raises."""
        try:
            problem = check_row(row, self.dim) if row.bundle_id == self.bundle_id else "another bundle"
            with self._cond:
                if problem is not None:
                    self.counts["rejected"] += 1
                    return False
                if self._closing or len(self._rows) >= self.queue_rows:
                    self.counts["dropped"] += 1
                    return False
                self._rows.append(row)
                if self._down:
                    self._failed_head += 1  # it waits for the store too
                if len(self._rows) == 1 or len(self._rows) >= self.batch_rows:
                    self._cond.notify()
                return True
        except Exception:  # pragma: no cover - a bug here must not fail a frame's answer
            log.exception("indexer offer failed")
            return False

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                **self.counts,
                "queued": len(self._rows),
                "store_up": self.store_up,
                "last_error": self.last_error,
            }

    def wait_idle(self, timeout_s: float) -> bool:
        """Until the queue is empty (everything offered so far is stored or dropped); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._rows:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    def close(self, timeout_s: float = 5.0) -> int:
        """Stop taking rows, write what is queued (trying for up to `timeout_s`), stop the writer.
        Rows still queued then are counted as dropped; returns how many that was. A write still
        running then (a slow store) is left to the writer, which counts its rows when it ends (written,
        or dropped if it fails) and closes its store itself."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        with self._cond:
            self._abandoned = True  # the writer stops retrying
            keep = self._inflight if self._thread.is_alive() else 0  # the writer's to count
            left = len(self._rows) - keep
            self.counts["dropped"] += left
            for _ in range(left):
                self._rows.pop()  # from the tail: the head is the batch in flight
            self._failed_head = min(self._failed_head, keep)
            self._cond.notify_all()  # a writer waiting out a backoff sees it and ends
        return left

    # -- the writer thread -------------------------------------------------------------------
    def _next_batch(self) -> list[Row] | None:
        """Up to batch_rows rows from the head, not removed (claimed: close leaves them to the writer);
        None once closing with nothing left."""
        with self._cond:
            while not self._rows:
                if self._closing:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._rows) < self.batch_rows and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = list(islice(self._rows, self.batch_rows))
            self._inflight = len(batch)
            return batch

    def _run(self) -> None:
        try:
            self._loop()
        finally:  # on this thread: close() may return while a write still holds the store
            if self._store is not None:
                with contextlib.suppress(Exception):
                    self._store.close()
                self._store = None

    def _loop(self) -> None:
        backoff = self.retry_min_s
        while (batch := self._next_batch()) is not None:
            if not batch:  # close() dropped what had queued while the batch was gathering
                continue
            try:
                if self._store is None:
                    self._store = self._open()
                    log.info("index store up at %s", redacted(self.url))
                self.store_up = True
                new, rejected = self._write(self._store, batch)
            except Exception as e:
                self._failed(e)
                with self._cond:
                    if self._abandoned:  # closed while this batch was being written: it is lost
                        self.counts["dropped"] += len(self._rows)
                        self._rows.clear()
                        return
                if self._wait(backoff):
                    backoff = min(2 * backoff, self.retry_max_s)
                continue
            backoff = self.retry_min_s
            with self._cond:
                for _ in range(len(batch)):
                    self._rows.popleft()  # only this thread pops the head; close() pops beyond it
                self._inflight = 0
                retried = min(self._failed_head, len(batch))
                self._failed_head -= retried
                self.counts["retried"] += retried
                self.counts["written"] += new
                self.counts["duplicates"] += len(batch) - rejected - new
                self.counts["rejected"] += rejected
                self.counts["batches"] += 1
                self._down = False
                self._cond.notify_all()  # wait_idle

    def _write(self, store: FrameStore, batch: list[Row]) -> tuple[int, int]:
        """(new rows, rejected rows): one COPY, or row by row when the store refuses the batch."""
        try:
            return store.write(batch), 0
        except Exception as e:
            if is_down(e) or not isinstance(e, StoreError | psycopg.DataError):
                raise
        new = rejected = 0
        for row in batch:
            try:
                new += store.write([row])
            except Exception as e:
                if is_down(e) or not isinstance(e, StoreError | psycopg.DataError):
                    raise
                log.warning("index store refused frame %s of node %s: %s", row.frame_id, row.node_id, e)
                rejected += 1
        return new, rejected

    def _failed(self, e: Exception) -> None:
        with self._cond:
            self._inflight = 0  # back in the queue: close() may drop it now
            self.counts["write_errors"] += 1
            self._failed_head = len(self._rows)  # all of them wait for the store now
            self._down = True
            self.store_up = False
            self.last_error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()
            self._store = None
        log.warning("index store down (%s); %d rows queued, retrying", self.last_error, len(self._rows))

    def _wait(self, s: float) -> bool:
        """Sleep `s` unless closing empties the queue first; True when it slept the whole time."""
        with self._cond:
            return not self._cond.wait_for(lambda: self._abandoned or (self._closing and not self._rows), s)

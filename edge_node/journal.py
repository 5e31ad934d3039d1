"""The offline journal: embeddings of frames a node answered locally, kept until the cloud has them.

A node with indexing on answers some frames by itself (no cloud, breaker open, deadline passed). Their
image embeddings go into a small SQLite file beside the node (`SPLITCLIP_JOURNAL`), and when the
cloud is back the uploader sends them, oldest first (by capture time), in batches, at a limited rate. A batch leaves the
journal only once the cloud has acknowledged it; the cloud's store is idempotent on
(bundle, node, frame), so a batch sent twice (acknowledged but the node crashed before deleting it)
is still stored once. Exactly once in the store = at least once from here + idempotent there.

SQLite is in the standard library, survives a power cut with its journal (WAL), and lets the node
keep answering while the uploader reads: nothing here needs a server.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from splitclip.storable import storable_labels, storable_text

log = logging.getLogger("splitclip.edge")

# PRAGMA user_version of the file; another version is refused, never guessed at. 2: labels are a JSON
# list (1 joined them by newlines, so a prompt holding one came back as two labels).
SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order: among frames of one time
    bundle_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    frame_id INTEGER NOT NULL,               -- unique per node across restarts (tickets.frame_ids)
    ts REAL NOT NULL,                        -- seconds since the epoch, when the frame was seen
    source TEXT NOT NULL,
    labels TEXT NOT NULL,                    -- top labels, best first: a JSON list of strings
    embedding BLOB NOT NULL,                 -- float32 [dim], L2-normalised
    UNIQUE (bundle_id, node_id, frame_id)    -- the cloud store's key
);
-- oldest first is by capture time: a frame lost in flight and re-run here arrives after later frames
CREATE INDEX IF NOT EXISTS pending_oldest ON pending (bundle_id, ts, seq);
"""


@dataclass(frozen=True)
class Entry:
    bundle_id: str
    node_id: str
    frame_id: int
    ts: float
    source: str
    labels: tuple[str, ...]
    embedding: np.ndarray  # [dim] float32
    seq: int = 0  # set by the journal


def storable(e: Entry) -> Entry:
    """`e` with a source and labels the cloud will take (at most INDEX_MAX_LABELS, the best ones, each
    cleaned like the source). The cloud refuses a whole Upload for one bad frame, so an entry that
    would be refused must never enter the journal: it would hold back every entry behind it."""
    source = storable_text(e.source)
    labels = storable_labels(e.labels)
    if source == e.source and labels == e.labels:
        return e
    return replace(e, source=source, labels=labels)


class Journal:
    """A thread-safe SQLite queue of entries; `add` from the node, `oldest`/`ack` from the uploader."""

    def __init__(self, path: str | Path, *, max_entries: int = 1_000_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version not in (0, SCHEMA_VERSION):
            self._db.close()
            raise JournalError(
                f"journal {self.path} has schema version {version}, this node reads {SCHEMA_VERSION}"
            )
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self.dropped = 0  # entries refused because the journal was full
        # entries per bundle, kept here: a count(*) per add is O(n), tens of ms near the 1e6 cap. This
        # process is the file's only writer (one journal per node id and bundle).
        self._counts: dict[str, int] = {}
        self._total = 0
        self._recount()

    def add(self, e: Entry) -> bool:
        """Keep one entry, made `storable`; False when the journal is full (counted in `dropped`) or
        already has it."""
        e = storable(e)
        vec = np.ascontiguousarray(e.embedding, dtype=np.float32)
        with self._lock:
            if self._total >= self.max_entries:
                self.dropped += 1
                return False
            cur = self._db.execute(
                "INSERT OR IGNORE INTO pending"
                " (bundle_id, node_id, frame_id, ts, source, labels, embedding)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    e.bundle_id,
                    e.node_id,
                    e.frame_id,
                    e.ts,
                    e.source,
                    json.dumps(list(e.labels), ensure_ascii=False),
                    vec.tobytes(),
                ),
            )
            if cur.rowcount != 1:
                return False
            self._counts[e.bundle_id] = self._counts.get(e.bundle_id, 0) + 1
            self._total += 1
            return True

    def oldest(self, limit: int, *, bundle_id: str | None = None) -> list[Entry]:
        """The `limit` oldest entries by capture time (`ts`, then arrival), of one bundle if given (a
        node uploads only its own bundle's)."""
        where, args = ("WHERE bundle_id = ?", (bundle_id,)) if bundle_id is not None else ("", ())
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, bundle_id, node_id, frame_id, ts, source, labels, embedding FROM pending"
                f" {where} ORDER BY ts, seq LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [
            Entry(b, n, f, ts, src, tuple(json.loads(lab)), np.frombuffer(emb, np.float32), seq)
            for seq, b, n, f, ts, src, lab, emb in rows
        ]

    def pending(self, bundle_id: str | None = None) -> int:
        """Entries not yet acknowledged (of one bundle, if given)."""
        with self._lock:
            return self._total if bundle_id is None else self._counts.get(bundle_id, 0)

    def ack(self, entries: Sequence[Entry]) -> None:
        """The cloud has stored these (or refused them for good): forget them. One transaction; an
        entry already gone (acknowledged twice) is not counted twice."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for e in entries:
                    if self._db.execute("DELETE FROM pending WHERE seq = ?", (e.seq,)).rowcount == 1:
                        self._counts[e.bundle_id] = self._counts.get(e.bundle_id, 0) - 1
                        self._total -= 1
                self._db.execute("COMMIT")
                if any(n < 0 for n in self._counts.values()):
                    self._recount()  # another process wrote the file (unsupported): trust the table
            except BaseException:
                self._db.execute("ROLLBACK")
                self._recount()
                raise

    def __len__(self) -> int:
        return self.pending()

    def _recount(self) -> None:
        q = "SELECT bundle_id, count(*) FROM pending GROUP BY bundle_id"
        self._counts = {b: int(n) for b, n in self._db.execute(q)}
        self._total = sum(self._counts.values())

    def close(self) -> None:
        with self._lock:
            self._db.close()


class JournalError(RuntimeError):
    """A journal file this code cannot read."""


LOG_BATCHES = 1024  # batches UploadStats.log remembers


@dataclass
class UploadStats:
    sent: int = 0  # entries acknowledged by the cloud
    batches: int = 0
    failures: int = 0  # batches the cloud did not acknowledge (retried later)
    rejected: int = 0  # entries the cloud refused on their own (Refused): dropped from the journal
    last_error: str = ""
    # (monotonic time, entries) of the last LOG_BATCHES batches: a node runs for months, so bounded
    log: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=LOG_BATCHES))


class Refused(RuntimeError):
    """`send` raises this when the cloud refused the entries as invalid (INVALID_ARGUMENT): sending
    them again as they are would be refused again, unlike a cloud that is down."""


class Uploader:
    """Drains a journal through `send(entries)` (which raises when the cloud did not take them),
    oldest first, `batch` entries at a time, at most `rate_per_s` entries per second on average
    (across drains too: a drain right after another waits out the last batch's share of time).
    With `bundle_id` only that bundle's entries are sent.

    A batch the cloud refuses (Refused: it refuses a whole Upload for one bad frame) is resent one
    entry at a time: an entry refused alone is dropped from the journal, counted in `rejected` and
    logged, the others are stored as usual; kept, it would hold back every entry behind it forever.
    Any other failure keeps the batch for the next drain."""

    def __init__(
        self,
        journal: Journal,
        send: Callable[[list[Entry]], None],
        *,
        batch: int = 64,
        rate_per_s: float = 200.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        bundle_id: str | None = None,
    ) -> None:
        if batch < 1 or rate_per_s <= 0:
            raise ValueError("journal upload: batch must be >= 1 and rate_per_s > 0")
        self.journal, self.send = journal, send
        self.batch, self.rate_per_s = batch, rate_per_s
        self.clock, self.sleep = clock, sleep
        self.bundle_id = bundle_id
        self.stats = UploadStats()
        self._free_at: float | None = None  # the clock value before which the next batch waits

    def drain(self, *, max_batches: int | None = None, stop: threading.Event | None = None) -> int:
        """Upload until the journal is empty, a send fails, `max_batches`, or `stop` is set;
        returns entries sent."""
        sent = done = 0
        while max_batches is None or done < max_batches:
            if stop is not None and stop.is_set():
                break
            entries = self.journal.oldest(self.batch, bundle_id=self.bundle_id)
            if not entries:
                break
            if self._free_at is not None and (wait := self._free_at - self.clock()) > 0:
                self.sleep(wait)  # the rate limit's pause, taken only when another batch follows
                if stop is not None and stop.is_set():
                    break
            t0 = self.clock()
            try:
                self.send(entries)
            except Refused as e:
                stored, sends, ok = self._one_by_one(entries, e)
            except Exception as e:  # the cloud is gone again: keep them for the next drain
                self._failed(e)
                break
            else:
                self.journal.ack(entries)
                stored, sends, ok = entries, len(entries), True
            sent += len(stored)
            done += 1
            self.stats.sent += len(stored)
            self.stats.batches += 1
            self.stats.log.append((t0, len(stored)))
            self._free_at = t0 + sends / self.rate_per_s  # this batch's share of time
            if not ok:
                break
        return sent

    def _one_by_one(self, entries: list[Entry], refusal: Refused) -> tuple[list[Entry], int, bool]:
        """Resend a refused batch an entry at a time; returns the entries stored (acknowledged here),
        entries sent, and False when a failure other than a refusal stopped it (the rest are kept)."""
        stored: list[Entry] = []
        sends = len(entries)
        for e in entries:
            if len(entries) > 1:
                sends += 1
                try:
                    self.send([e])
                except Refused as alone:
                    refusal = alone
                except Exception as x:
                    self._failed(x)
                    return stored, sends, False
                else:
                    self.journal.ack([e])
                    stored.append(e)
                    continue
            self.journal.ack([e])  # refused on its own: it would be refused every time
            self.stats.rejected += 1
            log.warning(
                "journal upload: the cloud refused frame %d of node %s, dropped from the journal (%s)",
                e.frame_id,
                e.node_id,
                refusal,
            )
        return stored, sends, True

    def _failed(self, e: Exception) -> None:
        self.stats.failures += 1
        self.stats.last_error = f"{type(e).__name__}: {e}"

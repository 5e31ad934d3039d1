"""The offline journal: embeddings of frames a node answered locally, kept until the cloud has them.

A node with indexing on answers some frames by itself (no cloud, breaker open, deadline passed). Their
image embeddings go into a small SQLite file beside the node (`SPLITCLIP_JOURNAL`), and when the
cloud is back the uploader sends them, oldest first, in batches, at a limited rate. A batch leaves the
journal only once the cloud has acknowledged it; the cloud's store is idempotent on
(bundle, node, frame), so a batch sent twice (acknowledged but the node crashed before deleting it)
is still stored once. Exactly once in the store = at least once from here + idempotent there.

SQLite is in the standard library, survives a power cut with its journal (WAL), and lets the node
keep answering while the uploader reads: nothing here needs a server.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order: oldest first
    bundle_id TEXT NOT NULL,
    frame_key TEXT NOT NULL,                 -- unique per node and bundle across restarts
    ts REAL NOT NULL,                        -- seconds since the epoch, when the frame was seen
    source TEXT NOT NULL,
    labels TEXT NOT NULL,                    -- top labels, best first, joined by \\n
    embedding BLOB NOT NULL,                 -- float32 [dim], L2-normalised
    UNIQUE (bundle_id, frame_key)
);
"""


@dataclass(frozen=True)
class Entry:
    bundle_id: str
    frame_key: str
    ts: float
    source: str
    labels: tuple[str, ...]
    embedding: np.ndarray  # [dim] float32
    seq: int = 0  # set by the journal


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
        self._db.executescript(_SCHEMA)
        self.dropped = 0  # entries refused because the journal was full

    def add(self, e: Entry) -> bool:
        """Keep one entry; False when the journal is full (counted in `dropped`) or already has it."""
        vec = np.ascontiguousarray(e.embedding, dtype=np.float32)
        with self._lock:
            if self._count() >= self.max_entries:
                self.dropped += 1
                return False
            cur = self._db.execute(
                "INSERT OR IGNORE INTO pending (bundle_id, frame_key, ts, source, labels, embedding)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (e.bundle_id, e.frame_key, e.ts, e.source, "\n".join(e.labels), vec.tobytes()),
            )
            return cur.rowcount == 1

    def oldest(self, limit: int) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, bundle_id, frame_key, ts, source, labels, embedding FROM pending"
                " ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            Entry(b, k, ts, src, tuple(lab.split("\n")) if lab else (), np.frombuffer(emb, np.float32), seq)
            for seq, b, k, ts, src, lab, emb in rows
        ]

    def ack(self, entries: Sequence[Entry]) -> None:
        """The cloud has stored these: forget them."""
        with self._lock:
            self._db.executemany("DELETE FROM pending WHERE seq = ?", [(e.seq,) for e in entries])

    def __len__(self) -> int:
        with self._lock:
            return self._count()

    def _count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM pending").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass
class UploadStats:
    sent: int = 0  # entries acknowledged by the cloud
    batches: int = 0
    failures: int = 0  # batches the cloud did not acknowledge (retried later)
    last_error: str = ""
    log: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, entries) per batch


class Uploader:
    """Drains a journal through `send(entries)` (which raises when the cloud did not take them),
    oldest first, `batch` entries at a time, at most `rate_per_s` entries per second on average."""

    def __init__(
        self,
        journal: Journal,
        send: Callable[[list[Entry]], None],
        *,
        batch: int = 64,
        rate_per_s: float = 200.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if batch < 1 or rate_per_s <= 0:
            raise ValueError("journal upload: batch must be >= 1 and rate_per_s > 0")
        self.journal, self.send = journal, send
        self.batch, self.rate_per_s = batch, rate_per_s
        self.clock, self.sleep = clock, sleep
        self.stats = UploadStats()

    def drain(self, *, max_batches: int | None = None) -> int:
        """Upload until the journal is empty, a send fails, or `max_batches`; returns entries sent."""
        sent = done = 0
        wait = 0.0  # the rate limit's pause, taken only when another batch follows
        while max_batches is None or done < max_batches:
            entries = self.journal.oldest(self.batch)
            if not entries:
                break
            if wait > 0:
                self.sleep(wait)
            t0 = self.clock()
            try:
                self.send(entries)
            except Exception as e:  # the cloud is gone again: keep them for the next drain
                self.stats.failures += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                break
            self.journal.ack(entries)
            sent += len(entries)
            done += 1
            self.stats.sent += len(entries)
            self.stats.batches += 1
            self.stats.log.append((t0, len(entries)))
            # this batch's share of time, less what sending it took already
            wait = len(entries) / self.rate_per_s - (self.clock() - t0)
        return sent

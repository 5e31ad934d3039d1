"""Fleet search on the node: each Frame's index fields, the journal of frames answered here, and the
thread that uploads that journal when the cloud is back.

With `index` on (SPLITCLIP_INDEX) every Frame asks the cloud to store its image embedding (index=True,
with captured_at and source); the cloud does so after scoring it, so a frame the cloud answered needs
nothing more from here. A frame the node answered itself (no cloud, breaker open, a lost or late frame
re-run here, a planner-local frame) has its embedding computed here, and that goes into the journal
(edge_node/journal.py) with its top labels, time and source. Error results have no embedding and are
not journalled. A re-run frame that the cloud did score after all is then sent twice; the store keeps
it once (idempotent on bundle, node and frame).

The "edge-upload" thread drains the journal through Upload while the breaker is closed (split mode):
it wakes when the breaker changes state (the prober's successful Hello closes it) and at least every
second, sends oldest first in batches at `upload_rate_per_s`, stops at the first failure and tries
again `upload_retry_s` later. A batch refused with INVALID_ARGUMENT (the cloud refuses a whole Upload
for one frame it will not store) is resent an entry at a time, and an entry refused alone is dropped
and counted (`rejected`), so that it cannot hold back the journal behind it; entries are made
storable before they are journalled (journal.storable), so that is a frame the node could not foresee. A batch leaves the journal only when Upload returned OK, which the cloud
answers only once the rows are durably stored; a lost acknowledgement means a resend whose rows the
store counts as duplicates. So each frame is stored once, oldest first.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import threading
from typing import Any

import grpc
import numpy as np

from edge_node.breaker import CircuitBreaker
from edge_node.client import CloudClient
from edge_node.journal import Entry, Journal, Refused, Uploader
from edge_node.results import EdgeResult
from edge_node.settings import EdgeSettings, default_node_id
from edge_node.tickets import Ticket
from splitclip.settings import SettingsError
from splitclip.wire import pb

log = logging.getLogger("splitclip.edge")

WAKE_S = 1.0  # the upload thread looks at the journal at least this often while the breaker is closed


class ShortAck(RuntimeError):
    """Upload returned OK but counted fewer rows than it was sent: keep them and send them again."""


class NodeIndex:
    """The node's part in fleet search; with `settings.index` off every method is a no-op. The
    journal opens here (a file that cannot be opened is a SettingsError); `start(client)` starts
    the upload thread once the node has a cloud client and said its first Hello."""

    def __init__(self, settings: EdgeSettings, bundle_id: str, breaker: CircuitBreaker) -> None:
        self.settings = settings
        self.bundle_id = bundle_id
        self.breaker = breaker
        self.client: CloudClient | None = None
        self.enabled = settings.index
        self.journal: Journal | None = None
        self.uploader: Uploader | None = None
        self.duplicates = 0  # rows the store already had (a resend after a lost acknowledgement)
        self.journal_errors = 0  # frames that could not be written to the journal
        self._last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.enabled:
            return
        path = settings.journal_path(bundle_id)
        try:
            self.journal = Journal(path, max_entries=settings.journal_max_entries)
        except (sqlite3.Error, OSError) as e:
            raise SettingsError(f"journal {path} cannot be opened: {e} (SPLITCLIP_JOURNAL)") from None
        if settings.node_id == default_node_id():
            log.warning(
                "index is on with the default node id %s, which has the pid in it: a restarted node will not "
                "find this journal (%s); set SPLITCLIP_NODE_ID",
                settings.node_id,
                path,
            )

    def start(self, client: CloudClient | None) -> None:
        """Upload the journal through `client` from now on (None: local only, the journal keeps
        everything until a run with a cloud uploads it)."""
        if self.journal is None or client is None or self._thread is not None:
            return
        self.client = client
        settings = self.settings
        self.uploader = Uploader(
            self.journal,
            self._send,
            batch=settings.upload_batch,
            rate_per_s=settings.upload_rate_per_s,
            sleep=self._stop.wait,
            bundle_id=self.bundle_id,
        )
        self._thread = threading.Thread(target=self._run, name="edge-upload", daemon=True)
        self._thread.start()

    # -- the node's hooks ------------------------------------------------------------------------
    def fields(self, t: Ticket) -> dict[str, Any]:
        """Extra pb.Frame fields of a frame: the index request, its time and source (none when off)."""
        if not self.enabled:
            return {}
        return {"index": True, "captured_at": t.captured_at, "source": t.source}

    def answered(self, t: Ticket, r: EdgeResult) -> None:
        """A frame got its one answer `r`: journal it if the node computed it (and its embedding)."""
        if self.journal is None or r.mode != "local" or r.error is not None or t.embedding is None:
            return
        emb = np.asarray(t.embedding, dtype=np.float32).reshape(-1)  # [embed_dim]
        emb = emb / max(float(np.linalg.norm(emb)), 1e-12)
        entry = Entry(
            self.bundle_id, self.settings.node_id, t.frame_id, t.captured_at, t.source, tuple(r.labels), emb
        )
        try:
            self.journal.add(entry)
        except Exception:  # a full disk must not cost the frame its answer
            self.journal_errors += 1
            log.exception("could not journal frame %d for fleet search", t.frame_id)

    @property
    def pending(self) -> int:
        """Journal entries of this bundle not yet stored by the cloud."""
        return self.journal.pending(self.bundle_id) if self.journal is not None else 0

    @property
    def rejected(self) -> int:
        """Journal entries the cloud refused on their own since the node started (dropped)."""
        return self.uploader.stats.rejected if self.uploader is not None else 0

    @property
    def uploaded(self) -> int:
        """Journal entries the cloud acknowledged since the node started."""
        return self.uploader.stats.sent if self.uploader is not None else 0

    def close(self) -> None:
        """Stop the upload thread (a batch in flight finishes or fails within its deadline); the
        journal keeps what was not acknowledged, for the next start."""
        self._stop.set()
        self.breaker.notify()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.upload_timeout_s + 5)
        if self.journal is not None:
            self.journal.close()

    # -- the upload thread -----------------------------------------------------------------------
    def _run(self) -> None:
        assert self.uploader is not None
        while not self._stop.is_set():
            if self.breaker.allow() and self.pending:
                failures = self.uploader.stats.failures
                try:
                    self.uploader.drain(stop=self._stop)
                except Exception as e:  # e.g. a disk error in the journal: keep the thread, retry later
                    log.exception("journal upload stopped by an error; retrying")
                    self._failed(f"{type(e).__name__}: {e}")
                    self._stop.wait(self.settings.upload_retry_s)
                    continue
                if self.uploader.stats.failures > failures:
                    self._failed(self.uploader.stats.last_error)
                    self._stop.wait(self.settings.upload_retry_s)
                    continue
                self._last_error = ""
            self.breaker.wait_change(WAKE_S)

    def _failed(self, error: str) -> None:
        if error != self._last_error:  # once per distinct error, not once per retry
            self._last_error = error
            log.warning(
                "journal upload failed (%s); %d frames kept, retrying every %.0f s",
                error,
                self.pending,
                self.settings.upload_retry_s,
            )

    def _send(self, entries: list[Entry]) -> None:
        """One Upload per run of entries of the same node id (raises unless all were stored)."""
        assert self.client is not None
        for node_id, run in itertools.groupby(entries, key=lambda e: e.node_id):
            frames = [
                pb.IndexedFrame(
                    frame_id=e.frame_id,
                    captured_at=e.ts,
                    source=e.source,
                    labels=list(e.labels),
                    embedding=np.asarray(e.embedding, dtype="<f4").tobytes(),
                )
                for e in run
            ]
            req = pb.UploadRequest(node_id=node_id, bundle_id=self.bundle_id, frames=frames)
            try:
                resp = self.client.upload(req, self.settings.upload_timeout_s)
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT and "frames[" in (e.details() or ""):
                    # one frame the cloud will not store, named (the uploader splits the batch); a
                    # refusal of the call itself (its node id, say) would refuse every entry: kept
                    raise Refused(f"INVALID_ARGUMENT: {e.details()}") from None
                raise UploadFailed(f"{code.name if code else 'UNKNOWN'}: {e.details()}") from None
            if resp.stored + resp.duplicates < len(frames):
                raise ShortAck(f"the cloud counted {resp.stored + resp.duplicates} of {len(frames)} frames")
            self.duplicates += resp.duplicates


class UploadFailed(RuntimeError):
    """Upload did not return OK (the cloud is unreachable, its store is down, or search is off)."""

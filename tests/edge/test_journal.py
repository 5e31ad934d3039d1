"""edge_node.journal: the offline journal keeps frames in order across restarts, and the uploader
drains it oldest first, at its rate, keeping what the cloud did not acknowledge. The receiving side
here is a dict keyed like the cloud's store (bundle, node, frame); the real store is tested in
tests/cloud/."""

from __future__ import annotations

import numpy as np
import pytest

from edge_node.journal import Entry, Journal, JournalError, Refused, Uploader
from splitclip.constants import INDEX_MAX_LABELS, INDEX_MAX_TEXT_CHARS
from splitclip.storable import storable_text

BOOT = 1_764_662_400_000_000  # frame ids start at the clock in µs (edge_node.tickets.frame_ids)


def entry(i: int, bundle: str = "b-1", node: str = "cam-1") -> Entry:
    v = np.random.default_rng(i).standard_normal(8).astype(np.float32)
    return Entry(
        bundle,
        node,
        BOOT + i,
        1000.0 + i,
        f"cam/{i}.png",
        ("red circle", "blue square"),
        v / np.linalg.norm(v),
    )


def test_entries_come_back_oldest_first_with_every_field(tmp_path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    for i in (3, 1, 2):
        assert j.add(entry(i))
    same_time = Entry("b-1", "cam-1", BOOT - 5, 1002.0, "late", (), entry(0).embedding)
    assert j.add(same_time)
    got = j.oldest(10)
    # by capture time (a frame re-run locally may arrive after later ones), then arrival
    assert [e.frame_id - BOOT for e in got] == [1, 2, -5, 3]
    e, want = got[0], entry(1)
    assert (e.bundle_id, e.node_id, e.ts, e.source, e.labels) == (
        want.bundle_id,
        want.node_id,
        want.ts,
        want.source,
        want.labels,
    )
    assert np.array_equal(e.embedding, want.embedding) and e.embedding.dtype == np.float32
    j.close()


def test_a_frame_is_kept_once_and_survives_a_restart(tmp_path) -> None:
    path = tmp_path / "j.sqlite"
    j = Journal(path)
    assert j.add(entry(1)) and not j.add(entry(1))  # the same frame twice is one entry
    assert j.add(entry(1, bundle="b-2"))  # another bundle's frame 1 is another frame
    assert j.add(entry(1, node="cam-2"))  # ... and so is another node's
    j.close()
    j = Journal(path)  # the node restarted
    assert len(j) == 3 and j.pending("b-2") == 1
    j.ack(j.oldest(1))
    assert [(e.bundle_id, e.node_id) for e in j.oldest(10)] == [("b-2", "cam-1"), ("b-1", "cam-2")]
    assert [e.bundle_id for e in j.oldest(10, bundle_id="b-2")] == ["b-2"]
    j.close()


def test_a_journal_of_another_schema_version_is_refused(tmp_path) -> None:
    import sqlite3

    path = tmp_path / "j.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=7")
    db.close()
    with pytest.raises(JournalError, match="schema version 7"):
        Journal(path)


def test_labels_with_newlines_and_any_text_come_back_as_they_were(tmp_path) -> None:
    path = tmp_path / "j.sqlite"
    j = Journal(path)
    labels = ("a red\ntruck", "", 'ünïcode, "quoted"', "[not json]")
    j.add(Entry("b-1", "cam-1", BOOT, 1.0, "s", labels, entry(0).embedding))
    j.add(Entry("b-1", "cam-1", BOOT + 1, 2.0, "s", (), entry(0).embedding))
    j.close()
    j = Journal(path)
    assert [e.labels for e in j.oldest(2)] == [labels, ()]  # a newline in a prompt is not two labels
    j.close()


def test_a_journal_of_schema_version_1_is_refused_in_one_line(tmp_path) -> None:
    import sqlite3

    path = tmp_path / "j.sqlite"
    db = sqlite3.connect(path)  # a file written before labels were JSON (joined by newlines)
    db.execute("CREATE TABLE pending (seq INTEGER PRIMARY KEY, labels TEXT NOT NULL)")
    db.execute("INSERT INTO pending (labels) VALUES ('red circle\nblue square')")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    with pytest.raises(JournalError) as e:
        Journal(path)
    assert str(e.value) == f"journal {path} has schema version 1, this node reads 2"


def test_adds_and_pending_do_not_count_the_table_and_the_count_survives_a_restart(tmp_path) -> None:
    path = tmp_path / "j.sqlite"
    j = Journal(path)
    statements: list[str] = []
    j._db.set_trace_callback(statements.append)  # what SQLite runs on the delivery path
    for i in range(5):
        assert j.add(entry(i, bundle="b-1" if i < 3 else "b-2"))
    assert not j.add(entry(0))  # a duplicate is not counted
    assert (len(j), j.pending("b-1"), j.pending("b-2"), j.pending("b-9")) == (5, 3, 2, 0)
    assert not [q for q in statements if "count(" in q.lower()]  # O(1): no count(*) per add or metric
    first = j.oldest(2, bundle_id="b-1")
    j.ack(first)
    j.ack(first)  # acknowledged twice (a resend): forgotten once
    assert (len(j), j.pending("b-1"), j.pending("b-2")) == (3, 1, 2)
    j.close()
    j = Journal(path)  # initialised from the file
    assert (len(j), j.pending("b-1"), j.pending("b-2")) == (3, 1, 2)
    j.close()


def test_entries_are_made_storable_before_they_are_journalled(tmp_path) -> None:
    """The cloud refuses a whole Upload for one frame with a long or NUL text or too many labels: such
    an entry in the journal would hold back every entry behind it forever."""
    j = Journal(tmp_path / "j.sqlite")
    path = "/mnt/" + "deep/" * 100 + "cam-7/frame-000123.png"  # 527 characters
    labels = ("a\0b", "x" * 500, *(f"label {i}" for i in range(40)), "never stored")
    j.add(Entry("b-1", "cam-1", BOOT, 1.0, path + "\0", labels, entry(0).embedding))
    j.add(Entry("b-1", "cam-1", BOOT + 1, 2.0, "cam/\udcff.png", ("ok",), entry(0).embedding))
    (e, odd) = j.oldest(2)
    assert len(e.source) == INDEX_MAX_TEXT_CHARS and e.source.startswith("…")
    assert path.endswith(e.source[1:]) and e.source.endswith("cam-7/frame-000123.png")  # the end kept
    assert len(e.labels) == INDEX_MAX_LABELS and e.labels[0] == "ab"  # the best 32, NUL removed
    assert e.labels[1] == "…" + "x" * (INDEX_MAX_TEXT_CHARS - 1) and e.labels[2:] == labels[2:32]
    assert odd.source == "cam/?.png"  # a lone surrogate (an undecodable file name) is not UTF-8
    j.close()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("", ""),
        ("cam/1.png", "cam/1.png"),
        ("\0\0", ""),
        ("é" * 300, "é" * 300),
        ("é" * 301, "…" + "é" * 299),
    ],
)
def test_storable_text(text: str, want: str) -> None:
    assert storable_text(text) == want


def test_a_full_journal_refuses_and_counts(tmp_path) -> None:
    j = Journal(tmp_path / "j.sqlite", max_entries=3)
    assert [j.add(entry(i)) for i in range(5)] == [True, True, True, False, False]
    assert len(j) == 3 and j.dropped == 2
    j.ack(j.oldest(1))  # room again for one
    assert [j.add(entry(i)) for i in range(5, 7)] == [True, False] and len(j) == 3 and j.dropped == 3
    j.close()


class Store:
    """Idempotent on (bundle, node, frame), like the cloud's store; can fail a number of sends or lose
    the acknowledgement of one (stored, but the node never hears it)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, int], Entry] = {}
        self.order: list[int] = []
        self.fail = 0
        self.lose_ack = 0
        self.refuse: set[int] = set()  # frame numbers (i of entry(i)) whose batch is refused whole
        self.calls = 0
        self.fail_calls: set[int] = set()  # these calls (1, 2, ...) fail as unavailable

    def send(self, batch: list[Entry]) -> None:
        self.calls += 1
        if self.fail or self.calls in self.fail_calls:
            self.fail = max(0, self.fail - 1)
            raise ConnectionError("cloud unavailable")
        for n, e in enumerate(batch):
            if e.frame_id - BOOT in self.refuse:  # like the cloud: one bad frame refuses the call
                raise Refused(f"INVALID_ARGUMENT: frames[{n}] (frame {e.frame_id}): labels: too many")
        for e in batch:
            if (e.bundle_id, e.node_id, e.frame_id) not in self.rows:
                self.rows[(e.bundle_id, e.node_id, e.frame_id)] = e
                self.order.append(e.frame_id - BOOT)
        if self.lose_ack:
            self.lose_ack -= 1
            raise TimeoutError("deadline exceeded")


def test_the_uploader_sends_oldest_first_in_batches_and_stops_at_a_failure(tmp_path) -> None:
    j, store = Journal(tmp_path / "j.sqlite"), Store()
    for i in range(10):
        j.add(entry(i))
    up = Uploader(j, store.send, batch=4, rate_per_s=1e9)
    store.fail = 1
    assert up.drain() == 0 and len(j) == 10 and up.stats.failures == 1
    assert "cloud unavailable" in up.stats.last_error
    assert up.drain() == 10 and len(j) == 0
    assert store.order == list(range(10))
    assert [n for _, n in up.stats.log] == [4, 4, 2]
    j.close()


def test_a_lost_acknowledgement_resends_and_the_store_still_has_each_frame_once(tmp_path) -> None:
    j, store = Journal(tmp_path / "j.sqlite"), Store()
    for i in range(6):
        j.add(entry(i))
    up = Uploader(j, store.send, batch=3, rate_per_s=1e9)
    store.lose_ack = 1
    assert up.drain() == 0 and len(j) == 6  # stored, but the node cannot know: it keeps them
    assert up.drain() == 6 and len(j) == 0
    assert sorted(store.order) == list(range(6))  # each once


def test_a_refused_batch_is_resent_one_by_one_and_the_refused_entry_dropped(tmp_path, caplog) -> None:
    j, store = Journal(tmp_path / "j.sqlite"), Store()
    for i in range(10):
        j.add(entry(i))
    store.refuse = {5, 6}
    up = Uploader(j, store.send, batch=4, rate_per_s=1e9)
    assert up.drain() == 8 and len(j) == 0  # nothing left to block the journal
    assert store.order == [0, 1, 2, 3, 4, 7, 8, 9]  # those behind the refused ones too, in order
    assert (up.stats.rejected, up.stats.failures, up.stats.sent) == (2, 0, 8)
    assert store.calls == 1 + (1 + 4) + 1  # batch 1; batch 2 refused, then each alone; batch 3
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and f"refused frame {BOOT + 5} of node cam-1" in warned[0]
    assert f"frames[0] (frame {BOOT + 5}): labels: too many" in warned[0]  # the cloud's message, alone
    j.close()


def test_a_refused_single_entry_is_dropped_and_a_failure_while_splitting_keeps_the_rest(tmp_path) -> None:
    j, store = Journal(tmp_path / "j.sqlite"), Store()
    for i in range(4):
        j.add(entry(i))
    store.refuse, store.fail_calls = {0, 2}, {4}  # batch 1 alone: dropped; batch 2 refused, then down
    up = Uploader(j, store.send, batch=1, rate_per_s=1e9)
    assert up.drain(max_batches=1) == 0 and (up.stats.rejected, store.calls, len(j)) == (1, 1, 3)
    up.batch = 3
    assert up.drain() == 1 and up.stats.failures == 1  # frame 1 stored alone, then the cloud went away
    assert "cloud unavailable" in up.stats.last_error and [e.frame_id - BOOT for e in j.oldest(9)] == [2, 3]
    assert up.drain() == 1 and up.stats.rejected == 2 and len(j) == 0  # refused alone in the next drain
    assert store.order == [1, 3]
    j.close()


def test_the_rate_limit_spaces_batches_by_their_share_of_time(tmp_path) -> None:
    j, store = Journal(tmp_path / "j.sqlite"), Store()
    for i in range(100):
        j.add(entry(i))
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    up = Uploader(j, store.send, batch=10, rate_per_s=50.0, clock=lambda: now[0], sleep=sleep)
    assert up.drain() == 100
    assert slept == pytest.approx([0.2] * 9)  # 10 entries at 50/s; no wait after the last batch
    assert up.drain(max_batches=1) == 0
    j.add(entry(100))
    assert up.drain() == 1 and slept[-1] == pytest.approx(0.2)  # the pause holds across drains too


def test_only_the_given_bundle_is_uploaded_and_a_stop_ends_a_drain(tmp_path) -> None:
    import threading

    j, store = Journal(tmp_path / "j.sqlite"), Store()
    for i in range(6):
        j.add(entry(i, bundle="b-1" if i % 2 else "b-old"))
    stop = threading.Event()
    up = Uploader(j, store.send, batch=1, rate_per_s=1e9, bundle_id="b-1")
    assert up.drain(max_batches=2) == 2
    stop.set()
    assert up.drain(stop=stop) == 0
    assert up.drain() == 1 and store.order == [1, 3, 5]
    assert j.pending() == 3 and j.pending("b-old") == 3


def test_bad_uploader_settings_are_refused(tmp_path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    with pytest.raises(ValueError, match="batch must be"):
        Uploader(j, lambda b: None, batch=0)
    with pytest.raises(ValueError, match="rate_per_s"):
        Uploader(j, lambda b: None, rate_per_s=0)


def test_the_upload_log_keeps_only_the_last_batches(tmp_path) -> None:
    from edge_node.journal import LOG_BATCHES

    j, store = Journal(tmp_path / "j.sqlite"), Store()
    for i in range(LOG_BATCHES + 10):
        j.add(entry(i))
    up = Uploader(j, store.send, batch=1, rate_per_s=1e9)
    assert up.drain() == LOG_BATCHES + 10 and up.stats.batches == LOG_BATCHES + 10
    assert len(up.stats.log) == LOG_BATCHES  # bounded: one entry per batch forever would grow for months
    assert [n for _, n in up.stats.log] == [1] * LOG_BATCHES
    j.close()


def test_the_count_recovers_when_another_process_wrote_the_file(tmp_path) -> None:
    """One writer per file is the rule (a journal per node id and bundle); a second one sharing a
    SPLITCLIP_JOURNAL must not leave the upload thread with a broken count."""
    path = tmp_path / "j.sqlite"
    a, b = Journal(path), Journal(path)
    assert b.add(entry(1))  # a did not see it
    a.ack(a.oldest(5))  # ... but deletes it
    assert len(a) == 0 and a.pending("b-1") == 0
    a.close()
    b.close()

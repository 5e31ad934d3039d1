"""A ticket's answers: split results name the labels as the caller gave them, by the cloud's index."""

from __future__ import annotations

import queue

from edge_node.tickets import NodeStats, Ticket
from splitclip.prompts import prompt_set
from splitclip.wire import pb


def test_split_results_name_labels_as_given_whatever_the_cloud_echoes() -> None:
    labels = ["  Red   circle ", "a BLUE\tsquare"]
    t = Ticket(1, "img", prompt_set(labels), queue.SimpleQueue())
    res = pb.Result(
        frame_id=1,
        top=[
            pb.Label(index=1, prompt="a BLUE square", probability=0.7),
            pb.Label(index=0, prompt="Red circle"),
        ],
        probabilities=[0.3, 0.7],
    )
    r = t.split_result(res, cut=1, codec="int8")
    assert r.labels == ["a BLUE\tsquare", "  Red   circle "]
    assert (r.mode, r.reason, r.cut, r.codec) == ("split", "cloud", 1, "int8")
    stats = NodeStats()
    stats.count(r)
    stats.count(t.error_result(ValueError("bad")))
    assert (stats.frames, stats.split, stats.errors, dict(stats.by_reason)) == (
        2,
        1,
        1,
        {"cloud": 1, "error": 1},
    )

"""`splitclip search` (edge_node/search_cli.py): its arguments (durations, ISO times, the errors), and
searches over real gRPC against tests/edge/refcloud.py's in-memory store, filled by an indexing node."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from edge_node import search_cli
from edge_node.node import EdgeNode
from splitclip.errors import UsageError
from tests.edge.conftest import PROMPTS
from tests.edge.refcloud import RefCloud

NOW = 1_764_662_400.0  # 2025-12-02T08:00:00Z


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="splitclip search")
    search_cli.build_parser(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(
    ("text", "ago"),
    [("90s", 90), ("30m", 1800), ("1h", 3600), ("1.5h", 5400), ("2d", 172800), ("1W", 604800)],
)
def test_durations_are_back_from_now(text: str, ago: float) -> None:
    assert search_cli.parse_when(text, now=NOW) == NOW - ago


def test_iso_times_with_an_offset_are_exact_and_without_one_local() -> None:
    assert search_cli.parse_when("2025-12-02T08:00:00+00:00", now=0) == NOW
    assert search_cli.parse_when("2025-12-02T09:00+01:00", now=0) == NOW
    local = datetime(2025, 12, 2, 8, 0).astimezone().timestamp()
    assert search_cli.parse_when("2025-12-02 08:00", now=0) == local
    assert search_cli.parse_when("2025-12-02", now=0) == datetime(2025, 12, 2).astimezone().timestamp()


@pytest.mark.parametrize("bad", ["yesterday", "1y", "-1h", "12:00pm", ""])
def test_bad_times_are_one_line_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError, match="--until .*expected a duration such as 30m"):
        search_cli.parse_when(bad, now=NOW, flag="--until")


def test_the_request_carries_every_filter() -> None:
    argv = ["a red truck", "--since", "1h", "--until", "2025-12-02T08:00:00+00:00"]
    req = search_cli.build_request(parse(*argv, "--node", "gate-3", "--node", "gate-4"), now=NOW + 60)
    assert (req.text, req.k, list(req.node_ids)) == ("a red truck", 10, ["gate-3", "gate-4"])
    assert (req.since, req.until, req.image, req.label) == (NOW + 60 - 3600, NOW, b"", "")
    req = search_cli.build_request(
        parse("truck", "--template", "a photo of a {}", "--label", "car", "-k", "3"), now=NOW
    )
    assert (list(req.templates), req.label, req.k, req.since, req.until) == (
        ["a photo of a {}"],
        "car",
        3,
        0,
        0,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "give a text query or --image"),
        (("truck", "--image", "x.png"), "give a text query or --image"),
        (("  ",), "the text query is empty"),
        (("truck", "-k", "0"), "-k must be in 1..1000"),
        (("truck", "-k", "1001"), "-k must be in 1..1000, got 1001"),  # SEARCH_MAX_K, the cloud's cap
        (("truck", "--template", "a photo"), "has no {} where the query goes"),
        (("truck", "--since", "1h", "--until", "2h"), "--since 1h is after --until 2h"),
        (("truck", "--since", "soon"), "--since 'soon': expected a duration"),
        (("--image", "missing.png"), "--image missing.png: no such file"),
        (("--image", "x.png", "--template", "a {}"), "--template applies to a text query"),
    ],
)
def test_unusable_arguments_are_usage_errors(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("{", r"\{").replace("}", r"\}")):
        search_cli.build_request(parse(*argv), now=NOW)


def test_a_file_that_is_not_an_image_is_refused_before_the_call(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(UsageError, match="not an image file"):
        search_cli.build_request(parse("--image", str(tmp_path / "notes.png")))


@pytest.fixture
def filled(bundle: Path, images, cloud: RefCloud, tmp_path: Path) -> list:
    """Two nodes' frames indexed by the cloud as it answered them (lossless, so an image's own
    embedding is what was stored)."""
    results = []
    for node_id in ("gate-3", "gate-4"):
        with EdgeNode(
            bundle,
            cloud=f"127.0.0.1:{cloud.port}",
            index=True,
            journal=tmp_path / f"{node_id}.sqlite",
            node_id=node_id,
            codec="lossless",
        ) as node:
            names = [f"{node_id}/{i}.png" for i in range(4)]
            results += list(
                node.classify_many(images[:4] if node_id == "gate-3" else images[4:8], PROMPTS, sources=names)
            )
    assert {r.mode for r in results} == {"split"} and len(cloud.stored()) == 8
    return results


def test_a_text_search_prints_the_table(cloud: RefCloud, filled, capsys, monkeypatch) -> None:
    monkeypatch.setenv("SPLITCLIP_CLOUD", f"127.0.0.1:{cloud.port}")
    assert search_cli.run(parse("red circle", "-k", "5", "--since", "1h")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["rank", "score", "node", "frame", "id", "time", "source", "labels"]
    rows = out[2:-1]
    assert len(rows) == 5 and out[-1].startswith("5 hits, bundle ")
    assert [r.split()[0] for r in rows] == ["1", "2", "3", "4", "5"]
    scores = [float(r.split()[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    by_id = {r.frame_id: r for r in filled}
    for row in rows:
        _, _, node, frame_id, when, source, *labels = row.split()
        r = by_id[int(frame_id)]
        assert source == r.source and node == source.split("/")[0]
        assert " ".join(labels) == ", ".join(r.labels)  # the frame's top labels, best first
        assert datetime.fromisoformat(when).tzinfo is not None  # local time, with its offset
    (req,) = cloud.searches
    assert req.text == "red circle" and req.since > 0


def test_json_and_the_node_filter(cloud: RefCloud, filled, capsys) -> None:
    addr = f"127.0.0.1:{cloud.port}"
    assert search_cli.run(parse("a photo of a dog", "--node", "gate-4", "--json", "--cloud", addr)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["hits"]) == 4 and {h["node_id"] for h in doc["hits"]} == {"gate-4"}
    h = doc["hits"][0]
    assert set(h) == {"rank", "score", "node_id", "frame_id", "captured_at", "time", "source", "labels"}
    assert h["rank"] == 1 and h["source"].startswith("gate-4/") and len(h["labels"]) == 4
    assert search_cli.run(parse("dog", "--node", "gate-9", "--json", "--cloud", addr)) == 0
    assert json.loads(capsys.readouterr().out)["hits"] == []


def test_an_image_search_finds_that_image_first(
    cloud: RefCloud, filled, images, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "query.png"
    Image.fromarray(images[5]).save(path)
    assert (
        search_cli.run(parse("--image", str(path), "-k", "3", "--json", "--cloud", f"127.0.0.1:{cloud.port}"))
        == 0
    )
    first = json.loads(capsys.readouterr().out)["hits"][0]
    assert (first["node_id"], first["source"]) == ("gate-4", "gate-4/1.png")  # images[5] is gate-4's second
    assert first["score"] > 0.999
    assert cloud.searches[-1].image == path.read_bytes()


def test_failed_calls_are_one_line_errors(bundle: Path, cloud: RefCloud, monkeypatch) -> None:
    off = RefCloud(bundle, search_on=False, token="s3cret")
    off.start()
    try:
        monkeypatch.setenv("SPLITCLIP_NODE_TOKEN", "s3cret")
        with pytest.raises(search_cli.SearchError, match="^search: search is off on this cloud$"):
            search_cli.run(parse("truck", "--cloud", f"127.0.0.1:{off.port}"))
        monkeypatch.setenv("SPLITCLIP_NODE_TOKEN", "wrong")
        with pytest.raises(search_cli.SearchError, match="refused the node token"):
            search_cli.run(parse("truck", "--cloud", f"127.0.0.1:{off.port}"))
    finally:
        off.stop()
    with pytest.raises(search_cli.SearchError, match=f"cannot reach the cloud at 127.0.0.1:{off.port}"):
        search_cli.run(parse("truck", "--cloud", f"127.0.0.1:{off.port}", "--timeout", "2"))
    with pytest.raises(UsageError, match="no cloud to search"):
        search_cli.run(parse("truck"))


def test_a_store_that_is_down_is_not_an_unreachable_cloud(cloud: RefCloud) -> None:
    cloud.faults.store_down = "connection refused"
    addr = f"127.0.0.1:{cloud.port}"
    with pytest.raises(search_cli.SearchError) as e:
        search_cli.run(parse("truck", "--cloud", addr))
    assert str(e.value) == (
        f"the cloud at {addr} answered, but the search store is unavailable, try again later "
        "(connection refused)"
    )


def test_main_prints_the_error_in_one_line(capsys) -> None:
    assert search_cli.main(["truck", "--since", "later"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --since 'later'") and err.count("\n") == 1

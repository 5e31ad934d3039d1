"""edge_node.watch: every image dropped into the inbox is answered once, then moved out of it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from PIL import Image

from edge_node.node import EdgeNode
from edge_node.watch import watch


def test_watch_answers_each_image_once(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    inbox, done, out = tmp_path / "inbox", tmp_path / "done", tmp_path / "results.jsonl"
    inbox.mkdir()
    done.mkdir()
    stop = threading.Event()
    with EdgeNode(tiny_bundle_dir) as node:
        t = threading.Thread(
            target=watch,
            args=(node, inbox, ["red", "blue"], out),
            kwargs={"done": done, "interval": 0.05, "stop": stop},
        )
        t.start()
        try:
            for i in range(5):
                Image.new("RGB", (40, 40), (40 * i, 0, 0)).save(inbox / f"{i}.png")
                time.sleep(0.02)
            (inbox / "notes.txt").write_text("not an image")
            deadline = time.monotonic() + 30
            while len(list(done.glob("*.png"))) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            t.join(10)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["source"]).name for r in lines) == [f"{i}.png" for i in range(5)]
    assert all(r["mode"] == "local" for r in lines)
    assert not list(inbox.glob("*.png")) and (inbox / "notes.txt").exists()

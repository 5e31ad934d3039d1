"""`splitclip edge classify` without a cloud: JSONL output, summary table, labels file, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from edge_node.cli import main


def test_classify_local_only_writes_jsonl_and_a_table(bundle: Path, images, tmp_path: Path, capsys) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    for i, im in enumerate(images[:3]):
        Image.fromarray(im).save(d / f"{i}.png")
    labels = tmp_path / "labels.txt"
    labels.write_text("# comment\nred circle\nblue square\n\na photo of a cat\n")
    out = tmp_path / "r.jsonl"
    rc = main([str(d), "--labels", str(labels), "--bundle", str(bundle), "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert (
        len(rows) == 3
        and {r["mode"] for r in rows} == {"local"}
        and {r["reason"] for r in rows} == {"no_cloud"}
    )
    assert all(r["labels"][0] in ("red circle", "blue square", "a photo of a cat") for r in rows)
    np.testing.assert_allclose([sum(r["probabilities"]) for r in rows], 1.0, atol=1e-5)
    table = capsys.readouterr().out
    assert "top label" in table and "3 images: 0 split, 3 local" in table


def test_usage_errors_exit_2(bundle: Path, tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "none.png"), "--prompt", "x", "--bundle", str(tmp_path / "missing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--prompt", "x", "--bundle", str(bundle)]) == 2
    assert "no images" in capsys.readouterr().err

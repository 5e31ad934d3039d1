"""`splitclip edge classify` without a cloud: JSONL output, summary table, labels file, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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
        and {r["plan"] for r in rows} == {"local"}  # the plan that answered it
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


def splitclip(capsys, *argv: str) -> tuple[int, str]:
    """`splitclip edge classify ...` through the real entry point; (exit code, stderr)."""
    from splitclip.cli import main as splitclip_main

    rc = splitclip_main(["edge", "classify", *argv])
    return rc, capsys.readouterr().err


def one_line_error(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def some_images(d: Path, images, n: int = 2) -> list[Path]:
    d.mkdir(exist_ok=True)
    paths = []
    for i, im in enumerate(images[:n]):
        Image.fromarray(im).save(p := d / f"{i}.png")
        paths.append(p)
    return paths


def test_a_missing_label_file_is_one_line(bundle: Path, images, tmp_path: Path, capsys) -> None:
    imgs = some_images(tmp_path / "imgs", images)
    rc, err = splitclip(capsys, str(imgs[0]), "--labels", str(tmp_path / "nope.txt"), "--bundle", str(bundle))
    assert rc == 2
    one_line_error(err, "nope.txt", "does not exist")


def test_an_empty_label_file_says_it_is_empty(bundle: Path, images, tmp_path: Path, capsys) -> None:
    imgs = some_images(tmp_path / "imgs", images)
    labels = tmp_path / "labels.txt"
    labels.write_text("# only a comment\n\n   \n")
    rc, err = splitclip(capsys, str(imgs[0]), "--labels", str(labels), "--bundle", str(bundle))
    assert rc == 2
    one_line_error(err, "labels.txt", "empty")


def test_out_under_an_existing_file_is_one_line(bundle: Path, images, tmp_path: Path, capsys) -> None:
    imgs = some_images(tmp_path / "imgs", images)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "r.jsonl"
    rc, err = splitclip(capsys, str(imgs[0]), "--prompt", "x", "--bundle", str(bundle), "--out", str(out))
    assert rc == 2
    one_line_error(err, "is a file")


@pytest.mark.parametrize(("template", "words"), [("a photo", ["{}"]), ("a {} of {x}", ["brace"])])
def test_bad_templates_are_one_line(bundle: Path, images, tmp_path: Path, capsys, template, words) -> None:
    imgs = some_images(tmp_path / "imgs", images)
    rc, err = splitclip(
        capsys, str(imgs[0]), "--prompt", "cat", "--template", template, "--bundle", str(bundle)
    )
    assert rc == 2
    one_line_error(err, "templates[0]", *words)


def test_templates_apply_and_repeat(bundle: Path, images, tmp_path: Path, capsys) -> None:
    from edge_node.node import EdgeNode

    imgs = some_images(tmp_path / "imgs", images, 1)
    out = tmp_path / "r.jsonl"
    labels = ["  Red   circle ", "a BLUE\tsquare"]
    templates = ["a photo of a {}", "a drawing of a {}"]
    argv = [str(imgs[0]), "--bundle", str(bundle), "--out", str(out), "--quiet"]
    argv += [a for lab in labels for a in ("--prompt", lab)]
    argv += [a for t in templates for a in ("--template", t)]
    assert main(argv) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    with EdgeNode(bundle) as node:
        want = node.classify(str(imgs[0]), labels, templates=templates)
        plain = node.classify(str(imgs[0]), labels)
    np.testing.assert_allclose(row["probabilities"], want.probabilities, atol=1e-6)
    assert not np.allclose(row["probabilities"], plain.probabilities, atol=1e-6)  # the templates mattered


def test_bad_images_get_error_lines_and_the_others_are_answered(
    bundle: Path, images, tmp_path: Path, capsys
) -> None:
    d = tmp_path / "imgs"
    good = some_images(d, images, 2)
    corrupt = d / "corrupt.png"
    corrupt.write_bytes(good[0].read_bytes()[:40])  # a PNG cut short
    text = d / "notes.png"
    text.write_text("not an image at all\n")
    missing = d / "missing.png"
    out = tmp_path / "r.jsonl"
    paths = [str(good[0]), str(corrupt), str(text), str(missing), str(good[1])]
    rc, err = splitclip(capsys, *paths, "--prompt", "red circle", "--prompt", "blue square",
                        "--bundle", str(bundle), "--out", str(out))  # fmt: skip
    assert rc == 1
    rows = {Path(r["source"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"0.png", "1.png", "corrupt.png", "notes.png", "missing.png"}
    for name in ("0.png", "1.png"):
        assert rows[name]["error"] is None and rows[name]["labels"], rows[name]
    for name in ("corrupt.png", "notes.png", "missing.png"):
        assert rows[name]["error"] and rows[name]["reason"] == "error", rows[name]
        assert sum(line.startswith("error: ") and name in line for line in err.splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "auto", "cut", "codec"),
    [
        ((), True, None, "int8-zstd"),  # a cloud and nothing asked for: the planner
        (("--cut", "auto"), True, None, "int8-zstd"),
        (("--codec", "fp16"), False, None, "fp16"),  # a codec alone fixes the plan (cut L // 2)
        (("--cut", "1"), False, 1, "int8-zstd"),
        (("--cut", "1", "--codec", "fp16"), False, 1, "fp16"),
    ],
)
def test_the_commands_plan_follows_the_settings_rule(monkeypatch, flags, auto, cut, codec) -> None:
    import argparse

    from edge_node.cli import build_parser, node_settings

    for k in ("SPLITCLIP_CUT", "SPLITCLIP_CODEC", "SPLITCLIP_CLOUD"):
        monkeypatch.delenv(k, raising=False)
    ap = argparse.ArgumentParser()
    build_parser(ap)
    s = node_settings(ap.parse_args(["x.png", "--prompt", "a", "--cloud", "cloud:9000", *flags]))
    assert (s.auto, s.cut, s.codec) == (auto, cut, codec)

"""Int8 edge stages: written by `partition --edge-int8`, listed and verified, measured in the table, run by the tower."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from partitioner.agreement import int8_plans, plans
from splitclip.agreement import AGREEMENT_FILE
from splitclip.bundle import (
    BundleError,
    block_file,
    int8_file,
    load_bundle,
    seal,
)
from splitclip.cli import main
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower

# int8 edge + fp32 cloud vs the unsplit fp32 model, demo bundle, zero-shot over the 48 demo labels on
# the table's 200 synthetic measurement images, lossless wire, batch 1 as on the edge: measured
# 98.5 / 98.0 / 99.0 / 98.5 % at cuts 1 / 2 / 3 / 4 (= L, fp32 head); asserted with a margin
DEMO_FLOOR = 0.97


def test_int8_stages_are_listed_and_verified(tiny_int8_bundle_dir: Path) -> None:
    b = load_bundle(tiny_int8_bundle_dir)
    m = b.manifest
    want = [int8_file(block_file(i)) for i in range(m.num_blocks)]
    assert m.int8_files() == want and m.has_int8
    assert all(name in m.files and (b.root / name).is_file() for name in want)
    # the embed and the head stay fp32 (partitioner/quantize.py says why)
    assert m.stage_file("vision/embed.onnx", "int8") == "vision/embed.onnx"
    assert m.stage_file("vision/head.onnx", "int8") == "vision/head.onnx"
    assert m.stage_file(block_file(1), "int8") == "vision/int8/block_01.onnx"
    assert m.stage_file(block_file(1)) == block_file(1)
    assert (b.root / want[0]).stat().st_size < (b.root / block_file(0)).stat().st_size / 2


def test_a_bundle_without_int8_stages(tiny_bundle_dir: Path) -> None:
    rt = BundleRuntime(tiny_bundle_dir)
    assert not rt.has_int8 and rt.manifest.int8_files() == []
    with pytest.raises(ValueError, match="no int8 edge stages"):
        Tower(rt, edge="int8")
    with pytest.raises(BundleError, match="--edge-int8"):
        rt.manifest.stage_file(block_file(0), "int8")
    t = rt.bundle.agreement()
    assert t is not None and {r.edge for r in t.rows} == {"fp32"}


def test_a_tampered_int8_stage_fails_to_load(tiny_int8_bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(tiny_int8_bundle_dir, copy)
    with (copy / int8_file(block_file(1))).open("r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="bundle file vision/int8/block_01.onnx is tampered"):
        load_bundle(copy)


def test_a_manifest_listing_only_some_int8_blocks_is_refused(
    tiny_int8_bundle_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "b"
    shutil.copytree(tiny_int8_bundle_dir, copy)
    d = json.loads((copy / "manifest.json").read_text())
    del d["files"][int8_file(block_file(2))]
    (copy / "manifest.json").write_text(json.dumps(seal(d)))
    with pytest.raises(BundleError, match="lists int8 edge stages but not vision/int8/block_02.onnx"):
        load_bundle(copy)


def test_int8_edge_tensors_have_the_fp32_shape(tiny_int8_bundle_dir: Path) -> None:
    rt = BundleRuntime(tiny_int8_bundle_dir)
    fp32, int8 = Tower(rt), Tower(rt, edge="int8")
    rng = np.random.default_rng(1)
    pixels = fp32.model_input([(rng.random((40, 40, 3)) * 255).astype(np.uint8) for _ in range(4)])
    ref = fp32.embed_images(list(pixels))
    for k in range(1, rt.num_blocks + 1):
        a, q = fp32.at_cut(pixels, k), int8.at_cut(pixels, k)
        assert a.shape == q.shape and a.dtype == q.dtype == np.float32
        assert not np.array_equal(a, q)  # the int8 stages really ran
        emb = int8.finish(q, k)  # the cloud's fp32 stages[k:L]
        assert np.all(np.sum(emb * ref, -1) > 0.97), k
    assert np.array_equal(int8.at_cut(pixels, 0), pixels)


def test_the_table_has_int8_rows_for_every_plan_at_cut_1_and_up(tiny_int8_bundle_dir: Path) -> None:
    b = load_bundle(tiny_int8_bundle_dir)
    t = b.agreement()
    assert t is not None
    L = b.manifest.num_blocks
    fp32 = [(r.cut, r.preset) for r in t.rows if r.edge == "fp32"]
    int8 = [(r.cut, r.preset) for r in t.rows if r.edge == "int8"]
    assert fp32 == plans(L, calibrated=True)
    assert int8 == int8_plans(L, calibrated=True) == [p for p in fp32 if p[0] >= 1]
    for r in t.rows:
        assert 0.0 <= r.agreement <= 1.0 and r.bytes > 0
    lossless = {r.cut: r for r in t.rows if r.edge == "int8" and r.preset == "lossless"}
    assert all(r.cosine > 0.97 for r in lossless.values()), lossless


def test_bundle_info_shows_the_int8_rows(
    tiny_int8_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = load_bundle(tiny_int8_bundle_dir).agreement()
    assert t is not None
    assert main(["bundle", "info", str(tiny_int8_bundle_dir)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("  fp32 ", "  int8 "))]
    assert len(rows) == len(t.rows) and sum(r[0] == "int8" for r in rows) == len(int8_plans(3, True))
    assert "vision/int8/block_00.onnx" in out and AGREEMENT_FILE in out


def test_int8_is_opt_in(tiny_bundle_dir: Path) -> None:
    assert not any(name.startswith("vision/int8/") for name in load_bundle(tiny_bundle_dir).manifest.files)


def test_demo_int8_edge_agrees_with_the_unsplit_model(demo_bundle_dir: Path, tmp_path: Path) -> None:
    """int8 edge + fp32 cloud at every cut >= 1 vs the unsplit fp32 model on the demo bundle (lossless wire)."""
    from partitioner.agreement import SEED, synthetic_measurement_images
    from partitioner.quantize import write_int8_stages
    from splitclip.bundle import write_manifest

    copy = tmp_path / "demo8"
    shutil.copytree(demo_bundle_dir, copy)
    m = load_bundle(copy).manifest
    write_int8_stages(copy, m.num_blocks)
    body = json.loads((copy / "manifest.json").read_text())
    write_manifest(
        copy, {k: v for k, v in body.items() if k not in ("bundle_id", "content_sha256", "files", "format")}
    )
    rt = BundleRuntime(copy)
    assert rt.has_int8
    fp32, int8 = Tower(rt), Tower(rt, edge="int8")
    from splitclip.classify import read_labels

    text = rt.encode_text(read_labels(Path(__file__).resolve().parents[2] / "models" / "demo-labels.txt"))
    pixels = fp32.model_input(synthetic_measurement_images(200, m.vision.image_size, SEED))
    ref = (fp32.finish(pixels, 0) @ text.T).argmax(-1)
    rates = {}
    for k in range(1, m.num_blocks + 1):
        wire = np.concatenate([int8.at_cut(pixels[i : i + 1], k) for i in range(len(pixels))])  # batch 1
        rates[k] = float(((int8.finish(wire, k) @ text.T).argmax(-1) == ref).mean())
    print("int8 edge agreement per cut:", rates)
    assert all(r >= DEMO_FLOOR for r in rates.values()), rates

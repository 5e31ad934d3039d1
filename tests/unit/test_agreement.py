"""The measured agreement table: written by the partitioner, covered by the bundle id, shown by `bundle info`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from partitioner.agreement import plans
from splitclip.agreement import AGREEMENT_FILE, AgreementTable
from splitclip.bundle import BundleError, load_bundle
from splitclip.cli import main
from splitclip.codec import IMAGE_PRESETS, PRESETS


def _table(bundle_dir: Path) -> AgreementTable:
    t = load_bundle(bundle_dir).agreement()
    assert t is not None, f"{bundle_dir} has no {AGREEMENT_FILE}"
    return t


def test_the_table_is_in_the_bundle_and_covers_every_plan(tiny_bundle_dir: Path) -> None:
    b = load_bundle(tiny_bundle_dir)
    assert AGREEMENT_FILE in b.manifest.files  # hashed like every file: part of the bundle id
    t = _table(tiny_bundle_dir)
    L = b.manifest.num_blocks
    assert [(r.cut, r.preset) for r in t.rows] == plans(L, calibrated=True)
    assert {r.preset for r in t.rows if r.cut == 0} == {"lossless", *IMAGE_PRESETS}
    assert {r.preset for r in t.rows if 0 < r.cut < L} == set(PRESETS)
    assert {r.preset for r in t.rows if r.cut == L} == {"lossless", "fp16"}
    assert t.images == 64 and "nearest-neighbour retrieval" in t.measure  # the tiny model has no labels
    for r in t.rows:
        assert (
            0.0 <= r.agreement <= 1.0 and -1.0 <= r.cosine <= 1.0 + 1e-6 and r.bytes > 0 and r.edge == "fp32"
        )
        if r.preset in ("lossless", "png", "webp-lossless"):
            assert r.agreement == 1.0 and r.cosine == pytest.approx(1.0, abs=1e-5), r
    cut1 = {r.preset: r for r in t.rows if r.cut == 1}
    assert cut1["int8"].bytes < cut1["fp16"].bytes < cut1["lossless"].bytes


def test_editing_the_table_breaks_the_bundle(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle_dir, copy)
    d = json.loads((copy / AGREEMENT_FILE).read_text())
    d["rows"][1]["agreement"] = 1.0  # a planner would now allow jpeg420-q75
    (copy / AGREEMENT_FILE).write_text(json.dumps(d))
    with pytest.raises(BundleError, match=f"bundle file {AGREEMENT_FILE} is tampered"):
        load_bundle(copy)
    (copy / AGREEMENT_FILE).unlink()
    with pytest.raises(BundleError, match=f"bundle file {AGREEMENT_FILE} is missing"):
        load_bundle(copy)


def test_no_table_when_asked_for_none(tiny_clip_dir: Path, tmp_path: Path) -> None:
    from partitioner.export import partition

    m = partition(tiny_clip_dir, tmp_path / "b", calibration_images=0, agreement_images=0, progress=False)
    assert AGREEMENT_FILE not in m.files and load_bundle(tmp_path / "b").agreement() is None


def test_labels_and_the_users_images(tiny_clip_dir: Path, tmp_path: Path) -> None:
    """Zero-shot over --agreement-labels; with --calibration-images the table uses the images after the
    calibration's (none of the PCA's own)."""
    from partitioner.export import partition

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((40, 40), Image.Resampling.BICUBIC).save(photos / f"{i:02d}.png")
    labels = tmp_path / "labels.txt"
    labels.write_text("# colours\na red thing\na green thing\na blue thing\n")
    partition(
        tiny_clip_dir,
        tmp_path / "b",
        calibration_images=12,
        calibration_dir=photos,
        agreement_images=50,
        agreement_labels=labels,
        progress=False,
    )
    t = _table(tmp_path / "b")
    assert (
        t.images == 8 and "zero-shot top-1 over 3 labels" in t.measure and "after the first 12" in t.measure
    )


def test_bundle_info_prints_the_table(tiny_bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = load_bundle(tiny_bundle_dir)
    assert main(["bundle", "info", str(tiny_bundle_dir)]) == 0
    out = capsys.readouterr().out
    assert b.id in out and "3 blocks" in out and "width 64" in out and "17 tokens" in out
    assert "embed dim 32" in out and "calibration: PCA bases at cuts 1, 2" in out
    assert "vision/block_02.onnx" in out and AGREEMENT_FILE in out
    t = _table(tiny_bundle_dir)
    under = [r for r in t.rows if r.agreement < 0.99]
    assert f"{len(t.rows)} plans; {len(under)} under the floor 99.0%" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  fp32 ")]
    assert len(rows) == len(t.rows) and sum(r[-1] == "<" for r in rows) == len(under)
    cuts = [int(r[1]) for r in rows]
    assert cuts == sorted(cuts)  # by cut, then bytes
    assert main(["bundle", "info", str(tiny_bundle_dir), "--floor", "0"]) == 0
    assert "0 under the floor" in capsys.readouterr().out
    assert main(["bundle", "info", str(tiny_bundle_dir), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["bundle_id"] == b.id and d["calibration_cuts"] == [1, 2] and d["vision"]["num_tokens"] == 17
    assert len(d["agreement"]["rows"]) == len(t.rows) and d["files"][AGREEMENT_FILE] > 0


def test_bundle_info_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bundle", "info", str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: bundle directory {tmp_path / 'nope'} does not exist"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text("{")
    assert main(["bundle", "info", str(tmp_path / "b")]) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_demo_bundle_agreement(demo_bundle_dir: Path) -> None:
    """What the planner's floor relies on: on the demo model only lossless image uploads reach 99 %, and
    a cut-2 KLT preset does too, with fewer bytes than any of them."""
    t = _table(demo_bundle_dir)
    assert "zero-shot top-1 over 48 labels" in t.measure and t.images >= 100
    row = {(r.cut, r.preset): r for r in t.rows}
    for name in ("lossless", "png", "webp-lossless"):
        assert row[0, name].agreement == 1.0
    assert row[0, "jpeg420-q90"].agreement < 0.99
    assert all(
        r.agreement < 0.99 for r in t.rows if r.cut == 0 and not r.preset.endswith(("lossless", "png"))
    )
    klt2 = [r for r in t.rows if r.cut == 2 and r.preset.startswith("klt-") and r.agreement >= 0.99]
    assert klt2, [r for r in t.rows if r.cut == 2]
    cheapest_image = min(row[0, n].bytes for n in ("lossless", "png", "webp-lossless"))
    assert min(r.bytes for r in klt2) < cheapest_image / 2


def test_the_demo_checkpoint_carries_its_labels() -> None:
    """partition reads labels.txt beside the checkpoint: the 48 demo prompts, as in models/demo-labels.txt."""
    models = Path(__file__).resolve().parents[2] / "models"
    assert (models / "demo-clip" / "labels.txt").read_text() == (models / "demo-labels.txt").read_text()


def test_the_same_checkpoint_gives_the_same_bundle_id_with_a_table(
    tiny_clip_dir: Path, tmp_path: Path
) -> None:
    """The table is part of the id, so it must not carry float noise (cosines are rounded)."""
    from partitioner.export import partition

    ids = [
        partition(
            tiny_clip_dir, tmp_path / f"b{i}", calibration_images=8, agreement_images=16, progress=False
        ).bundle_id
        for i in range(2)
    ]
    assert ids[0] == ids[1]

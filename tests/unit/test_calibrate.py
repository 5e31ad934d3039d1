"""partitioner.calibrate: the codec calibration is fitted on the user's images when given, else on
synthetic shapes with a warning for any model that is not the demo."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from partitioner.calibrate import CalibrationImagesError, images_in
from partitioner.export import partition
from splitclip.bundle import load_bundle
from splitclip.cli import main


def photos(directory: Path, n: int, seed: int = 0) -> Path:
    """Smooth random colour fields: nothing like the synthetic shapes."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((40, 40), Image.Resampling.BICUBIC).save(directory / f"{i:02d}.png")
    return directory


def test_the_users_images_give_another_calibration(tiny_clip_dir: Path, tmp_path: Path, caplog) -> None:
    mine = photos(tmp_path / "mine", 12)
    with caplog.at_level(logging.WARNING, logger="splitclip.partition"):
        partition(
            tiny_clip_dir,
            tmp_path / "mine-bundle",
            calibration_images=12,
            calibration_dir=mine,
            progress=False,
        )
    assert not [r for r in caplog.records if "synthetic shapes" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="splitclip.partition"):
        partition(tiny_clip_dir, tmp_path / "synth-bundle", calibration_images=12, progress=False)
    assert [r for r in caplog.records if "synthetic shapes" in r.getMessage()]  # not the demo: warned
    a = load_bundle(tmp_path / "mine-bundle").calibration()
    b = load_bundle(tmp_path / "synth-bundle").calibration()
    assert a is not None and b is not None and a.cuts == b.cuts
    assert not np.allclose(a.means[1], b.means[1], atol=1e-3)


def test_the_demo_checkpoint_is_not_warned_about(tiny_clip_dir: Path, tmp_path: Path, caplog) -> None:
    demo_like = tmp_path / "demo-like"
    shutil.copytree(tiny_clip_dir, demo_like)
    (demo_like / "training.json").write_text("{}\n")  # what `splitclip train-demo` leaves beside its model
    with caplog.at_level(logging.WARNING, logger="splitclip.partition"):
        partition(demo_like, tmp_path / "b", calibration_images=4, progress=False)
    assert not [r for r in caplog.records if "synthetic shapes" in r.getMessage()]


def test_bad_calibration_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CalibrationImagesError, match="is not a directory"):
        images_in(tmp_path / "nope", 8)
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a.png")
    with pytest.raises(CalibrationImagesError, match="holds 1 image file"):
        images_in(tmp_path / "one", 8)
    (tmp_path / "one" / "b.png").write_text("not a png")
    with pytest.raises(CalibrationImagesError, match=r"b\.png is not a readable image"):
        images_in(tmp_path / "one", 8)
    argv = [
        "partition",
        str(tmp_path / "model"),
        "--out",
        str(tmp_path / "o"),
        "--calibration-images",
        str(tmp_path / "nope"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "Traceback" not in err

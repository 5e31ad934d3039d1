"""Fit the codec's per-cut PCA bases on activations of calibration images: the user's, or synthetic shapes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from partitioner.synthetic import synthetic_images
from splitclip.bundle import block_file
from splitclip.codec import fit_calibration
from splitclip.errors import SplitclipError
from splitclip.preprocess import ImageLike, PreprocessConfig, load_image, preprocess
from splitclip.runtime import make_session_options

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class CalibrationImagesError(SplitclipError, ValueError):
    """The --calibration-images directory is missing, empty or holds unreadable files."""


def images_in(directory: Path, limit: int) -> list[Image.Image]:
    """Up to `limit` images from `directory` (sorted by name, recursively)."""
    if not directory.is_dir():
        raise CalibrationImagesError(f"calibration images: {directory} is not a directory")
    paths = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < 2:
        raise CalibrationImagesError(
            f"calibration images: {directory} holds {len(paths)} image file(s) ({', '.join(IMAGE_SUFFIXES)}); "
            "at least 2 are needed, 64 or more recommended"
        )
    out = []
    for path in paths[:limit]:
        try:
            out.append(load_image(path))
        except (OSError, SyntaxError, ValueError) as e:
            raise CalibrationImagesError(
                f"calibration images: {path} is not a readable image ({e})"
            ) from None
    return out


def write_calibration(
    bundle_dir: Path,
    *,
    images: Sequence[ImageLike] | None = None,
    n_images: int = 64,
    seed: int = 1234,
    progress: bool = True,
) -> Path:
    """Run embed + blocks over the calibration images (default: `n_images` synthetic shapes) and fit a
    basis at every inner cut."""
    import onnxruntime as ort
    from tqdm import tqdm

    cfg = PreprocessConfig.from_dict(json.loads((bundle_dir / "preprocess.json").read_text()))
    if images is None:
        images = synthetic_images(n_images, seed=seed, image_size=cfg.crop_size)
    pixels = preprocess(list(images), cfg)  # [n, 3, H, W]
    opts = make_session_options()

    def run(name: str, x: np.ndarray) -> np.ndarray:
        s = ort.InferenceSession(str(bundle_dir / name), opts, providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: x})[0]

    blocks = sorted((bundle_dir / "vision").glob("block_*.onnx"))
    hidden = run("vision/embed.onnx", pixels)  # [n, tokens, width]
    acts: dict[int, np.ndarray] = {}
    for i in tqdm(range(len(blocks) - 1), desc="calibrating cuts", unit="cut", disable=not progress):
        hidden = run(block_file(i), hidden)
        acts[i + 1] = hidden.reshape(-1, hidden.shape[-1])  # [n * tokens, width] at cut i + 1
    path = bundle_dir / "calibration.npz"
    fit_calibration(acts).save(path)
    return path

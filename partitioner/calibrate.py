"""Fit the codec's per-cut PCA bases on activations of generated calibration images (calibration.npz)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from splitclip.bundle import block_file
from splitclip.calibration import fit_calibration
from splitclip.preprocess import PreprocessConfig, preprocess
from splitclip.runtime import make_session_options


def write_calibration(
    bundle_dir: Path, *, n_images: int = 64, seed: int = 1234, progress: bool = True
) -> Path:
    """Run embed + blocks over `n_images` procedural demo images and fit a basis at every inner cut."""
    import onnxruntime as ort
    from tqdm import tqdm

    from demo.data import make_split

    cfg = PreprocessConfig.from_dict(json.loads((bundle_dir / "preprocess.json").read_text()))
    images = [im for im, _, _ in make_split(n_images, seed=seed, split="train", image_size=cfg.crop_size)]
    pixels = preprocess(images, cfg)  # [n, 3, H, W]
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

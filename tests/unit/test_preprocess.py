"""splitclip.preprocess equals transformers' CLIPImageProcessor (max abs diff <= 1e-2)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from splitclip.preprocess import PreprocessConfig, load_image, preprocess, to_model_input

transformers = pytest.importorskip("transformers")

HF_CONFIG = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "do_convert_rgb": True,
}


def _image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth content plus noise, so resampling differences show up if the kernels disagree
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w, 1), yy * 255 / max(h, 1), (xx + yy) * 127 / max(w + h, 1)], -1)
    arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
        im = Image.fromarray(np.dstack([arr, alpha]), "RGBA")
    elif mode == "L":
        im = im.convert("L")
    return im


def _hf_processor(size: int):
    cfg = {**HF_CONFIG, "size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    return transformers.CLIPImageProcessor(**cfg), PreprocessConfig.from_hf(cfg)


@pytest.mark.parametrize(
    ("w", "h", "mode"),
    [(224, 224, "RGB"), (640, 480, "RGB"), (300, 800, "RGB"), (100, 60, "RGB"), (333, 333, "RGBA"),
     (500, 260, "L"), (64, 64, "RGB"), (1000, 50, "RGB")],
)  # fmt: skip
@pytest.mark.parametrize("size", [224, 64])
def test_matches_clip_image_processor(w: int, h: int, mode: str, size: int) -> None:
    hf, cfg = _hf_processor(size)
    im = _image(w, h, mode, seed=w * h)
    ref = hf(images=im, return_tensors="np")["pixel_values"]
    ours = preprocess(im, cfg)
    assert ours.shape == ref.shape == (1, 3, size, size)
    assert np.abs(ours - ref).max() <= 1e-2


def test_batch_of_paths_and_arrays(tmp_path) -> None:
    _, cfg = _hf_processor(64)
    im = _image(120, 90, "RGB", 1)
    path = tmp_path / "x.png"
    im.save(path)
    a = preprocess([path, np.asarray(im), im], cfg)
    assert a.shape == (3, 3, 64, 64) and a.dtype == np.float32
    assert np.array_equal(a[0], a[1]) and np.array_equal(a[1], a[2])


def test_model_input_is_uint8_crop() -> None:
    _, cfg = _hf_processor(64)
    x = to_model_input(_image(200, 100, "RGBA", 3), cfg)
    assert x.shape == (64, 64, 3) and x.dtype == np.uint8


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError):
        load_image(42)  # type: ignore[arg-type]

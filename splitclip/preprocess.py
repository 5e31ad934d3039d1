"""Image preprocessing with numpy + PIL, following a bundle's preprocess.json.

Matches transformers' CLIPImageProcessor: resize the shortest edge (bicubic), centre crop, rescale
to [0, 1], normalise with mean/std. The crop is split out (`to_model_input`) because cut 0 sends the
cropped uint8 image as JPEG and the cloud normalises it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps

from splitclip.constants import CLIP_MEAN, CLIP_STD

ImageLike = Image.Image | NDArray[np.uint8] | str | Path

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class PreprocessConfig:
    resize_shortest_edge: int  # shortest side after resizing
    crop_size: int  # square centre crop; equals the model's image size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @staticmethod
    def from_dict(d: dict) -> PreprocessConfig:
        return PreprocessConfig(
            resize_shortest_edge=int(d["resize_shortest_edge"]),
            crop_size=int(d["crop_size"]),
            mean=(float(d["mean"][0]), float(d["mean"][1]), float(d["mean"][2])),
            std=(float(d["std"][0]), float(d["std"][1]), float(d["std"][2])),
            resample=str(d.get("resample", "bicubic")),
        )

    @staticmethod
    def from_hf(processor_config: dict[str, Any]) -> PreprocessConfig:
        """Read a Hugging Face preprocessor_config.json (CLIPImageProcessor)."""
        size: Any = processor_config.get("size", 224)
        short = (
            int(size.get("shortest_edge") or size.get("height") or 224)
            if isinstance(size, dict)
            else int(size)
        )
        crop_cfg: Any = processor_config.get("crop_size", short)
        crop = int(crop_cfg.get("height") or short) if isinstance(crop_cfg, dict) else int(crop_cfg)
        resample = {3: "bicubic", 2: "bilinear"}.get(int(processor_config.get("resample", 3)), "bicubic")
        return PreprocessConfig(
            resize_shortest_edge=int(short),
            crop_size=int(crop),
            mean=tuple(processor_config.get("image_mean", CLIP_MEAN)),  # type: ignore[arg-type]
            std=tuple(processor_config.get("image_std", CLIP_STD)),  # type: ignore[arg-type]
            resample=resample,
        )


def load_image(src: ImageLike) -> Image.Image:
    """Open a path / PIL image / uint8 array as an RGB PIL image (RGBA and greyscale are converted)."""
    if isinstance(src, str | Path):
        with Image.open(src) as opened:
            return _to_rgb(ImageOps.exif_transpose(opened) or opened)
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim not in (2, 3):
            raise ValueError(f"image arrays must be uint8 [H, W] or [H, W, C], got {src.dtype} {src.shape}")
        return _to_rgb(Image.fromarray(src))
    if isinstance(src, Image.Image):
        return _to_rgb(src)
    raise TypeError(f"cannot read an image from {type(src).__name__}")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        # Composite transparency onto white, as transformers' convert_to_rgb does.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _resize_size(w: int, h: int, short: int) -> tuple[int, int]:
    # transformers' get_resize_output_image_size(default_to_square=False): long side truncated.
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def to_model_input(src: ImageLike, cfg: PreprocessConfig) -> NDArray[np.uint8]:
    """Resize + centre crop: uint8 [crop, crop, 3]."""
    im = load_image(src)
    w, h = im.size
    nw, nh = _resize_size(w, h, cfg.resize_shortest_edge)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), resample=_RESAMPLE[cfg.resample])
    arr = np.asarray(im, dtype=np.uint8)  # [H, W, 3]
    c = cfg.crop_size
    top = (nh - c) // 2
    left = (nw - c) // 2
    if top < 0 or left < 0:  # image smaller than the crop: pad with zeros like CLIPImageProcessor
        padded = np.zeros((max(nh, c), max(nw, c), 3), np.uint8)
        py, px = max(0, -top), max(0, -left)
        padded[py : py + nh, px : px + nw] = arr
        arr, top, left = padded, max(top, 0), max(left, 0)
    return np.ascontiguousarray(arr[top : top + c, left : left + c])


def normalize(arr: NDArray[np.uint8], cfg: PreprocessConfig) -> NDArray[np.float32]:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W], rescaled and normalised."""
    mean = np.asarray(cfg.mean, np.float32)
    std = np.asarray(cfg.std, np.float32)
    x = (arr.astype(np.float32) * np.float32(1 / 255) - mean) / std
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess(images: Sequence[ImageLike] | ImageLike, cfg: PreprocessConfig) -> NDArray[np.float32]:
    """Images -> pixel values float32 [batch, 3, crop, crop]."""
    batch: list[ImageLike] = list(images) if isinstance(images, list | tuple) else [images]  # type: ignore[list-item]
    return normalize(np.stack([to_model_input(im, cfg) for im in batch]), cfg)

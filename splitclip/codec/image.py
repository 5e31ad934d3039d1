"""Image bodies at cut 0: the uint8 [H, W, 3] model input as a PNG, JPEG or WebP file.

kind image (cut 0):  dims = H, W, 3;  body = the image file's bytes; dtype jpeg | png | webp

The every-cut presets send PNG (lossless, zlib level 6) or JPEG 4:2:0 at their quality, as they always
have; the image presets (`presets.ImagePreset`, cut 0 only) choose the format, quality and JPEG chroma
subsampling. Decoding checks the header, the file's own size and mode and that it holds one frame, before
any pixel is decoded; a header whose preset id names an image preset must carry that preset's format.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from splitclip.codec.body import TokenIndex
from splitclip.codec.calibration import Calibration
from splitclip.codec.errors import CodecError
from splitclip.codec.frame import (
    DT_JPEG,
    DT_PNG,
    DT_WEBP,
    DTYPE_NAMES,
    KIND_IMAGE,
    Header,
    TensorSpec,
    expect_fields,
)
from splitclip.codec.presets import ALL_PRESETS, ImagePreset, Preset, preset_name, wire_id

_FORMAT = {DT_JPEG: "JPEG", DT_PNG: "PNG", DT_WEBP: "WEBP"}  # header dtype -> PIL format
_DTYPE = {"jpeg": DT_JPEG, "png": DT_PNG, "webp": DT_WEBP}  # ImagePreset.image -> header dtype


def _save(img: Image.Image, preset: Preset) -> tuple[int, bytes]:
    """(header dtype, file bytes) of `img` as the preset sends it."""
    buf = io.BytesIO()
    if not isinstance(preset, ImagePreset):  # an every-cut preset: the historic PNG / JPEG q bodies
        if preset.lossless:
            img.save(buf, format="PNG", compress_level=6)
            return DT_PNG, buf.getvalue()
        img.save(buf, format="JPEG", quality=int(preset.jpeg_quality))
        return DT_JPEG, buf.getvalue()
    q = int(preset.jpeg_quality)
    if preset.image == "jpeg":
        img.save(buf, format="JPEG", quality=q, subsampling=0 if preset.subsampling == "4:4:4" else 2)
    elif preset.image == "webp":
        # lossless: method 2 is ~5x faster than the default 4 for ~1 % more bytes (64 px demo images)
        method = 2 if preset.image_lossless else 4
        img.save(buf, format="WEBP", quality=q, lossless=preset.image_lossless, method=method)
    else:
        img.save(buf, format="PNG", compress_level=9)
    return _DTYPE[preset.image], buf.getvalue()


class ImageBody:
    """Encodes the model input as the preset's image file; decoding checks size, mode and frame count
    before any pixel is decoded."""

    def encode(
        self, x: np.ndarray, cut: int, spec: TensorSpec, preset: Preset, calibration: Calibration | None
    ) -> tuple[Header, bytes]:
        s = spec.image_size
        if x.shape != (s, s, 3) or x.dtype != np.uint8:
            raise CodecError(f"image: input {x.dtype} {x.shape}, expected uint8 ({s}, {s}, 3)")
        dt, body = _save(Image.fromarray(np.ascontiguousarray(x), "RGB"), preset)  # x: uint8 [H, W, 3]
        return Header(KIND_IMAGE, cut, dt, 0, wire_id(preset), s, s, 3, 0, 0, 0, len(body), 0), body

    def decode(
        self, h: Header, body: bytes, spec: TensorSpec, calibration: Calibration | None
    ) -> tuple[NDArray[np.uint8], TokenIndex]:
        s = spec.image_size
        expect_fields(h, flags=0, dim0=s, dim1=s, dim2=3, rank=0, n_index=0, n_scales=0, raw_len=len(body))
        named = ALL_PRESETS.get(preset_name(h.preset_id) or "")
        if isinstance(named, ImagePreset) and _DTYPE[named.image] != h.dtype:
            raise CodecError(
                f"header.dtype: {DTYPE_NAMES[h.dtype]}, expected {named.image} for preset {named.name}"
            )
        fmt = _FORMAT[h.dtype]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(body), formats=[fmt]) as img:
                    # the size is known from the file header before any pixel is decoded: no bombs
                    if img.size != (s, s):
                        raise CodecError(f"image: {fmt} is {img.size[0]}x{img.size[1]}, expected {s}x{s}")
                    if img.mode != "RGB":
                        raise CodecError(f"image: {fmt} mode {img.mode!r}, expected 'RGB'")
                    frames = int(getattr(img, "n_frames", 1))  # an animated PNG / WebP has more
                    if frames != 1:
                        raise CodecError(f"image: {fmt} holds {frames} frames, expected 1")
                    img.load()
                    arr = np.array(img, dtype=np.uint8)  # [H, W, 3]
        except CodecError:
            raise
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) on garbage
            raise CodecError(f"image: cannot decode {fmt} body ({type(e).__name__}: {e})") from None
        if arr.shape != (s, s, 3):
            raise CodecError(f"image: decoded shape {arr.shape}, expected ({s}, {s}, 3)")
        return arr, None

"""Image bodies at cut 0: the uint8 [H, W, 3] model input as a PNG (lossless presets) or JPEG file.

kind image (cut 0):  dims = H, W, 3;  body = JPEG or PNG file bytes
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
from splitclip.codec.frame import DT_JPEG, DT_PNG, KIND_IMAGE, Header, TensorSpec, expect_fields
from splitclip.codec.presets import Preset, wire_id


class ImageBody:
    """PNG for lossless presets, JPEG at the preset's quality otherwise; decoding checks size and mode
    before any pixel is decoded."""

    def encode(
        self, x: np.ndarray, cut: int, spec: TensorSpec, preset: Preset, calibration: Calibration | None
    ) -> tuple[Header, bytes]:
        s = spec.image_size
        if x.shape != (s, s, 3) or x.dtype != np.uint8:
            raise CodecError(f"image: input {x.dtype} {x.shape}, expected uint8 ({s}, {s}, 3)")
        buf = io.BytesIO()
        img = Image.fromarray(np.ascontiguousarray(x), "RGB")
        if preset.lossless:
            dt = DT_PNG
            img.save(buf, format="PNG", compress_level=6)
        else:
            dt = DT_JPEG
            img.save(buf, format="JPEG", quality=int(preset.jpeg_quality))
        body = buf.getvalue()
        return Header(KIND_IMAGE, cut, dt, 0, wire_id(preset), s, s, 3, 0, 0, 0, len(body), 0), body

    def decode(
        self, h: Header, body: bytes, spec: TensorSpec, calibration: Calibration | None
    ) -> tuple[NDArray[np.uint8], TokenIndex]:
        s = spec.image_size
        expect_fields(h, flags=0, dim0=s, dim1=s, dim2=3, rank=0, n_index=0, n_scales=0, raw_len=len(body))
        fmt = "JPEG" if h.dtype == DT_JPEG else "PNG"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(body), formats=[fmt]) as img:
                    # the size is known from the file header before any pixel is decoded: no bombs
                    if img.size != (s, s):
                        raise CodecError(f"image: {fmt} is {img.size[0]}x{img.size[1]}, expected {s}x{s}")
                    if img.mode != "RGB":
                        raise CodecError(f"image: {fmt} mode {img.mode!r}, expected 'RGB'")
                    img.load()
                    arr = np.array(img, dtype=np.uint8)
        except CodecError:
            raise
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) on garbage
            raise CodecError(f"image: cannot decode {fmt} body ({type(e).__name__}: {e})") from None
        if arr.shape != (s, s, 3):
            raise CodecError(f"image: decoded shape {arr.shape}, expected ({s}, {s}, 3)")
        return arr, None

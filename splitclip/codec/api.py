"""encode / decode: a tensor at a cut to a payload and back, each body handed to its body format."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from splitclip.codec.body import BodyFormat
from splitclip.codec.calibration import Calibration
from splitclip.codec.dense import DenseHidden, Embedding
from splitclip.codec.errors import CodecError
from splitclip.codec.frame import (
    DT_FP16,
    DT_FP32,
    DT_INT4,
    DT_INT8,
    DT_JPEG,
    DT_KLT16,
    DT_KLTANS,
    DT_PNG,
    DT_WEBP,
    KIND_EMBEDDING,
    KIND_HIDDEN,
    KIND_IMAGE,
    KIND_NAMES,
    Limits,
    TensorSpec,
    frame,
    read_frame,
)
from splitclip.codec.image import ImageBody
from splitclip.codec.klt import Klt16, KltAns
from splitclip.codec.presets import ImagePreset, Preset, get_preset, preset_name

_IMAGE, _EMBEDDING, _DENSE, _KLT16, _KLTANS = ImageBody(), Embedding(), DenseHidden(), Klt16(), KltAns()

# header (kind, dtype) -> the body format that reads it; covers exactly frame.KIND_DTYPES
READERS: dict[tuple[int, int], BodyFormat] = {
    (KIND_IMAGE, DT_JPEG): _IMAGE,
    (KIND_IMAGE, DT_PNG): _IMAGE,
    (KIND_IMAGE, DT_WEBP): _IMAGE,
    (KIND_EMBEDDING, DT_FP32): _EMBEDDING,
    (KIND_EMBEDDING, DT_FP16): _EMBEDDING,
    **{(KIND_HIDDEN, dt): _DENSE for dt in (DT_FP32, DT_FP16, DT_INT8, DT_INT4)},
    (KIND_HIDDEN, DT_KLT16): _KLT16,
    (KIND_HIDDEN, DT_KLTANS): _KLTANS,
}


def writer(kind: str, p: Preset) -> BodyFormat:
    """The body format a preset writes for `kind` ("image" | "hidden" | "embedding")."""
    if kind == "hidden":
        return _KLTANS if p.ans else _KLT16 if p.klt > 0.0 else _DENSE
    return _IMAGE if kind == "image" else _EMBEDDING


_NO_LIMITS = Limits()  # the defaults; frozen, so one shared instance is safe


@dataclass(frozen=True)
class Decoded:
    cut: int
    kind: str  # "image" | "hidden" | "embedding"
    # image: uint8 [H, W, 3]; hidden: float32 [kept_tokens, width]; embedding: float32 [embed_dim]
    array: np.ndarray
    preset: str | None  # preset name recorded by the sender (informational)
    # hidden: original token position of each row when pruned (None = all tokens, in order)
    token_index: NDArray[np.int64] | None = None


def encode(
    x: np.ndarray,
    *,
    cut: int,
    spec: TensorSpec,
    preset: Preset | str,
    calibration: Calibration | None = None,
) -> bytes:
    """Encode the tensor at `cut`: uint8 [H, W, 3] image (cut 0), float32 [tokens, width] hidden,
    or float32 [embed_dim] embedding (cut L). Raises CodecError on a bad input."""
    p = get_preset(preset)
    kind = spec.kind_at(cut)
    if isinstance(p, ImagePreset) and kind != "image":
        raise CodecError(f"preset {p.name}: an image preset applies at cut 0 only, got cut {cut} ({kind})")
    h, body = writer(kind, p).encode(np.asarray(x), cut, spec, p, calibration)
    return frame(h, body)


def decode(
    payload: bytes,
    *,
    cut: int,
    spec: TensorSpec,
    calibration: Calibration | None = None,
    limits: Limits = _NO_LIMITS,
) -> Decoded:
    """Decode and fully validate a payload for `cut` (the Frame's cut). Raises only CodecError."""
    h, body = read_frame(payload, cut, spec, limits)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to Inf is caught as a CodecError
        arr, index = READERS[(h.kind, h.dtype)].decode(h, body, spec, calibration)
    return Decoded(cut, KIND_NAMES[h.kind], arr, preset_name(h.preset_id), index)

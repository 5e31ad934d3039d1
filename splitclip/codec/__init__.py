"""Wire codec for the tensor crossing the edge→cloud split (numpy + zstandard + PIL + constriction only).

Every payload is self-describing: a fixed 48-byte little-endian header, then a body. Each module owns one
part of the format and documents its layout:

    frame        the header, its kind / dtype codes and flags, crc32, strict header reading
    presets      the named presets and their header ids (PRESETS: every cut; IMAGE_PRESETS: cut 0 only)
    image        cut 0: JPEG / PNG / WebP file bytes
    dense        cut L: fp32 / fp16 embedding; 0 < k < L: fp32 / fp16 / int8 / int4 hidden states,
                 optionally pruned (hidden), PCA-projected and zstd-coded
    klt          0 < k < L: KLT transform coding (dtypes klt16 and kltans)
    entropy      zstd and ANS coders the bodies use
    calibration  the per-cut PCA bases the PCA and KLT bodies code in
    api          encode / decode, dispatching each frame to its body format (body.BodyFormat)

Decoding is strict: any mismatch is a `CodecError` naming the field and the expected value.
"""

from __future__ import annotations

from splitclip.codec.api import Decoded, decode, encode
from splitclip.codec.calibration import Calibration, CalibrationError, fit_calibration
from splitclip.codec.errors import CodecError, PayloadTooLarge
from splitclip.codec.frame import (  # noqa: F401  (the codes outside __all__ stay module attributes, as before)
    DT_FP16,
    DT_FP32,
    DT_INT4,
    DT_INT8,
    DT_JPEG,
    DT_KLT16,
    DT_KLTANS,
    DT_PNG,
    DT_WEBP,
    DTYPE_NAMES,
    FLAG_KLT,
    FLAG_PCA,
    FLAG_PRUNED,
    FLAG_SCALE32,
    FLAG_ZSTD,
    HEADER_SIZE,
    KIND_EMBEDDING,
    KIND_HIDDEN,
    KIND_IMAGE,
    KIND_NAMES,
    MAGIC,
    VERSION,
    Header,
    Limits,
    TensorSpec,
    read_header,
)
from splitclip.codec.presets import ALL_PRESETS, IMAGE_PRESETS, PRESETS, ImagePreset, Preset, get_preset

__all__ = [
    "ALL_PRESETS",
    "IMAGE_PRESETS",
    "PRESETS",
    "Calibration",
    "CalibrationError",
    "CodecError",
    "Decoded",
    "Header",
    "ImagePreset",
    "Limits",
    "PayloadTooLarge",
    "Preset",
    "TensorSpec",
    "decode",
    "encode",
    "fit_calibration",
    "get_preset",
    "read_header",
]

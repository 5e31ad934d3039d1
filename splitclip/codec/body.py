"""The interface each body format implements, so that encode and decode dispatch instead of branching."""

from __future__ import annotations

from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from splitclip.codec.calibration import Calibration
from splitclip.codec.frame import Header, TensorSpec
from splitclip.codec.presets import Preset

TokenIndex = NDArray[np.int64] | None  # hidden: original position of each row when pruned, else None


class BodyFormat(Protocol):
    def encode(
        self, x: np.ndarray, cut: int, spec: TensorSpec, preset: Preset, calibration: Calibration | None
    ) -> tuple[Header, bytes]:
        """The header (body_len and crc32 still 0) and body for `x` at `cut`; CodecError on a bad input."""
        ...

    def decode(
        self, h: Header, body: bytes, spec: TensorSpec, calibration: Calibration | None
    ) -> tuple[np.ndarray, TokenIndex]:
        """The array a frame's body holds (its header already read by `frame.read_frame`), and the kept
        token positions; CodecError naming the first field that does not check out."""
        ...

"""Where the codec's calibration used to live: it is splitclip.codec.calibration now (import it from there)."""

from __future__ import annotations

from splitclip.codec.calibration import Calibration, CalibrationError, fit_calibration

__all__ = ["Calibration", "CalibrationError", "fit_calibration"]

"""The entropy coders bodies use: zstd for whole bodies, and ANS for the KLT codec's integer symbols.

zstd: a body is compressed as one frame that records its content size, and sent raw if that does not
make it smaller (FLAG_ZSTD says which). Reading trusts nothing: the declared size must be the header's
raw_len before anything is decompressed, and the single frame must consume the whole body.

ANS (constriction; no torch/ray): every symbol of PCA direction j is coded with a zero-mean quantised
Gaussian whose std (in symbols) is `sqrt(var_j) / step_j`, clipped to [MODEL_STD_MIN, MODEL_STD_MAX],
restricted to the frame's support [-K, K]. The model follows from the calibration the bundle ships, so the wire carries only K and the ANS
words. Leaky quantisation gives every symbol in [-K, K] a nonzero probability, so any frame is encodable
whatever the calibration says; a poorly matched model only costs bytes.

Measured on demo-model activations (300 frames not used for calibration, cuts 1-3, steps 0.1-0.3): the
Gaussian beats a Laplace by ~1% of the bytes, scaling the std by 0.9-1.1 changes nothing worth having
(1.0 is best), and the coded size is within ~0.5% of the per-direction empirical (oracle) entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import zstandard
from numpy.typing import NDArray

from splitclip.codec.errors import CodecError

# constriction's default ANS coder: 32-bit words, 24-bit probabilities. 2 * K + 1 symbols must fit in
# 2^24 with room to spare, and the codec's symbols are int16 anyway.
K_MAX = 32767
MODEL_STD_MIN = 0.05  # a direction with (near) zero calibration variance still gets a usable model
MODEL_STD_MAX = 1.0e6

T = TypeVar("T")


def zstd_pack(raw: bytes, level: int) -> bytes | None:
    """raw as one zstd frame, or None when that is not smaller (incompressible bodies go raw)."""
    packed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
    return packed if len(packed) < len(raw) else None


def zstd_unpack(body: bytes, raw_len: int) -> bytes:
    """The raw body of a zstd-flagged body; CodecError unless it is one frame of exactly raw_len bytes."""
    # decompress() trusts a frame's declared content size over max_output_size: check it first
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as e:
        raise CodecError(f"body: not a zstd frame ({e})") from None
    if declared != raw_len:
        raise CodecError(f"body: zstd content size {declared}, expected {raw_len} (header.raw_len)")
    dobj = zstandard.ZstdDecompressor(max_window_size=1 << 24).decompressobj()
    try:
        out = dobj.decompress(body)
    except zstandard.ZstdError as e:
        raise CodecError(f"body: zstd decompression failed ({e})") from None
    if not dobj.eof or dobj.unused_data:
        raise CodecError("body: expected exactly one complete zstd frame")
    return out


def _constriction() -> Any:
    import constriction  # lazy: only frames that use ANS pay for the import

    return constriction


def model_stds(var: NDArray[np.float32], step: NDArray[np.float32]) -> NDArray[np.float64]:
    """Gaussian std (in symbols) per direction: [width] from calibration variances and steps [width]."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.sqrt(var.astype(np.float64)) / step.astype(np.float64)
    s = np.where(np.isfinite(s), s, MODEL_STD_MAX)  # 0 / 0 or x / underflowed step
    return np.clip(s, MODEL_STD_MIN, MODEL_STD_MAX)


def _call(what: str, fn: Callable[[], T]) -> T:
    """Run a constriction call, turning any exception it raises (Rust panics included) into CodecError."""
    try:
        return fn()
    except CodecError:
        raise
    except Exception as e:
        raise CodecError(f"{what}: {type(e).__name__}: {e}") from None
    except BaseException as e:  # pyo3 maps a Rust panic to PanicException, a BaseException subclass
        if type(e).__name__ != "PanicException":
            raise
        raise CodecError(f"{what}: {type(e).__name__}: {e}") from None


def encode_symbols(sym: NDArray[np.int32], stds: NDArray[np.float64]) -> tuple[int, bytes]:
    """ANS-code symbols [rows, width] (|sym| <= K_MAX), direction j with std stds[j].

    Returns (K = max |symbol|, little-endian u32 words); K = 0 means every symbol is 0 and no words.
    """
    k = int(np.abs(sym).max()) if sym.size else 0
    if k > K_MAX:
        raise CodecError(f"ans symbols: max |symbol| {k}, expected at most {K_MAX}")
    if k == 0:
        return 0, b""
    flat = np.ascontiguousarray(sym, dtype=np.int32).reshape(-1)  # [rows * width], row-major
    scale = np.ascontiguousarray(np.broadcast_to(stds, sym.shape), dtype=np.float64).reshape(-1)

    def run() -> Any:
        c = _constriction()
        coder = c.stream.stack.AnsCoder()
        coder.encode_reverse(flat, c.stream.model.QuantizedGaussian(-k, k), np.zeros_like(scale), scale)
        return coder.get_compressed()

    words = _call("ans encode", run)
    return k, np.asarray(words, dtype="<u4").tobytes()


def decode_symbols(words: bytes, k: int, rows: int, stds: NDArray[np.float64]) -> NDArray[np.int32]:
    """Inverse of `encode_symbols`: symbols [rows, width]; CodecError unless the words decode exactly."""
    width = stds.shape[0]
    if not 0 <= k <= K_MAX:
        raise CodecError(f"ans K: {k}, expected 0..{K_MAX}")
    if len(words) % 4:
        raise CodecError(f"ans words: {len(words)} bytes, expected a multiple of 4 (u32 words)")
    if k == 0 or rows * width == 0:
        if words:
            raise CodecError(
                f"ans words: {len(words) // 4} words, expected none (K = {k}, {rows * width} symbols)"
            )
        if k and not rows * width:
            raise CodecError(f"ans K: {k}, expected 0 for a frame without symbols")
        return np.zeros((rows, width), np.int32)
    data = np.frombuffer(words, dtype="<u4").astype(np.uint32)  # native order, writable copy
    scale = np.ascontiguousarray(np.broadcast_to(stds, (rows, width)), dtype=np.float64).reshape(-1)

    def run() -> tuple[Any, bool]:
        c = _constriction()
        coder = c.stream.stack.AnsCoder(data)
        out = coder.decode(c.stream.model.QuantizedGaussian(-k, k), np.zeros_like(scale), scale)
        return out, bool(coder.is_empty())

    flat, empty = _call("ans words", run)
    flat = np.asarray(flat)
    if flat.shape != (rows * width,):
        raise CodecError(f"ans words: decoded {flat.shape} symbols, expected ({rows * width},)")
    if not empty:
        raise CodecError("ans words: compressed data left over after the last symbol (corrupt or too long)")
    top = int(np.abs(flat).max())
    if top != k:  # the model keeps symbols within [-K, K]; K must also be reached, as the encoder sets it
        raise CodecError(f"ans symbols: max |symbol| {top}, expected exactly K = {k}")
    return flat.astype(np.int32).reshape(rows, width)

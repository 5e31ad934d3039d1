"""KLT transform coding of hidden states: every patch token in the full per-cut PCA basis, quantised.

kind hidden, dtype klt16 (FLAG_KLT, rank = width): transform coding in the FULL per-cut PCA basis:
    [indices u16 x n_index]   if FLAG_PRUNED
    step f32                  global quantiser step q (> 0); direction j uses q * calibration.klt_steps[j]
    CLS row fp16 x width      (raw values, not transformed: the head reads it directly)
    symbols: (tokens - 1) x width coefficients round(c / step_j), zigzag-mapped to u16, stored
          coefficient-major (all tokens of direction 0, then direction 1, ...) as two byte planes
          (all low bytes, then all high bytes) so zstd sees long runs of similar small bytes.
kind hidden, dtype kltans (FLAG_KLT, rank = width, never FLAG_ZSTD): the same symbols, ANS-coded:
    [indices u16 x n_index]   if FLAG_PRUNED
    step f32                  as for klt16
    K u16                     max |symbol| in the frame, 0..32767 (0: every symbol is 0, no words follow)
    crc32 u32                 of the symbols as int16 LE [tokens - 1, width]: the model is rebuilt from
                              floats on each side, so a platform whose float maths differs must fail
                              loudly here, not decode other symbols
    CLS row fp16 x width
    words u32 x n             the rest of the body (raw_len = body_len): constriction's ANS stack coder
          (32-bit words, 24-bit probabilities); decoding pops the (tokens - 1) x width symbols token by
          token, directions 0..width-1 within a token. Direction j uses constriction's QuantizedGaussian on
          [-K, K], mean 0, std = f64 sqrt(var_j) / f64(step_j) clipped to [0.05, 1e6], where
          step_j = f32(q) * calibration.klt_steps[j] and var_j is the calibration's var_{cut}
          (splitclip.codec.entropy). Decoding checks that the words are consumed exactly and that the
          decoded symbols reach but never exceed K.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from splitclip.codec import entropy, hidden
from splitclip.codec.body import TokenIndex
from splitclip.codec.calibration import Calibration
from splitclip.codec.dense import float_body, hidden_input, projection, read_floats
from splitclip.codec.errors import CodecError
from splitclip.codec.frame import (
    DT_FP16,
    DT_KLT16,
    DT_KLTANS,
    FLAG_KLT,
    FLAG_PRUNED,
    FLAG_ZSTD,
    KIND_HIDDEN,
    Header,
    TensorSpec,
    expect_fields,
)
from splitclip.codec.presets import Preset, wire_id

_SYM_MAX = 32767  # symbols are int16; zigzag code 0xFFFF (-32768) is never produced
_F32 = NDArray[np.float32]


def _tables(cal: Calibration | None, cut: int, width: int, what: str) -> tuple[_F32, _F32, _F32, _F32]:
    """(mean, full basis [width, width], relative steps, variances) at `cut`; the vectors are [width]."""
    if cal is None:
        raise CodecError(f"{what}: klt needs a Calibration (PCA basis for cut {cut}); none was given")
    mean, basis = projection(cal, cut, width, width)
    rel = cal.klt_steps(cut)  # raises if the variances are missing
    return mean, basis, rel, cal.variances[cut]


@dataclass(frozen=True)
class _Symbols:
    """What both KLT bodies code: the kept tokens' symbols and the parts around them."""

    tokens: int
    index: TokenIndex
    flags: int
    head: bytes  # [indices u16] + step f32
    cls: bytes  # CLS row, fp16 [width]
    sym: _F32  # [tokens - 1, width], whole numbers in -_SYM_MAX.._SYM_MAX
    step: _F32  # [width]
    var: _F32  # [width]


def _symbols(x: np.ndarray, cut: int, spec: TensorSpec, p: Preset, cal: Calibration | None) -> _Symbols:
    x, index = hidden.prune(hidden_input(x, spec), spec, p)  # [tokens, width]
    flags, index_part = hidden.index_part(index)
    mean, basis, rel, var = _tables(cal, cut, spec.width, f"preset {p.name}")
    step = np.float32(p.klt) * rel  # [width]
    with np.errstate(over="ignore", invalid="ignore"):
        sym = np.rint(((x[1:] - mean) @ basis) / step)  # [tokens - 1, width]
    if sym.size and not float(np.abs(sym).max()) <= _SYM_MAX:  # also catches NaN / Inf
        raise CodecError(
            f"hidden: KLT coefficient / step up to {float(np.abs(sym).max()):.3g}, "
            f"expected at most {_SYM_MAX} (int16 symbols)"
        )
    head = index_part + struct.pack("<f", float(p.klt))
    cls = float_body(x[0], DT_FP16, "hidden (CLS)")
    return _Symbols(x.shape[0], index, flags | FLAG_KLT, head, cls, sym, step, var)


def _header(h: Header, spec: TensorSpec) -> int:
    """The token count of a KLT frame, once the header checks out."""
    tokens = hidden.check_header(h, spec)
    if tokens < 1:
        raise CodecError(f"header.dim0 (tokens): {tokens}, expected at least 1 (CLS)")
    expect_fields(h, rank=spec.width)
    return tokens


def _read_step(raw: bytes, off: int) -> float:
    (q,) = struct.unpack_from("<f", raw, off)
    if not (np.isfinite(q) and q > 0.0):
        raise CodecError(f"klt step: {q}, expected a finite value > 0")
    return float(q)


def _reconstruct(cls: _F32, sym: NDArray[np.int32], step: _F32, mean: _F32, basis: _F32) -> _F32:
    """Tokens [1 + rows, width] from the CLS row [width] and symbols [rows, width] in the KLT basis."""
    x = np.empty((1 + sym.shape[0], cls.shape[0]), np.float32)
    x[0] = cls
    x[1:] = (sym.astype(np.float32) * step) @ basis.T + mean
    if not np.isfinite(x).all():
        raise CodecError("hidden: decoded values contain NaN or Inf")
    return x


class Klt16:
    """Symbols as zigzag u16 in two byte planes, coefficient-major, zstd-coded when that is smaller."""

    def encode(
        self, x: np.ndarray, cut: int, spec: TensorSpec, preset: Preset, calibration: Calibration | None
    ) -> tuple[Header, bytes]:
        s = _symbols(x, cut, spec, preset, calibration)
        s32 = np.ascontiguousarray(s.sym.T, dtype=np.int32)  # coefficient-major [width, tokens - 1]
        zz = ((s32 << 1) ^ (s32 >> 31)).astype(np.uint16)  # zigzag: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...
        lo, hi = (zz & 0xFF).astype(np.uint8), (zz >> 8).astype(np.uint8)  # the two byte planes
        raw = b"".join((s.head, s.cls, lo.tobytes(), hi.tobytes()))
        body, flags = raw, s.flags
        if preset.zstd and (packed := entropy.zstd_pack(raw, preset.zstd_level)) is not None:
            body, flags = packed, flags | FLAG_ZSTD
        n_index = s.tokens if s.index is not None else 0
        w = spec.width
        h = Header(
            KIND_HIDDEN, cut, DT_KLT16, flags, wire_id(preset), s.tokens, w, 0, w, n_index, 0, len(raw), 0
        )
        return h, body

    def decode(
        self, h: Header, body: bytes, spec: TensorSpec, calibration: Calibration | None
    ) -> tuple[_F32, TokenIndex]:
        tokens, width = _header(h, spec), spec.width
        raw_len = 2 * h.n_index + 4 + 2 * width + 2 * (tokens - 1) * width
        expect_fields(h, raw_len=raw_len)
        raw = entropy.zstd_unpack(body, raw_len) if h.flags & FLAG_ZSTD else body
        if len(raw) != raw_len:
            raise CodecError(f"body: {len(raw)} bytes, expected {raw_len} (header.raw_len)")
        index = hidden.read_index(raw, tokens, spec) if h.flags & FLAG_PRUNED else None
        off = 2 * h.n_index
        q = _read_step(raw, off)
        off += 4
        cls = read_floats(raw, DT_FP16, off, width, "hidden (CLS)")
        off += 2 * width
        n = (tokens - 1) * width
        lo = np.frombuffer(raw, np.uint8, count=n, offset=off).astype(np.uint16)
        hi = np.frombuffer(raw, np.uint8, count=n, offset=off + n).astype(np.uint16)
        zz = lo | (hi << 8)
        if (zz == 0xFFFF).any():
            raise CodecError("klt symbols: zigzag code 65535 (-32768) found, expected -32767..32767")
        z32 = zz.astype(np.int32)
        sym = ((z32 >> 1) ^ -(z32 & 1)).reshape(width, tokens - 1)  # [width, tokens - 1]
        mean, basis, rel, _ = _tables(calibration, h.cut, width, "header.dtype: klt16")
        x = _reconstruct(cls, np.ascontiguousarray(sym.T), np.float32(q) * rel, mean, basis)
        return x, index


class KltAns:
    """The same symbols, ANS-coded under the calibration's per-direction Gaussian (never zstd)."""

    def encode(
        self, x: np.ndarray, cut: int, spec: TensorSpec, preset: Preset, calibration: Calibration | None
    ) -> tuple[Header, bytes]:
        s = _symbols(x, cut, spec, preset, calibration)
        stds = entropy.model_stds(s.var, s.step)  # [width]
        k, words = entropy.encode_symbols(s.sym.astype(np.int32), stds)
        crc = zlib.crc32(s.sym.astype("<i2").tobytes())
        raw = b"".join((s.head, struct.pack("<HI", k, crc), s.cls, words))
        n_index = s.tokens if s.index is not None else 0
        w = spec.width
        h = Header(
            KIND_HIDDEN, cut, DT_KLTANS, s.flags, wire_id(preset), s.tokens, w, 0, w, n_index, 0, len(raw), 0
        )
        return h, raw

    def decode(
        self, h: Header, body: bytes, spec: TensorSpec, calibration: Calibration | None
    ) -> tuple[_F32, TokenIndex]:
        tokens, width = _header(h, spec), spec.width
        fixed = 2 * h.n_index + 4 + 2 + 4 + 2 * width  # indices, step, K, crc32, CLS row; ANS words follow
        if h.raw_len != len(body):
            raise CodecError(
                f"header.raw_len: {h.raw_len}, expected {len(body)} (kltans bodies are not zstd)"
            )
        if len(body) < fixed or (len(body) - fixed) % 4:
            raise CodecError(
                f"body: {len(body)} bytes, expected {fixed} + 4 * n (indices, step, K, crc32, CLS, u32 ANS words)"
            )
        index = hidden.read_index(body, tokens, spec) if h.n_index else None
        off = 2 * h.n_index
        q = _read_step(body, off)
        k, crc = struct.unpack_from("<HI", body, off + 4)
        cls = read_floats(body, DT_FP16, off + 10, width, "hidden (CLS)")
        mean, basis, rel, var = _tables(calibration, h.cut, width, "header.dtype: kltans")
        step = np.float32(q) * rel  # [width]
        stds = entropy.model_stds(var, step)  # [width]
        sym = entropy.decode_symbols(body[fixed:], k, tokens - 1, stds)  # [tokens - 1, width]
        if (got := zlib.crc32(sym.astype("<i2").tobytes())) != crc:
            raise CodecError(
                f"kltans symbols: crc32 {got:#010x}, expected {crc:#010x} (the ANS model differs from the "
                "encoder's: same bundle, codec version and float maths needed on both sides)"
            )
        return _reconstruct(cls, sym, step, mean, basis), index

"""Dense value bodies: hidden states as fp32 / fp16 / int8 / int4 (optionally PCA-projected), embeddings.

kind embedding (cut L):  dims = embed_dim, 0, 0;  body = fp32 / fp16 values
kind hidden    (0<k<L):  dims = tokens, width, 0;  raw body (zstd-compressed as a whole if FLAG_ZSTD):
    [indices u16 x n_index]   if FLAG_PRUNED: kept token positions, increasing, first is 0 (CLS)
    [scales f16|f32 x tokens] if int8/int4: symmetric per-token scale (f32 if FLAG_SCALE32)
    data: tokens x width values, or with FLAG_PCA the CLS row (width values) followed by
          (tokens - 1) x rank PCA coefficients; int4 values are packed two per byte, low nibble first.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from splitclip.codec import entropy, hidden
from splitclip.codec.body import TokenIndex
from splitclip.codec.calibration import Calibration
from splitclip.codec.errors import CodecError
from splitclip.codec.frame import (
    DT_FP16,
    DT_FP32,
    DT_INT4,
    DT_INT8,
    DTYPE_CODES,
    FLAG_PCA,
    FLAG_PRUNED,
    FLAG_SCALE32,
    FLAG_ZSTD,
    KIND_EMBEDDING,
    KIND_HIDDEN,
    Header,
    TensorSpec,
    expect_fields,
)
from splitclip.codec.presets import Preset, wire_id

QMAX = {DT_INT8: 127, DT_INT4: 7}
_F16_MIN_NORMAL = float(np.finfo(np.float16).tiny)
_F16_MAX = float(np.finfo(np.float16).max)
_QUANT_ABS_MAX = 3.0e38  # above this, qmax * fp32(max / qmax) can round past float32 max to Inf


# ------------------------------------------------------------------------------------- float values


def expect_shape(x: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    if x.shape != shape:
        raise CodecError(f"{what}: input shape {x.shape}, expected {shape}")
    if x.dtype.kind != "f":
        raise CodecError(f"{what}: input dtype {x.dtype}, expected float32")
    if not np.isfinite(x).all():
        raise CodecError(f"{what}: input contains NaN or Inf")


def hidden_input(x: np.ndarray, spec: TensorSpec) -> NDArray[np.float32]:
    """The hidden states to encode, [tokens, width] float32, once their shape and values check out."""
    expect_shape(x, (spec.num_tokens, spec.width), "hidden")
    return x.astype(np.float32, copy=False)


def float_body(x: np.ndarray, dt: int, what: str) -> bytes:
    if dt == DT_FP32:
        return np.ascontiguousarray(x, dtype="<f4").tobytes()
    if x.size and float(np.abs(x).max()) > _F16_MAX:
        raise CodecError(
            f"{what}: |value| up to {float(np.abs(x).max()):.3g} overflows fp16; use int8 or lossless"
        )
    return np.ascontiguousarray(x, dtype="<f2").tobytes()


def read_floats(buf: bytes, dt: int, offset: int, count: int, what: str) -> NDArray[np.float32]:
    a = np.frombuffer(buf, dtype="<f4" if dt == DT_FP32 else "<f2", count=count, offset=offset)
    out = a.astype(np.float32)  # always a fresh, writable, native-order copy
    if not np.isfinite(out).all():
        raise CodecError(f"{what}: decoded values contain NaN or Inf")
    return out


# ----------------------------------------------------------------------------------- int8 / int4


def _quantise(x: NDArray[np.float32], qmax: int) -> tuple[NDArray[np.int8], NDArray[np.float32], bool]:
    """Symmetric per-row quantisation. Returns (q [rows, cols], scales [rows], scales_need_fp32)."""
    amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)  # [rows]
    if amax.size and float(amax.max()) > _QUANT_ABS_MAX:
        raise CodecError(
            f"hidden: |value| up to {float(amax.max()):.3g}, int presets support up to {_QUANT_ABS_MAX:g}"
        )
    scale = (amax.astype(np.float64) / qmax).astype(np.float32)
    nz = scale[scale > 0]
    need32 = bool(nz.size) and (float(nz.min()) < _F16_MIN_NORMAL or float(nz.max()) > _F16_MAX)
    if not need32:
        scale = scale.astype(np.float16).astype(np.float32)  # quantise against the scale the cloud will see
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(x / safe[:, None]), -qmax, qmax).astype(np.int8)
    return q, scale, need32


def _pack_int4(q: NDArray[np.int8]) -> bytes:
    u = (q.reshape(-1).astype(np.int16) + 8).astype(np.uint8)  # 1..15; nibble 0 (-8) is never produced
    if u.size % 2:
        u = np.append(u, np.uint8(8))  # pad nibble = value 0
    return (u[0::2] | (u[1::2] << 4)).tobytes()


def _read_ints(raw: bytes, dt: int, off: int, n: int) -> NDArray[np.int8]:
    if dt == DT_INT8:
        q = np.frombuffer(raw, np.int8, count=n, offset=off)
        if (q == -128).any():
            raise CodecError("values: int8 -128 found, expected -127..127")
        return q
    packed = np.frombuffer(raw, np.uint8, count=(n + 1) // 2, offset=off)
    nib = np.empty(2 * packed.size, np.uint8)
    nib[0::2], nib[1::2] = packed & 0x0F, packed >> 4
    if n % 2 and nib[-1] != 8:
        raise CodecError(f"values: int4 padding nibble {nib[-1]}, expected 8 (zero)")
    nib = nib[:n]
    if (nib == 0).any():
        raise CodecError("values: int4 nibble 0 (-8) found, expected -7..7")
    return (nib.astype(np.int8) - 8).astype(np.int8)


# -------------------------------------------------------------------------------------------- PCA


def projection(
    cal: Calibration, cut: int, rank: int, width: int
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(mean [width], basis[:, :rank] [width, rank]) at `cut`, from a calibration for this width."""
    if cal.width != width:
        raise CodecError(f"calibration: width {cal.width}, expected {width} (the bundle's vision.width)")
    return cal.projection(cut, rank)


# ---------------------------------------------------------------------------------------- formats


class DenseHidden:
    """Hidden states as fp32 / fp16 / int8 / int4 values, optionally pruned, PCA-projected, zstd-coded."""

    def encode(
        self, x: np.ndarray, cut: int, spec: TensorSpec, preset: Preset, calibration: Calibration | None
    ) -> tuple[Header, bytes]:
        p = preset
        x, index = hidden.prune(hidden_input(x, spec), spec, p)  # [tokens, width]
        flags, index_part = hidden.index_part(index)
        parts = [index_part]
        rank = p.rank(spec.width)
        if rank:
            if calibration is None:
                raise CodecError(
                    f"preset {p.name} needs a Calibration (PCA basis for cut {cut}); none was given"
                )
            mean, basis = projection(calibration, cut, rank, spec.width)
            coeffs = (x[1:] - mean) @ basis  # [tokens - 1, rank]
            flags |= FLAG_PCA
        dt = DTYPE_CODES[p.dtype]
        tokens = x.shape[0]
        if dt in QMAX:
            if rank:
                # CLS row and coefficient rows quantised per row, then concatenated in body order
                q_cls, s_cls, n32a = _quantise(x[:1], QMAX[dt])
                q_rest, s_rest, n32b = _quantise(coeffs.astype(np.float32, copy=False), QMAX[dt])
                q_flat = np.concatenate((q_cls.reshape(-1), q_rest.reshape(-1)))
                scale, need32 = np.concatenate((s_cls, s_rest)), n32a or n32b
            else:
                q, scale, need32 = _quantise(x, QMAX[dt])
                q_flat = q.reshape(-1)
            if need32:
                flags |= FLAG_SCALE32
            parts.append(scale.astype("<f4" if need32 else "<f2").tobytes())
            parts.append(q_flat.tobytes() if dt == DT_INT8 else _pack_int4(q_flat))
        else:
            vals = np.concatenate((x[0], coeffs.reshape(-1))) if rank else x
            parts.append(float_body(vals, dt, "hidden"))
        raw = b"".join(parts)
        body = raw
        if p.zstd and (packed := entropy.zstd_pack(raw, p.zstd_level)) is not None:
            body, flags = packed, flags | FLAG_ZSTD
        n_index = tokens if index is not None else 0
        n_scales = tokens if dt in QMAX else 0
        h = Header(
            KIND_HIDDEN,
            cut,
            dt,
            flags,
            wire_id(p),
            tokens,
            spec.width,
            0,
            rank,
            n_index,
            n_scales,
            len(raw),
            0,
        )
        return h, body

    def decode(
        self, h: Header, body: bytes, spec: TensorSpec, calibration: Calibration | None
    ) -> tuple[NDArray[np.float32], TokenIndex]:
        tokens, width = hidden.check_header(h, spec), spec.width
        pca, quant = bool(h.flags & FLAG_PCA), h.dtype in QMAX
        if pca:
            if not 1 <= h.rank <= width:
                raise CodecError(f"header.rank: {h.rank}, expected 1..{width} with the pca flag")
        else:
            expect_fields(h, rank=0)
        n_vals = width + (tokens - 1) * h.rank if pca else tokens * width
        data_len = {DT_FP32: 4 * n_vals, DT_FP16: 2 * n_vals, DT_INT8: n_vals, DT_INT4: (n_vals + 1) // 2}
        scale_size = 4 if h.flags & FLAG_SCALE32 else 2
        raw_len = 2 * h.n_index + scale_size * h.n_scales + data_len[h.dtype]
        expect_fields(h, raw_len=raw_len)
        raw = entropy.zstd_unpack(body, raw_len) if h.flags & FLAG_ZSTD else body
        if len(raw) != raw_len:
            raise CodecError(f"body: {len(raw)} bytes, expected {raw_len} (header.raw_len)")

        off = 0
        index = None
        if h.flags & FLAG_PRUNED:
            index = hidden.read_index(raw, tokens, spec)
            off += 2 * tokens
        if quant:
            sdt = "<f4" if scale_size == 4 else "<f2"
            scale = np.frombuffer(raw, sdt, count=tokens, offset=off).astype(np.float32)  # [tokens]
            off += scale_size * tokens
            if not np.isfinite(scale).all() or (scale < 0).any():
                raise CodecError("scales: NaN, Inf or negative, expected finite values >= 0")
            qf = _read_ints(raw, h.dtype, off, n_vals).astype(np.float32)  # [n_vals]
            if pca:
                cls = qf[:width] * scale[0]  # [width]
                coeffs = qf[width:].reshape(tokens - 1, h.rank) * scale[1:, None]  # [tokens - 1, rank]
            else:
                x = qf.reshape(tokens, width) * scale[:, None]  # [tokens, width]
        else:
            vals = read_floats(raw, h.dtype, off, n_vals, "hidden")
            if pca:
                cls, coeffs = vals[:width], vals[width:].reshape(tokens - 1, h.rank)
            else:
                x = vals.reshape(tokens, width)
        if pca:
            if calibration is None:
                raise CodecError(
                    f"header.flags: pca frame for cut {h.cut} but no Calibration was given to decode"
                )
            mean, basis = projection(calibration, h.cut, h.rank, width)
            x = np.empty((tokens, width), np.float32)
            x[0] = cls
            x[1:] = coeffs @ basis.T + mean
        if not np.isfinite(x).all():
            raise CodecError("hidden: decoded values contain NaN or Inf")
        return np.ascontiguousarray(x, dtype=np.float32), index


class Embedding:
    """The image embedding at cut L: fp32 (lossless presets) or fp16 values."""

    def encode(
        self, x: np.ndarray, cut: int, spec: TensorSpec, preset: Preset, calibration: Calibration | None
    ) -> tuple[Header, bytes]:
        expect_shape(x, (spec.embed_dim,), "embedding")
        dt = DT_FP32 if preset.dtype == "fp32" else DT_FP16
        body = float_body(x, dt, "embedding")
        return Header(
            KIND_EMBEDDING, cut, dt, 0, wire_id(preset), spec.embed_dim, 0, 0, 0, 0, 0, len(body), 0
        ), body

    def decode(
        self, h: Header, body: bytes, spec: TensorSpec, calibration: Calibration | None
    ) -> tuple[NDArray[np.float32], TokenIndex]:
        expect_fields(h, flags=0, dim0=spec.embed_dim, dim1=0, dim2=0, rank=0, n_index=0, n_scales=0)
        expect_fields(h, raw_len=spec.embed_dim * (4 if h.dtype == DT_FP32 else 2))
        if len(body) != h.raw_len:
            raise CodecError(f"body: {len(body)} bytes, expected {h.raw_len} (header.raw_len)")
        return read_floats(body, h.dtype, 0, spec.embed_dim, "embedding"), None

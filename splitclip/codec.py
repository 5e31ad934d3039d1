"""Wire codec for the tensor crossing the edge→cloud split (numpy + zstandard + PIL + constriction only).

Every payload is self-describing: a fixed 48-byte little-endian header, then a body.

    magic "SCLP" | version u8 | kind u8 | cut u16 | dtype u8 | flags u8 | preset u8 | pad u8
    dim0 u32 | dim1 u32 | dim2 u32 | rank u32 | n_index u32 | n_scales u32 | raw_len u32 | body_len u32 | crc32 u32

    kind image     (cut 0):  dims = H, W, 3;  body = JPEG or PNG file bytes
    kind embedding (cut L):  dims = embed_dim, 0, 0;  body = fp32 / fp16 values
    kind hidden    (0<k<L):  dims = tokens, width, 0;  raw body (zstd-compressed as a whole if FLAG_ZSTD):
        [indices u16 x n_index]   if FLAG_PRUNED: kept token positions, increasing, first is 0 (CLS)
        [scales f16|f32 x tokens] if int8/int4: symmetric per-token scale (f32 if FLAG_SCALE32)
        data: tokens x width values, or with FLAG_PCA the CLS row (width values) followed by
              (tokens - 1) x rank PCA coefficients; int4 values are packed two per byte, low nibble first.
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
              (splitclip.entropy). Decoding checks that the words are consumed exactly and that the decoded
              symbols reach but never exceed K.

crc32 covers the header (with crc32 = 0) and the stored body. raw_len is the body size before zstd.
Decoding is strict: any mismatch is a `CodecError` naming the field and the expected value.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import zstandard
from numpy.typing import NDArray
from PIL import Image

from splitclip import entropy
from splitclip.calibration import Calibration, CalibrationError, CodecError, fit_calibration

__all__ = [
    "PRESETS",
    "Calibration",
    "CalibrationError",
    "CodecError",
    "Decoded",
    "Header",
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

MAGIC = b"SCLP"
VERSION = 1
_HEADER = struct.Struct("<4sBBHBBBx9I")
HEADER_SIZE = _HEADER.size  # 48

KIND_IMAGE, KIND_HIDDEN, KIND_EMBEDDING = 0, 1, 2
KIND_NAMES = {KIND_IMAGE: "image", KIND_HIDDEN: "hidden", KIND_EMBEDDING: "embedding"}

DT_FP32, DT_FP16, DT_INT8, DT_INT4, DT_JPEG, DT_PNG, DT_KLT16, DT_KLTANS = 0, 1, 2, 3, 4, 5, 6, 7
DTYPE_NAMES = {
    DT_FP32: "fp32",
    DT_FP16: "fp16",
    DT_INT8: "int8",
    DT_INT4: "int4",
    DT_JPEG: "jpeg",
    DT_PNG: "png",
    DT_KLT16: "klt16",
    DT_KLTANS: "kltans",
}
_DTYPE_CODES = {v: k for k, v in DTYPE_NAMES.items()}
_KIND_DTYPES = {
    KIND_IMAGE: (DT_JPEG, DT_PNG),
    KIND_HIDDEN: (DT_FP32, DT_FP16, DT_INT8, DT_INT4, DT_KLT16, DT_KLTANS),
    KIND_EMBEDDING: (DT_FP32, DT_FP16),
}
_QMAX = {DT_INT8: 127, DT_INT4: 7}

FLAG_ZSTD, FLAG_PRUNED, FLAG_PCA, FLAG_SCALE32, FLAG_KLT = 1, 2, 4, 8, 16
_ALL_FLAGS = FLAG_ZSTD | FLAG_PRUNED | FLAG_PCA | FLAG_SCALE32 | FLAG_KLT
_KLT_SYM_MAX = 32767  # symbols are int16; zigzag code 0xFFFF (-32768) is never produced

_F16_MIN_NORMAL = float(np.finfo(np.float16).tiny)
_F16_MAX = float(np.finfo(np.float16).max)
_QUANT_ABS_MAX = 3.0e38  # above this, qmax * fp32(max / qmax) can round past float32 max to Inf


class PayloadTooLarge(CodecError):
    """The payload is larger than `Limits.max_payload_bytes`."""


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int = 8 << 20


@dataclass(frozen=True)
class TensorSpec:
    """What the receiver expects at each cut, built from the bundle manifest."""

    num_blocks: int  # L: cuts run 0..L
    num_tokens: int  # 1 (CLS) + patches
    width: int  # hidden size
    image_size: int  # model input side in pixels
    embed_dim: int

    @staticmethod
    def from_manifest(m: Any) -> TensorSpec:  # m: splitclip.bundle.Manifest
        v = m.vision
        return TensorSpec(v.num_blocks, v.num_tokens, v.width, v.image_size, m.embed_dim)

    def kind_at(self, cut: int) -> str:
        if not 0 <= cut <= self.num_blocks:
            raise CodecError(f"cut: {cut} is out of range, expected 0..{self.num_blocks}")
        return "image" if cut == 0 else "embedding" if cut == self.num_blocks else "hidden"


@dataclass(frozen=True)
class Preset:
    name: str
    dtype: str = "fp32"  # hidden-state values: "fp32" | "fp16" | "int8" | "int4" (int: symmetric per token)
    zstd: bool = False  # entropy-code the hidden-state body
    keep: float = 1.0  # fraction of patch tokens kept (CLS always kept); 1.0 = no pruning
    pca: float = 0.0  # PCA rank as a fraction of width (needs a Calibration); 0 = off
    jpeg_quality: int = 90  # cut 0; a lossless preset sends PNG instead
    zstd_level: int = 3
    klt: float = 0.0  # > 0: transform coding in the full PCA basis with global step `klt` (needs calibration)
    ans: bool = False  # klt symbols ANS-coded with the calibration's per-direction model instead of zstd
    doc: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in ("fp32", "fp16", "int8", "int4"):
            raise CodecError(f"preset {self.name}: dtype {self.dtype!r}, expected fp32/fp16/int8/int4")
        if self.klt < 0.0 or (self.klt > 0.0 and self.pca > 0.0):
            raise CodecError(f"preset {self.name}: expected klt >= 0, and not both klt and pca")
        if self.ans and (self.klt <= 0.0 or self.zstd):
            raise CodecError(f"preset {self.name}: ans needs klt > 0 and replaces zstd (expected zstd=False)")
        if not (0.0 < self.keep <= 1.0 and 0.0 <= self.pca <= 1.0 and 1 <= self.jpeg_quality <= 100):
            raise CodecError(
                f"preset {self.name}: expected 0 < keep <= 1, 0 <= pca <= 1, 1 <= jpeg_quality <= 100"
            )

    @property
    def needs_calibration(self) -> bool:
        """PCA / KLT presets code in the bundle's per-cut basis (calibration.npz) on both sides."""
        return self.pca > 0.0 or self.klt > 0.0

    @property
    def lossless(self) -> bool:
        return self.dtype == "fp32" and self.keep >= 1.0 and self.pca <= 0.0 and self.klt <= 0.0

    def rank(self, width: int) -> int:
        return 0 if self.pca <= 0.0 else max(1, min(width, round(self.pca * width)))

    def kept_patches(self, patches: int) -> int:
        return patches if self.keep >= 1.0 else max(1, min(patches, round(self.keep * patches)))


# Order is part of the wire format (header preset id = position + 1): append only.
_PRESET_LIST = (
    Preset("lossless", "fp32", doc="fp32 hidden / fp32 embedding / PNG image: bit-exact at every cut"),
    Preset("fp16", "fp16", doc="fp16 hidden and embedding, JPEG q90 image; 2x smaller than fp32"),
    Preset("int8", "int8", doc="int8 with a per-token scale; ~4x"),
    Preset("int8-zstd", "int8", zstd=True, doc="int8 per token + zstd; ~4-5x"),
    Preset("int4-zstd", "int4", zstd=True, doc="int4 per token (packed) + zstd; ~8x"),
    Preset(
        "int8-prune50-zstd", "int8", zstd=True, keep=0.5, doc="CLS + 50% most salient patches, int8 + zstd"
    ),
    Preset("int4-prune50-zstd", "int4", zstd=True, keep=0.5, doc="CLS + 50% of patches, int4 + zstd; ~16x"),
    Preset("pca25-int8-zstd", "int8", zstd=True, pca=0.25, doc="top 25% PCA directions, int8 + zstd; ~14x"),
    Preset(
        "pca12-int8-zstd", "int8", zstd=True, pca=0.125, doc="top 12.5% PCA directions, int8 + zstd; ~25x"
    ),
    Preset("pca25-int4-zstd", "int4", zstd=True, pca=0.25, doc="top 25% PCA directions, int4 + zstd; ~25x"),
    Preset(
        "klt-q10-zstd",
        "fp16",
        zstd=True,
        klt=0.10,
        zstd_level=9,
        doc="all PCA directions, step 0.10 * var^-1/4, CLS fp16, zstd; ~6x",
    ),
    Preset(
        "klt-q20-zstd",
        "fp16",
        zstd=True,
        klt=0.20,
        zstd_level=9,
        doc="all PCA directions, step 0.20 * var^-1/4, CLS fp16, zstd; ~8x",
    ),
    *(
        Preset(
            f"klt-q{round(q * 100):02d}-ans",
            "fp16",
            klt=q,
            ans=True,
            doc=f"all PCA directions, step {q:.2f} * var^-1/4, CLS fp16, ANS with the calibration's model",
        )
        for q in (0.10, 0.15, 0.20, 0.40)
    ),
)
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}
_PRESET_IDS = {p.name: i + 1 for i, p in enumerate(_PRESET_LIST)}


def get_preset(name: str | Preset) -> Preset:
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise CodecError(f"preset: unknown {name!r}, expected one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class Header:
    kind: int
    cut: int
    dtype: int
    flags: int
    preset_id: int
    dim0: int
    dim1: int
    dim2: int
    rank: int
    n_index: int
    n_scales: int
    raw_len: int
    body_len: int
    crc: int = 0

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC, VERSION, self.kind, self.cut, self.dtype, self.flags, self.preset_id,
            self.dim0, self.dim1, self.dim2, self.rank, self.n_index, self.n_scales,
            self.raw_len, self.body_len, self.crc,
        )  # fmt: skip


@dataclass(frozen=True)
class Decoded:
    cut: int
    kind: str  # "image" | "hidden" | "embedding"
    # image: uint8 [H, W, 3]; hidden: float32 [kept_tokens, width]; embedding: float32 [embed_dim]
    array: np.ndarray
    preset: str | None  # preset name recorded by the sender (informational)
    # hidden: original token position of each row when pruned (None = all tokens, in order)
    token_index: NDArray[np.int64] | None = None


# ---------------------------------------------------------------------------------------------- encode


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
    pid = _PRESET_IDS.get(p.name, 0)
    x = np.asarray(x)
    if kind == "image":
        return _encode_image(x, cut, spec, p, pid)
    if kind == "embedding":
        _expect_shape(x, (spec.embed_dim,), "embedding")
        dt = DT_FP32 if p.dtype == "fp32" else DT_FP16
        body = _float_body(x, dt, "embedding")
        return _frame(
            Header(KIND_EMBEDDING, cut, dt, 0, pid, spec.embed_dim, 0, 0, 0, 0, 0, len(body), 0), body
        )
    _expect_shape(x, (spec.num_tokens, spec.width), "hidden")
    return _encode_hidden(x.astype(np.float32, copy=False), cut, spec, p, pid, calibration)


def _expect_shape(x: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    if x.shape != shape:
        raise CodecError(f"{what}: input shape {x.shape}, expected {shape}")
    if x.dtype.kind != "f":
        raise CodecError(f"{what}: input dtype {x.dtype}, expected float32")
    if not np.isfinite(x).all():
        raise CodecError(f"{what}: input contains NaN or Inf")


def _float_body(x: np.ndarray, dt: int, what: str) -> bytes:
    if dt == DT_FP32:
        return np.ascontiguousarray(x, dtype="<f4").tobytes()
    if x.size and float(np.abs(x).max()) > _F16_MAX:
        raise CodecError(
            f"{what}: |value| up to {float(np.abs(x).max()):.3g} overflows fp16; use int8 or lossless"
        )
    return np.ascontiguousarray(x, dtype="<f2").tobytes()


def _encode_image(x: np.ndarray, cut: int, spec: TensorSpec, p: Preset, pid: int) -> bytes:
    s = spec.image_size
    if x.shape != (s, s, 3) or x.dtype != np.uint8:
        raise CodecError(f"image: input {x.dtype} {x.shape}, expected uint8 ({s}, {s}, 3)")
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(x), "RGB")
    if p.lossless:
        dt = DT_PNG
        img.save(buf, format="PNG", compress_level=6)
    else:
        dt = DT_JPEG
        img.save(buf, format="JPEG", quality=int(p.jpeg_quality))
    body = buf.getvalue()
    return _frame(Header(KIND_IMAGE, cut, dt, 0, pid, s, s, 3, 0, 0, 0, len(body), 0), body)


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


def _prune(x: NDArray[np.float32], keep_patches: int) -> NDArray[np.int64]:
    """Indices to keep: CLS + the `keep_patches` patches deviating most from the mean patch (sorted)."""
    patches = x[1:]  # [P, width]
    score = np.einsum("ij,ij->i", d := patches - patches.mean(axis=0), d)  # squared L2 deviation, [P]
    if keep_patches >= patches.shape[0]:
        top = np.arange(patches.shape[0])
    else:
        top = np.argpartition(-score, keep_patches - 1)[:keep_patches]
    return np.concatenate(([0], np.sort(top) + 1)).astype(np.int64)


def _encode_hidden(
    x: NDArray[np.float32], cut: int, spec: TensorSpec, p: Preset, pid: int, calibration: Calibration | None
) -> bytes:
    flags, parts = 0, []
    index = None
    if p.keep < 1.0:
        if spec.num_tokens > 0xFFFF:
            raise CodecError(f"hidden: {spec.num_tokens} tokens cannot be pruned (uint16 indices)")
        index = _prune(x, p.kept_patches(spec.num_tokens - 1))
        x = x[index]  # [1 + kept, width]
        flags |= FLAG_PRUNED
        parts.append(index.astype("<u2").tobytes())
    if p.klt > 0.0:
        return _encode_klt(x, cut, spec, p, pid, calibration, flags, parts, index)
    rank = p.rank(spec.width)
    if rank:
        if calibration is None:
            raise CodecError(f"preset {p.name} needs a Calibration (PCA basis for cut {cut}); none was given")
        mean, basis = _projection(calibration, cut, rank, spec.width)
        coeffs = (x[1:] - mean) @ basis  # [tokens - 1, rank]
        flags |= FLAG_PCA
    dt = _DTYPE_CODES[p.dtype]
    tokens = x.shape[0]
    if dt in _QMAX:
        if rank:
            # CLS row and coefficient rows quantised per row, then concatenated in body order
            q_cls, s_cls, n32a = _quantise(x[:1], _QMAX[dt])
            q_rest, s_rest, n32b = _quantise(coeffs.astype(np.float32, copy=False), _QMAX[dt])
            q_flat = np.concatenate((q_cls.reshape(-1), q_rest.reshape(-1)))
            scale, need32 = np.concatenate((s_cls, s_rest)), n32a or n32b
        else:
            q, scale, need32 = _quantise(x, _QMAX[dt])
            q_flat = q.reshape(-1)
        if need32:
            flags |= FLAG_SCALE32
        parts.append(scale.astype("<f4" if need32 else "<f2").tobytes())
        parts.append(q_flat.tobytes() if dt == DT_INT8 else _pack_int4(q_flat))
    else:
        vals = np.concatenate((x[0], coeffs.reshape(-1))) if rank else x
        parts.append(_float_body(vals, dt, "hidden"))
    raw = b"".join(parts)
    body = raw
    if p.zstd:
        packed = zstandard.ZstdCompressor(level=p.zstd_level, write_content_size=True).compress(raw)
        if len(packed) < len(raw):  # incompressible bodies go raw rather than grow
            body, flags = packed, flags | FLAG_ZSTD
    n_index = tokens if index is not None else 0
    n_scales = tokens if dt in _QMAX else 0
    h = Header(KIND_HIDDEN, cut, dt, flags, pid, tokens, spec.width, 0, rank, n_index, n_scales, len(raw), 0)
    return _frame(h, body)


_F32 = NDArray[np.float32]


def _klt_tables(cal: Calibration | None, cut: int, width: int, what: str) -> tuple[_F32, _F32, _F32, _F32]:
    """(mean, full basis [width, width], relative steps, variances) for the klt codecs at `cut`; the
    vectors are [width]."""
    if cal is None:
        raise CodecError(f"{what}: klt needs a Calibration (PCA basis for cut {cut}); none was given")
    mean, basis = _projection(cal, cut, width, width)
    rel = cal.klt_steps(cut)  # raises if the variances are missing
    return mean, basis, rel, cal.variances[cut]


def _encode_klt(
    x: NDArray[np.float32],
    cut: int,
    spec: TensorSpec,
    p: Preset,
    pid: int,
    calibration: Calibration | None,
    flags: int,
    parts: list[bytes],
    index: NDArray[np.int64] | None,
) -> bytes:
    width, tokens = spec.width, x.shape[0]
    mean, basis, rel, var = _klt_tables(calibration, cut, width, f"preset {p.name}")
    step = np.float32(p.klt) * rel  # [width]
    with np.errstate(over="ignore", invalid="ignore"):
        sym = np.rint(((x[1:] - mean) @ basis) / step)  # [tokens - 1, width]
    if sym.size and not float(np.abs(sym).max()) <= _KLT_SYM_MAX:  # also catches NaN / Inf
        raise CodecError(
            f"hidden: KLT coefficient / step up to {float(np.abs(sym).max()):.3g}, "
            f"expected at most {_KLT_SYM_MAX} (int16 symbols)"
        )
    flags |= FLAG_KLT
    n_index = tokens if index is not None else 0
    parts.append(struct.pack("<f", float(p.klt)))
    cls = _float_body(x[0], DT_FP16, "hidden (CLS)")
    if p.ans:
        stds = entropy.model_stds(var, step)  # [width]
        k, words = entropy.encode_symbols(sym.astype(np.int32), stds)
        crc = zlib.crc32(sym.astype("<i2").tobytes())
        raw = b"".join((*parts, struct.pack("<HI", k, crc), cls, words))
        h = Header(KIND_HIDDEN, cut, DT_KLTANS, flags, pid, tokens, width, 0, width, n_index, 0, len(raw), 0)
        return _frame(h, raw)
    s32 = np.ascontiguousarray(sym.T, dtype=np.int32)  # coefficient-major [width, tokens - 1]
    zz = ((s32 << 1) ^ (s32 >> 31)).astype(np.uint16)  # zigzag: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ...
    parts.append(cls)
    parts.append((zz & 0xFF).astype(np.uint8).tobytes())
    parts.append((zz >> 8).astype(np.uint8).tobytes())
    raw = b"".join(parts)
    body = raw
    if p.zstd:
        packed = zstandard.ZstdCompressor(level=p.zstd_level, write_content_size=True).compress(raw)
        if len(packed) < len(raw):
            body, flags = packed, flags | FLAG_ZSTD
    h = Header(KIND_HIDDEN, cut, DT_KLT16, flags, pid, tokens, width, 0, width, n_index, 0, len(raw), 0)
    return _frame(h, body)


def _projection(
    cal: Calibration, cut: int, rank: int, width: int
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    if cal.width != width:
        raise CodecError(f"calibration: width {cal.width}, expected {width} (the bundle's vision.width)")
    return cal.projection(cut, rank)


def _frame(h: Header, body: bytes) -> bytes:
    h = replace(h, body_len=len(body), crc=0)
    return replace(h, crc=zlib.crc32(body, zlib.crc32(h.pack()))).pack() + body


# ---------------------------------------------------------------------------------------------- decode


def read_header(payload: bytes) -> Header:
    """Parse (without validating against a spec) the fixed header of a payload."""
    if len(payload) < HEADER_SIZE:
        raise CodecError(f"header: payload is {len(payload)} bytes, expected at least {HEADER_SIZE}")
    magic, version, *fields = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise CodecError(f"header.magic: {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"header.version: {version}, expected {VERSION}")
    return Header(*fields)


def decode(
    payload: bytes,
    *,
    cut: int,
    spec: TensorSpec,
    calibration: Calibration | None = None,
    limits: Limits = Limits(),  # frozen, so a shared default is safe
) -> Decoded:
    """Decode and fully validate a payload for `cut` (the Frame's cut). Raises only CodecError."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"payload: {type(payload).__name__}, expected bytes")
    payload = bytes(payload)
    if len(payload) > limits.max_payload_bytes:
        raise PayloadTooLarge(f"payload: {len(payload)} bytes, expected at most {limits.max_payload_bytes}")
    kind = spec.kind_at(cut)
    h = read_header(payload)
    if h.cut != cut:
        raise CodecError(f"header.cut: {h.cut}, expected {cut} (the frame's cut)")
    if KIND_NAMES.get(h.kind) != kind:
        raise CodecError(f"header.kind: {KIND_NAMES.get(h.kind, h.kind)!r}, expected {kind!r} at cut {cut}")
    if h.dtype not in _KIND_DTYPES[h.kind]:
        allowed = "/".join(DTYPE_NAMES[d] for d in _KIND_DTYPES[h.kind])
        raise CodecError(f"header.dtype: code {h.dtype}, expected one of {allowed} for {kind}")
    if h.body_len != len(payload) - HEADER_SIZE:
        raise CodecError(
            f"header.body_len: {h.body_len}, expected {len(payload) - HEADER_SIZE} (bytes after header)"
        )
    body = payload[HEADER_SIZE:]
    crc = zlib.crc32(body, zlib.crc32(replace(h, crc=0).pack()))
    if crc != h.crc:
        raise CodecError(f"header.crc32: {h.crc:#010x}, expected {crc:#010x} (payload corrupted)")
    preset = _PRESET_LIST[h.preset_id - 1].name if 1 <= h.preset_id <= len(_PRESET_LIST) else None
    if h.kind == KIND_IMAGE:
        return Decoded(cut, kind, _decode_image(h, body, spec), preset)
    if h.kind == KIND_EMBEDDING:
        _expect_fields(h, flags=0, dim0=spec.embed_dim, dim1=0, dim2=0, rank=0, n_index=0, n_scales=0)
        _expect_fields(h, raw_len=spec.embed_dim * (4 if h.dtype == DT_FP32 else 2))
        if len(body) != h.raw_len:
            raise CodecError(f"body: {len(body)} bytes, expected {h.raw_len} (header.raw_len)")
        arr = _read_floats(body, h.dtype, 0, spec.embed_dim, "embedding")
        return Decoded(cut, kind, arr, preset)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to Inf is caught as a CodecError
        arr, index = _decode_hidden(h, body, spec, calibration)
    return Decoded(cut, kind, arr, preset, index)


_DIM_LABELS = {
    KIND_IMAGE: {"dim0": "height", "dim1": "width", "dim2": "channels"},
    KIND_HIDDEN: {"dim0": "tokens", "dim1": "width"},
    KIND_EMBEDDING: {"dim0": "embed_dim"},
}


def _expect_fields(h: Header, **expected: int) -> None:
    for name, want in expected.items():
        got = getattr(h, name)
        if got != want:
            label = _DIM_LABELS[h.kind].get(name)
            raise CodecError(f"header.{name}{f' ({label})' if label else ''}: {got}, expected {want}")


def _read_floats(buf: bytes, dt: int, offset: int, count: int, what: str) -> NDArray[np.float32]:
    a = np.frombuffer(buf, dtype="<f4" if dt == DT_FP32 else "<f2", count=count, offset=offset)
    out = a.astype(np.float32)  # always a fresh, writable, native-order copy
    if not np.isfinite(out).all():
        raise CodecError(f"{what}: decoded values contain NaN or Inf")
    return out


def _decode_image(h: Header, body: bytes, spec: TensorSpec) -> NDArray[np.uint8]:
    s = spec.image_size
    _expect_fields(h, flags=0, dim0=s, dim1=s, dim2=3, rank=0, n_index=0, n_scales=0, raw_len=len(body))
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
    return arr


def _decode_hidden(
    h: Header, body: bytes, spec: TensorSpec, calibration: Calibration | None
) -> tuple[NDArray[np.float32], NDArray[np.int64] | None]:
    if h.flags & ~_ALL_FLAGS:
        raise CodecError(f"header.flags: {h.flags:#x} has unknown bits, expected a subset of {_ALL_FLAGS:#x}")
    pruned, pca, zstd = bool(h.flags & FLAG_PRUNED), bool(h.flags & FLAG_PCA), bool(h.flags & FLAG_ZSTD)
    klt = h.dtype in (DT_KLT16, DT_KLTANS)
    if bool(h.flags & FLAG_KLT) != klt:
        raise CodecError(
            f"header.flags: klt flag {'set' if h.flags & FLAG_KLT else 'clear'} with dtype "
            f"{DTYPE_NAMES[h.dtype]}, expected it set exactly for klt16/kltans"
        )
    if klt and h.flags & (FLAG_PCA | FLAG_SCALE32):
        raise CodecError(f"header.flags: {h.flags:#x} combines klt with pca/scale32, expected neither")
    if h.dtype == DT_KLTANS and zstd:
        raise CodecError(f"header.flags: {h.flags:#x} sets zstd with dtype kltans, expected it clear")
    quant = h.dtype in _QMAX
    if h.flags & FLAG_SCALE32 and not quant:
        raise CodecError(
            f"header.flags: scale32 set for dtype {DTYPE_NAMES[h.dtype]}, expected only for int8/int4"
        )
    _expect_fields(h, dim1=spec.width, dim2=0)
    tokens, width = h.dim0, spec.width
    if pruned:
        if not 1 <= tokens <= spec.num_tokens:
            raise CodecError(f"header.dim0 (tokens, pruned): {tokens}, expected 1..{spec.num_tokens}")
        _expect_fields(h, n_index=tokens)
    else:
        _expect_fields(h, dim0=spec.num_tokens, n_index=0)
    _expect_fields(h, n_scales=tokens if quant else 0)
    if klt:
        if tokens < 1:
            raise CodecError(f"header.dim0 (tokens): {tokens}, expected at least 1 (CLS)")
        _expect_fields(h, rank=width)
        if h.dtype == DT_KLTANS:
            return _decode_kltans(h, body, spec, tokens, calibration)
        raw_len = 2 * h.n_index + 4 + 2 * width + 2 * (tokens - 1) * width
        _expect_fields(h, raw_len=raw_len)
        raw = _unzstd(body, raw_len) if zstd else body
        if len(raw) != raw_len:
            raise CodecError(f"body: {len(raw)} bytes, expected {raw_len} (header.raw_len)")
        index = _read_index(raw, tokens, spec) if pruned else None
        return _decode_klt(raw, 2 * h.n_index, h.cut, tokens, width, calibration), index
    if pca:
        if not 1 <= h.rank <= width:
            raise CodecError(f"header.rank: {h.rank}, expected 1..{width} with the pca flag")
    else:
        _expect_fields(h, rank=0)
    n_vals = width + (tokens - 1) * h.rank if pca else tokens * width
    data_len = {DT_FP32: 4 * n_vals, DT_FP16: 2 * n_vals, DT_INT8: n_vals, DT_INT4: (n_vals + 1) // 2}
    scale_size = 4 if h.flags & FLAG_SCALE32 else 2
    raw_len = 2 * h.n_index + scale_size * h.n_scales + data_len[h.dtype]
    _expect_fields(h, raw_len=raw_len)
    raw = _unzstd(body, raw_len) if zstd else body
    if len(raw) != raw_len:
        raise CodecError(f"body: {len(raw)} bytes, expected {raw_len} (header.raw_len)")

    off = 0
    index = None
    if pruned:
        index = _read_index(raw, tokens, spec)
        off += 2 * tokens
    if quant:
        sdt = "<f4" if scale_size == 4 else "<f2"
        scale = np.frombuffer(raw, sdt, count=tokens, offset=off).astype(np.float32)
        off += scale_size * tokens
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise CodecError("scales: NaN, Inf or negative, expected finite values >= 0")
        q = _read_ints(raw, h.dtype, off, n_vals)  # [n_vals] int8
        qf = q.astype(np.float32)
        if pca:
            cls = qf[:width] * scale[0]  # [width]
            coeffs = qf[width:].reshape(tokens - 1, h.rank) * scale[1:, None]  # [tokens - 1, rank]
        else:
            x = qf.reshape(tokens, width) * scale[:, None]  # [tokens, width]
    else:
        vals = _read_floats(raw, h.dtype, off, n_vals, "hidden")
        if pca:
            cls, coeffs = vals[:width], vals[width:].reshape(tokens - 1, h.rank)
        else:
            x = vals.reshape(tokens, width)
    if pca:
        if calibration is None:
            raise CodecError(
                f"header.flags: pca frame for cut {h.cut} but no Calibration was given to decode"
            )
        mean, basis = _projection(calibration, h.cut, h.rank, width)
        x = np.empty((tokens, width), np.float32)
        x[0] = cls
        x[1:] = coeffs @ basis.T + mean
    if not np.isfinite(x).all():
        raise CodecError("hidden: decoded values contain NaN or Inf")
    return np.ascontiguousarray(x, dtype=np.float32), index


def _read_index(raw: bytes, tokens: int, spec: TensorSpec) -> NDArray[np.int64]:
    index = np.frombuffer(raw, "<u2", count=tokens).astype(np.int64)
    if index[0] != 0:
        raise CodecError(f"indices[0]: {index[0]}, expected 0 (CLS always kept first)")
    if tokens > 1 and not (np.diff(index) > 0).all():
        raise CodecError("indices: not strictly increasing")
    if index[-1] >= spec.num_tokens:
        raise CodecError(f"indices: max {index[-1]}, expected < {spec.num_tokens} (num_tokens)")
    return index


def _decode_klt(
    raw: bytes, off: int, cut: int, tokens: int, width: int, calibration: Calibration | None
) -> NDArray[np.float32]:
    q = _read_step(raw, off)
    off += 4
    cls = _read_floats(raw, DT_FP16, off, width, "hidden (CLS)")
    off += 2 * width
    n = (tokens - 1) * width
    lo = np.frombuffer(raw, np.uint8, count=n, offset=off).astype(np.uint16)
    hi = np.frombuffer(raw, np.uint8, count=n, offset=off + n).astype(np.uint16)
    zz = lo | (hi << 8)
    if (zz == 0xFFFF).any():
        raise CodecError("klt symbols: zigzag code 65535 (-32768) found, expected -32767..32767")
    z32 = zz.astype(np.int32)
    sym = ((z32 >> 1) ^ -(z32 & 1)).reshape(width, tokens - 1)  # [width, tokens - 1]
    mean, basis, rel, _ = _klt_tables(calibration, cut, width, "header.dtype: klt16")
    return _klt_reconstruct(cls, np.ascontiguousarray(sym.T), np.float32(q) * rel, mean, basis)


def _decode_kltans(
    h: Header, body: bytes, spec: TensorSpec, tokens: int, calibration: Calibration | None
) -> tuple[NDArray[np.float32], NDArray[np.int64] | None]:
    width = spec.width
    fixed = 2 * h.n_index + 4 + 2 + 4 + 2 * width  # indices, step, K, crc32, CLS row; ANS words follow
    if h.raw_len != len(body):
        raise CodecError(f"header.raw_len: {h.raw_len}, expected {len(body)} (kltans bodies are not zstd)")
    if len(body) < fixed or (len(body) - fixed) % 4:
        raise CodecError(
            f"body: {len(body)} bytes, expected {fixed} + 4 * n (indices, step, K, crc32, CLS, u32 ANS words)"
        )
    index = _read_index(body, tokens, spec) if h.n_index else None
    off = 2 * h.n_index
    q = _read_step(body, off)
    k, crc = struct.unpack_from("<HI", body, off + 4)
    cls = _read_floats(body, DT_FP16, off + 10, width, "hidden (CLS)")
    mean, basis, rel, var = _klt_tables(calibration, h.cut, width, "header.dtype: kltans")
    step = np.float32(q) * rel  # [width]
    stds = entropy.model_stds(var, step)  # [width]
    sym = entropy.decode_symbols(body[fixed:], k, tokens - 1, stds)  # [tokens - 1, width]
    if (got := zlib.crc32(sym.astype("<i2").tobytes())) != crc:
        raise CodecError(
            f"kltans symbols: crc32 {got:#010x}, expected {crc:#010x} (the ANS model differs from the "
            "encoder's: same bundle, codec version and float maths needed on both sides)"
        )
    return _klt_reconstruct(cls, sym, step, mean, basis), index


def _read_step(raw: bytes, off: int) -> float:
    (q,) = struct.unpack_from("<f", raw, off)
    if not (np.isfinite(q) and q > 0.0):
        raise CodecError(f"klt step: {q}, expected a finite value > 0")
    return float(q)


def _klt_reconstruct(
    cls: NDArray[np.float32],
    sym: NDArray[np.int32],
    step: NDArray[np.float32],
    mean: NDArray[np.float32],
    basis: NDArray[np.float32],
) -> NDArray[np.float32]:
    """Tokens [1 + rows, width] from the CLS row [width] and symbols [rows, width] in the KLT basis."""
    x = np.empty((1 + sym.shape[0], cls.shape[0]), np.float32)
    x[0] = cls
    x[1:] = (sym.astype(np.float32) * step) @ basis.T + mean
    if not np.isfinite(x).all():
        raise CodecError("hidden: decoded values contain NaN or Inf")
    return x


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


def _unzstd(body: bytes, raw_len: int) -> bytes:
    # A zstd frame may declare any content size and decompress() trusts it over max_output_size, so the
    # declared size is checked first; the single frame must also consume the whole body.
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

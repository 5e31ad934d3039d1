"""The frame around every body: the 48-byte header, its codes and flags, crc32, and strict reading.

    magic "SCLP" | version u8 | kind u8 | cut u16 | dtype u8 | flags u8 | preset u8 | pad u8
    dim0 u32 | dim1 u32 | dim2 u32 | rank u32 | n_index u32 | n_scales u32 | raw_len u32 | body_len u32 | crc32 u32

All little-endian. kind says what crossed the split (image at cut 0, hidden states at 0 < k < L, the
embedding at cut L); dtype says how the body codes it (the body modules: image, dense, klt). crc32 covers
the header (with crc32 = 0) and the stored body. raw_len is the body size before zstd.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace
from typing import Any

from splitclip.codec.errors import CodecError, PayloadTooLarge

MAGIC = b"SCLP"
VERSION = 1
_HEADER = struct.Struct("<4sBBHBBBx9I")
HEADER_SIZE = _HEADER.size  # 48

KIND_IMAGE, KIND_HIDDEN, KIND_EMBEDDING = 0, 1, 2
KIND_NAMES = {KIND_IMAGE: "image", KIND_HIDDEN: "hidden", KIND_EMBEDDING: "embedding"}

DT_FP32, DT_FP16, DT_INT8, DT_INT4, DT_JPEG, DT_PNG, DT_KLT16, DT_KLTANS = 0, 1, 2, 3, 4, 5, 6, 7
DT_WEBP = 8  # appended with the cut-0 image presets (lossy or lossless WebP file bytes)
DTYPE_NAMES = {
    DT_FP32: "fp32",
    DT_FP16: "fp16",
    DT_INT8: "int8",
    DT_INT4: "int4",
    DT_JPEG: "jpeg",
    DT_PNG: "png",
    DT_KLT16: "klt16",
    DT_KLTANS: "kltans",
    DT_WEBP: "webp",
}
DTYPE_CODES = {v: k for k, v in DTYPE_NAMES.items()}
# the dtypes each kind may carry, in the order error messages list them
KIND_DTYPES = {
    KIND_IMAGE: (DT_JPEG, DT_PNG, DT_WEBP),
    KIND_HIDDEN: (DT_FP32, DT_FP16, DT_INT8, DT_INT4, DT_KLT16, DT_KLTANS),
    KIND_EMBEDDING: (DT_FP32, DT_FP16),
}

FLAG_ZSTD, FLAG_PRUNED, FLAG_PCA, FLAG_SCALE32, FLAG_KLT = 1, 2, 4, 8, 16
ALL_FLAGS = FLAG_ZSTD | FLAG_PRUNED | FLAG_PCA | FLAG_SCALE32 | FLAG_KLT


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


def _crc(h: Header, body: bytes) -> int:
    return zlib.crc32(body, zlib.crc32(replace(h, crc=0).pack()))


def frame(h: Header, body: bytes) -> bytes:
    """The payload: `h` with body_len and crc32 filled in, then `body`."""
    h = replace(h, body_len=len(body), crc=0)
    return replace(h, crc=_crc(h, body)).pack() + body


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


def read_frame(payload: object, cut: int, spec: TensorSpec, limits: Limits) -> tuple[Header, bytes]:
    """(header, body) of a payload for `cut`, once its size, placement, dtype, length and crc32 check out;
    what the body says is for its body format to check."""
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
    if h.dtype not in KIND_DTYPES[h.kind]:
        allowed = "/".join(DTYPE_NAMES[d] for d in KIND_DTYPES[h.kind])
        raise CodecError(f"header.dtype: code {h.dtype}, expected one of {allowed} for {kind}")
    if h.body_len != len(payload) - HEADER_SIZE:
        raise CodecError(
            f"header.body_len: {h.body_len}, expected {len(payload) - HEADER_SIZE} (bytes after header)"
        )
    body = payload[HEADER_SIZE:]
    if (crc := _crc(h, body)) != h.crc:
        raise CodecError(f"header.crc32: {h.crc:#010x}, expected {crc:#010x} (payload corrupted)")
    return h, body


_DIM_LABELS = {
    KIND_IMAGE: {"dim0": "height", "dim1": "width", "dim2": "channels"},
    KIND_HIDDEN: {"dim0": "tokens", "dim1": "width"},
    KIND_EMBEDDING: {"dim0": "embed_dim"},
}


def expect_fields(h: Header, **expected: int) -> None:
    """CodecError naming the first header field that is not as expected."""
    for name, want in expected.items():
        got = getattr(h, name)
        if got != want:
            label = _DIM_LABELS[h.kind].get(name)
            raise CodecError(f"header.{name}{f' ({label})' if label else ''}: {got}, expected {want}")

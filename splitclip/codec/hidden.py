"""What every hidden-state body (dense or KLT) shares: token pruning, kept-token indices, header checks.

A pruned body (FLAG_PRUNED) starts with the kept token positions, u16 x n_index, increasing, first 0 (CLS).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from splitclip.codec.errors import CodecError
from splitclip.codec.frame import (
    ALL_FLAGS,
    DT_INT4,
    DT_INT8,
    DT_KLT16,
    DT_KLTANS,
    DTYPE_NAMES,
    FLAG_KLT,
    FLAG_PCA,
    FLAG_PRUNED,
    FLAG_SCALE32,
    FLAG_ZSTD,
    Header,
    TensorSpec,
    expect_fields,
)
from splitclip.codec.presets import Preset


def prune(
    x: NDArray[np.float32], spec: TensorSpec, p: Preset
) -> tuple[NDArray[np.float32], NDArray[np.int64] | None]:
    """The rows of x [tokens, width] the preset keeps, and their positions (None: all rows, in order)."""
    if p.keep >= 1.0:
        return x, None
    if spec.num_tokens > 0xFFFF:
        raise CodecError(f"hidden: {spec.num_tokens} tokens cannot be pruned (uint16 indices)")
    index = _salient(x, p.kept_patches(spec.num_tokens - 1))
    return x[index], index  # [1 + kept, width]


def _salient(x: NDArray[np.float32], keep_patches: int) -> NDArray[np.int64]:
    """Indices to keep: CLS + the `keep_patches` patches deviating most from the mean patch (sorted)."""
    patches = x[1:]  # [P, width]
    score = np.einsum("ij,ij->i", d := patches - patches.mean(axis=0), d)  # squared L2 deviation, [P]
    if keep_patches >= patches.shape[0]:
        top = np.arange(patches.shape[0])
    else:
        top = np.argpartition(-score, keep_patches - 1)[:keep_patches]
    return np.concatenate(([0], np.sort(top) + 1)).astype(np.int64)


def index_part(index: NDArray[np.int64] | None) -> tuple[int, bytes]:
    """(flags, leading body bytes) for the kept positions `prune` returned."""
    return (0, b"") if index is None else (FLAG_PRUNED, index.astype("<u2").tobytes())


def read_index(raw: bytes, tokens: int, spec: TensorSpec) -> NDArray[np.int64]:
    index = np.frombuffer(raw, "<u2", count=tokens).astype(np.int64)
    if index[0] != 0:
        raise CodecError(f"indices[0]: {index[0]}, expected 0 (CLS always kept first)")
    if tokens > 1 and not (np.diff(index) > 0).all():
        raise CodecError("indices: not strictly increasing")
    if index[-1] >= spec.num_tokens:
        raise CodecError(f"indices: max {index[-1]}, expected < {spec.num_tokens} (num_tokens)")
    return index


def check_header(h: Header, spec: TensorSpec) -> int:
    """Check what every hidden-state header must satisfy, whatever its dtype; returns its token count."""
    if h.flags & ~ALL_FLAGS:
        raise CodecError(f"header.flags: {h.flags:#x} has unknown bits, expected a subset of {ALL_FLAGS:#x}")
    klt = h.dtype in (DT_KLT16, DT_KLTANS)
    if bool(h.flags & FLAG_KLT) != klt:
        raise CodecError(
            f"header.flags: klt flag {'set' if h.flags & FLAG_KLT else 'clear'} with dtype "
            f"{DTYPE_NAMES[h.dtype]}, expected it set exactly for klt16/kltans"
        )
    if klt and h.flags & (FLAG_PCA | FLAG_SCALE32):
        raise CodecError(f"header.flags: {h.flags:#x} combines klt with pca/scale32, expected neither")
    if h.dtype == DT_KLTANS and h.flags & FLAG_ZSTD:
        raise CodecError(f"header.flags: {h.flags:#x} sets zstd with dtype kltans, expected it clear")
    quant = h.dtype in (DT_INT8, DT_INT4)  # the dtypes with per-token scales
    if h.flags & FLAG_SCALE32 and not quant:
        raise CodecError(
            f"header.flags: scale32 set for dtype {DTYPE_NAMES[h.dtype]}, expected only for int8/int4"
        )
    expect_fields(h, dim1=spec.width, dim2=0)
    tokens = h.dim0
    if h.flags & FLAG_PRUNED:
        if not 1 <= tokens <= spec.num_tokens:
            raise CodecError(f"header.dim0 (tokens, pruned): {tokens}, expected 1..{spec.num_tokens}")
        expect_fields(h, n_index=tokens)
    else:
        expect_fields(h, dim0=spec.num_tokens, n_index=0)
    expect_fields(h, n_scales=tokens if quant else 0)
    return tokens

"""Fuzz splitclip.codec.decode: every random or mutated frame ends in CodecError or a valid array."""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Iterator
from dataclasses import fields, replace

import numpy as np
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitclip.codec import (
    FLAG_ZSTD,
    HEADER_SIZE,
    MAGIC,
    PRESETS,
    VERSION,
    Calibration,
    CodecError,
    Decoded,
    Header,
    Limits,
    Preset,
    TensorSpec,
    decode,
    encode,
    fit_calibration,
    read_header,
)

SPEC = TensorSpec(num_blocks=4, num_tokens=17, width=25, image_size=32, embed_dim=12)
OTHER_SPECS = [
    replace(SPEC, width=24),
    replace(SPEC, num_tokens=16),
    replace(SPEC, image_size=16),
    replace(SPEC, embed_dim=13),
    replace(SPEC, num_blocks=3),
]
_rng = np.random.default_rng(0)
CAL = fit_calibration({k: _rng.normal(size=(200, SPEC.width)).astype(np.float32) for k in (1, 2, 3)})
CAL_OTHER = fit_calibration({2: _rng.normal(size=(200, SPEC.width)).astype(np.float32)})
CALS: list[Calibration | None] = [CAL, CAL, CAL, None, CAL_OTHER]
# combinations no named preset uses, so the fuzzer reaches them too
COMBOS = [
    Preset("x-int4-prune30-pca50", "int4", zstd=True, keep=0.3, pca=0.5),
    Preset("x-fp16-pca25", "fp16", pca=0.25),
    Preset("x-fp32-prune70", "fp32", keep=0.7, zstd=True),
    Preset("x-klt-prune50", "fp16", zstd=True, keep=0.5, klt=0.3),
    Preset("x-klt-raw", "fp16", klt=0.5),
    Preset("x-kltans-prune50", "fp16", keep=0.5, klt=0.3, ans=True),
]
DT_KLTANS = 7
HEADER_FIELDS = [f.name for f in fields(Header)]
FIELD_BITS = {"kind": 8, "dtype": 8, "flags": 8, "preset_id": 8, "cut": 16}


def _inputs(seed: int) -> Iterator[tuple[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    s = SPEC.image_size
    yield 0, rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    g = np.linspace(0, 255, s)
    yield 0, np.stack([np.add.outer(g, g) / 2] * 3, -1).astype(np.uint8)
    for cut in (1, 2, 3):
        x = rng.normal(size=(SPEC.num_tokens, SPEC.width)).astype(np.float32)
        yield cut, x
        yield cut, np.round(x * 2).astype(np.float32)  # compressible
        tiny = x.copy()
        tiny[3] *= np.float32(1e-30)  # forces fp32 scales
        yield cut, tiny
    yield SPEC.num_blocks, rng.normal(size=SPEC.embed_dim).astype(np.float32)


def _corpus() -> list[tuple[int, bytes]]:
    out = []
    for cut, x in _inputs(1):
        for preset in [*PRESETS.values(), *COMBOS]:
            out.append((cut, encode(x, cut=cut, spec=SPEC, preset=preset, calibration=CAL)))
    return out


CORPUS = _corpus()


def _refresh(h: Header, body: bytes) -> bytes:
    h = replace(h, crc=0)
    return replace(h, crc=zlib.crc32(body, zlib.crc32(h.pack()))).pack() + body


def _forge(payload: bytes, body: bytes | None = None, **edits: int) -> bytes:
    h = read_header(payload)
    body = payload[HEADER_SIZE:] if body is None else body
    return _refresh(replace(h, body_len=len(body), **edits), body)


def _flip(r: random.Random, data: bytes, n: int) -> bytes:
    b = bytearray(data)
    for _ in range(n):
        if b:
            i = r.randrange(len(b))
            b[i] ^= 1 << r.randrange(8)
    return bytes(b)


def _field_value(r: random.Random, name: str, old: int) -> int:
    bits = FIELD_BITS.get(name, 32)
    top = (1 << bits) - 1
    return (
        r.choice(
            [0, 1, 2, 3, 8, 16, 17, 24, 25, 26, 32, top, top - 1, r.randrange(top + 1), old + 1, old - 1]
        )
        & top
    )


def _mutate(r: random.Random, payload: bytes) -> bytes:
    body = payload[HEADER_SIZE:]
    try:
        h = read_header(payload)
    except CodecError:  # an earlier round broke the header: keep flipping bits
        return _flip(r, payload, r.randint(1, 8))
    if h.dtype == DT_KLTANS and r.random() < 0.3:
        return _mutate_kltans(r, payload, h, body)
    op = r.randrange(11)
    if op == 0:  # raw bit flips: mostly caught by the crc
        return _flip(r, payload, r.randint(1, 8))
    if op == 1:  # bit flips in the body with a valid crc
        return _forge(payload, _flip(r, body, r.randint(1, 4)))
    if op == 2:  # truncation
        return payload[: r.randrange(len(payload) + 1)]
    if op == 3:  # truncated body, header made consistent
        return _forge(payload, body[: r.randrange(len(body) + 1)])
    if op == 4:  # extension
        tail = r.randbytes(r.randint(1, 64))
        return payload + tail if r.random() < 0.5 else _forge(payload, body + tail)
    if op in (5, 6):  # header field edits with a valid crc (one or several)
        edits = {}
        for _ in range(r.choice([1, 1, 2, 3])):
            name = r.choice(HEADER_FIELDS[:-2])  # not body_len / crc (kept consistent)
            edits[name] = _field_value(r, name, getattr(h, name))
        return _refresh(replace(h, **edits), body)
    if op == 7:  # mutate the decompressed body and re-compress, to reach the checks below zstd
        try:  # (an earlier round may have left a zstd bomb here: only small declared sizes)
            small = h.flags & FLAG_ZSTD and 0 <= zstandard.frame_content_size(body) < 1 << 20
            raw = zstandard.ZstdDecompressor().decompress(body) if small else b""
        except zstandard.ZstdError:
            raw = b""
        if raw:
            raw = _flip(r, raw, r.randint(1, 4)) if r.random() < 0.7 else raw[: r.randrange(len(raw) + 1)]
            return _forge(payload, zstandard.ZstdCompressor().compress(raw))
        return _forge(payload, _flip(r, body, 1))
    if op == 8:  # random body of random size
        return _forge(payload, r.randbytes(r.randint(0, 2 * len(body) + 8)))
    if op == 9:  # random bytes, sometimes behind a valid magic/version
        junk = r.randbytes(r.randint(0, 600))
        return MAGIC + bytes([VERSION]) + junk if r.random() < 0.5 else junk
    # a plausible header with a random body and a correct crc
    fake = Header(**{n: _field_value(r, n, 0) for n in HEADER_FIELDS[:-2]}, body_len=len(body))
    return _refresh(fake, body)


def _mutate_kltans(r: random.Random, payload: bytes, h: Header, body: bytes) -> bytes:
    """Edits that keep a kltans body well-formed in length, so they reach the ANS decoder."""
    k_off = 2 * h.n_index + 4  # after the indices and the step
    fixed = k_off + 2 + 4 + 2 * SPEC.width  # K u16, symbols crc32, CLS fp16 row; then the ANS words
    if len(body) < fixed:
        return _forge(payload, _flip(r, body, 1))
    head, words = bytearray(body[:fixed]), body[fixed:]
    op = r.randrange(6)
    if op == 0:  # another K
        k = r.choice([0, 1, 2, 32767, 32768, 65535, r.randrange(65536)])
        head[k_off : k_off + 2] = k.to_bytes(2, "little")
    elif op == 1:  # a word less, at either end
        words = words[4:] if r.random() < 0.5 else words[:-4]
    elif op == 2:  # a random word more, at either end
        w = r.randbytes(4)
        words = w + words if r.random() < 0.5 else words + w
    elif op == 3:  # random words of the same count
        words = r.randbytes(len(words))
    elif op == 4:  # bit flips in the words only
        words = _flip(r, words, r.randint(1, 3))
    else:  # another step: the decoder's model no longer matches the encoder's
        head[2 * h.n_index : 2 * h.n_index + 4] = struct.pack("<f", r.choice([0.01, 0.2, 1.0, 1e-30, 1e30]))
    b = bytes(head) + words
    return _forge(payload, b, raw_len=len(b))


def _check(d: Decoded, cut: int, spec: TensorSpec) -> None:
    a = d.array
    assert d.cut == cut and d.kind == spec.kind_at(cut)
    if d.kind == "image":
        assert a.dtype == np.uint8 and a.shape == (spec.image_size, spec.image_size, 3)
        return
    assert a.dtype == np.float32 and np.isfinite(a).all()
    if d.kind == "embedding":
        assert a.shape == (spec.embed_dim,)
        return
    assert a.ndim == 2 and a.shape[1] == spec.width and 1 <= a.shape[0] <= spec.num_tokens
    if d.token_index is None:
        assert a.shape[0] == spec.num_tokens
    else:
        assert d.token_index.shape == (a.shape[0],) and d.token_index[0] == 0


def _try(
    payload: bytes, cut: int, spec: TensorSpec, cal: Calibration | None, limits: Limits | None = None
) -> str:
    try:
        d = decode(payload, cut=cut, spec=spec, calibration=cal, limits=limits or Limits())
    except CodecError:
        return "rejected"
    _check(d, cut, spec)
    return "decoded"


def test_corpus_decodes() -> None:
    for cut, payload in CORPUS:
        assert _try(payload, cut, SPEC, CAL) == "decoded"


def test_fuzz_20k_frames() -> None:
    r = random.Random(12345)
    outcomes = {"rejected": 0, "decoded": 0}
    Job = tuple[bytes, int, TensorSpec, Calibration | None, Limits | None]
    jobs: list[Job] = []
    for _ in range(20_000):
        cut, payload = r.choice(CORPUS)
        jobs.append((_mutate(r, payload), cut, SPEC, CAL, None))
    for cut, payload in CORPUS:  # valid frames for the wrong cut / spec / calibration / limit
        for spec, cal in zip(OTHER_SPECS, CALS, strict=True):
            jobs.append((payload, min(cut, spec.num_blocks), spec, cal, None))
        jobs.append((payload, (cut + 1) % (SPEC.num_blocks + 1), SPEC, CAL, None))
        jobs.append((payload, cut, SPEC, None, None))
        jobs.append((payload, cut, SPEC, CAL, Limits(max_payload_bytes=len(payload) - 1)))
    assert len(jobs) >= 10_000
    for job in jobs:
        outcomes[_try(*job)] += 1
    # the mutations must mostly be caught, and some (e.g. body flips under a fixed crc) still decode
    assert outcomes["rejected"] > 15_000 and outcomes["decoded"] > 100, outcomes


@given(
    idx=st.integers(0, len(CORPUS) - 1),
    seed=st.integers(0, 2**32 - 1),
    rounds=st.integers(1, 3),
)
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_hypothesis(idx: int, seed: int, rounds: int) -> None:
    r = random.Random(seed)
    cut, payload = CORPUS[idx]
    for _ in range(rounds):
        payload = _mutate(r, payload)
        _try(payload, cut, SPEC, CAL)


@given(data=st.binary(max_size=300), cut=st.integers(0, SPEC.num_blocks))
@settings(max_examples=500, deadline=None)
def test_fuzz_random_bytes(data: bytes, cut: int) -> None:
    _try(data, cut, SPEC, CAL)
    header = struct.pack("<4sB", MAGIC, VERSION)
    _try(header + data, cut, SPEC, CAL)

"""Round-trip properties and strict header validation of splitclip.codec."""

from __future__ import annotations

import zlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from splitclip.codec import (
    FLAG_ZSTD,
    HEADER_SIZE,
    PRESETS,
    Calibration,
    CalibrationError,
    CodecError,
    Limits,
    PayloadTooLarge,
    Preset,
    TensorSpec,
    decode,
    encode,
    fit_calibration,
    get_preset,
    read_header,
)

# odd width exercises the int4 padding nibble
SPEC = TensorSpec(num_blocks=4, num_tokens=17, width=25, image_size=32, embed_dim=12)
HIDDEN_CUTS = (1, 2, 3)
QMAX = {"int8": 127, "int4": 7}
FAST = settings(max_examples=120, deadline=None)


def _calibration(spec: TensorSpec = SPEC, seed: int = 0) -> Calibration:
    rng = np.random.default_rng(seed)
    return fit_calibration(
        {
            k: (rng.normal(size=(400, spec.width)) * np.linspace(3, 0.1, spec.width)).astype(np.float32)
            for k in HIDDEN_CUTS
        }
    )


CAL = _calibration()


def forge(payload: bytes, body: bytes | None = None, **fields: int) -> bytes:
    """Re-pack a frame with edited header fields (and/or a new body) and a correct crc32."""
    h = read_header(payload)
    body = payload[HEADER_SIZE:] if body is None else body
    h = replace(h, **{"body_len": len(body), **fields, "crc": 0})
    return replace(h, crc=zlib.crc32(body, zlib.crc32(h.pack()))).pack() + body


def finite32(lo: float | None = -1e30, hi: float | None = 1e30) -> st.SearchStrategy[float]:
    lo, hi = (None if v is None else float(np.float32(v)) for v in (lo, hi))
    return st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=False)


def hidden_arrays(elements: st.SearchStrategy[float], cap: float = 1e30) -> st.SearchStrategy:
    tokens = SPEC.num_tokens
    special = st.sampled_from(["random", "zeros", "constant_tokens", "denormal", "huge"])

    @st.composite
    def build(draw: st.DrawFn) -> np.ndarray:
        x = draw(hnp.arrays(np.float32, (tokens, SPEC.width), elements=elements))
        kind = draw(special)
        if kind == "zeros":
            x[draw(st.integers(0, tokens - 1))] = 0.0
        elif kind == "constant_tokens":
            x[:] = x[:, :1]
        elif kind == "denormal":
            x[1] = np.float32(1e-40) * np.sign(x[1] + 0.5)
        elif kind == "huge":
            x[2] = np.clip(x[2].astype(np.float64) * 1e6, -cap, cap)
        return x

    return build()


def assert_quant_bound(got: np.ndarray, ref: np.ndarray, qmax: int) -> None:
    """Per-token error <= scale / 2 with scale = max|token| / qmax (slack for fp16 scales and rounding)."""
    scale = np.abs(ref).astype(np.float64).max(axis=1, keepdims=True) / qmax
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    assert (err <= scale / 2 * (1 + 2e-3) + 1e-37).all(), float((err - scale / 2).max())


# ------------------------------------------------------------------------------------- hidden


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.pca == 0 and p.klt == 0])
@given(data=st.data())
@FAST
def test_hidden_roundtrip(name: str, data: st.DataObject) -> None:
    p = PRESETS[name]
    cap = 6e4 if p.dtype == "fp16" else 3e38 if p.lossless else 1e30
    x = data.draw(hidden_arrays(finite32(None, None) if p.lossless else finite32(-cap, cap), cap))
    cut = data.draw(st.sampled_from(HIDDEN_CUTS))
    payload = encode(x, cut=cut, spec=SPEC, preset=name)
    d = decode(payload, cut=cut, spec=SPEC)
    assert (d.cut, d.kind, d.preset) == (cut, "hidden", name)
    assert d.array.dtype == np.float32 and d.array.flags.c_contiguous and d.array.flags.writeable
    if p.keep < 1.0:
        kept = p.kept_patches(SPEC.num_tokens - 1)
        assert d.token_index is not None and d.token_index[0] == 0
        assert len(d.token_index) == 1 + kept and (np.diff(d.token_index) > 0).all()
        ref = x[d.token_index]
    else:
        assert d.token_index is None
        ref = x
    assert d.array.shape == ref.shape
    if p.lossless:
        assert d.array.tobytes() == x.tobytes()
    elif p.dtype == "fp16":
        np.testing.assert_array_equal(d.array, x.astype(np.float16).astype(np.float32))
    else:
        assert_quant_bound(d.array, ref, QMAX[p.dtype])


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.pca > 0])
@given(x=hidden_arrays(finite32(-1e3, 1e3), 1e3), cut=st.sampled_from(HIDDEN_CUTS))
@FAST
def test_pca_roundtrip(name: str, x: np.ndarray, cut: int) -> None:
    p = PRESETS[name]
    d = decode(
        encode(x, cut=cut, spec=SPEC, preset=name, calibration=CAL), cut=cut, spec=SPEC, calibration=CAL
    )
    assert d.array.shape == x.shape and d.array.dtype == np.float32
    r = p.rank(SPEC.width)
    assert read_header(encode(x, cut=cut, spec=SPEC, preset=name, calibration=CAL)).rank == r
    assert_quant_bound(d.array[:1], x[:1], QMAX[p.dtype])  # CLS is quantised in full width
    mean, basis = CAL.means[cut].astype(np.float64), CAL.bases[cut][:, :r].astype(np.float64)
    coeffs = (x[1:] - mean) @ basis  # [tokens - 1, r]
    ref = coeffs @ basis.T + mean
    # orthonormal basis: per-element error <= ||coeff error||_2 <= sqrt(r) * scale / 2
    bound = np.sqrt(r) * np.abs(coeffs).max(axis=1, keepdims=True) / QMAX[p.dtype] / 2
    assert (np.abs(d.array[1:] - ref) <= bound * 1.01 + 1e-3 * (1 + np.abs(ref))).all()


KLT_PRESETS = [
    *(p for p in PRESETS.values() if p.klt > 0),
    Preset("x-klt-prune50", "fp16", zstd=True, keep=0.5, klt=0.3),
    Preset("x-klt-raw", "fp16", klt=0.5),
    Preset("x-klt-ans-prune50", "fp16", keep=0.5, klt=0.3, ans=True),
]
ANS_PRESETS = [p for p in KLT_PRESETS if p.ans]


def klt_coeffs(x: np.ndarray, cut: int) -> np.ndarray:
    """Patch rows [rows, width] -> coefficients in the full KLT basis (float64)."""
    return (x.astype(np.float64) - CAL.means[cut]) @ CAL.bases[cut].astype(np.float64)


@pytest.mark.parametrize("preset", KLT_PRESETS, ids=lambda p: p.name)
@given(x=hidden_arrays(finite32(-100, 100), 100), cut=st.sampled_from(HIDDEN_CUTS))
@FAST
def test_klt_roundtrip(preset: Preset, x: np.ndarray, cut: int) -> None:
    payload = encode(x, cut=cut, spec=SPEC, preset=preset, calibration=CAL)
    h = read_header(payload)
    assert h.rank == SPEC.width and h.n_scales == 0
    d = decode(payload, cut=cut, spec=SPEC, calibration=CAL)
    ref = x if d.token_index is None else x[d.token_index]
    assert d.array.shape == ref.shape and d.array.dtype == np.float32 and d.array.flags.c_contiguous
    np.testing.assert_array_equal(d.array[0], x[0].astype(np.float16).astype(np.float32))  # CLS: fp16
    if preset.ans:  # kltans: never zstd, the body is stored as is
        assert h.dtype == 7 and not h.flags & FLAG_ZSTD and h.raw_len == h.body_len
    # orthonormal basis: per-element error <= ||coefficient error||_2 <= ||steps||_2 / 2
    step = preset.klt * CAL.klt_steps(cut).astype(np.float64)
    bound = np.linalg.norm(step) / 2
    assert (np.abs(d.array[1:] - ref[1:]) <= bound * 1.01 + 1e-4 * (1 + np.abs(ref[1:]))).all()
    # and in the KLT basis every coefficient is within half its own step (slack for fp32 rounding)
    c_ref, c_got = klt_coeffs(ref[1:], cut), klt_coeffs(d.array[1:], cut)
    assert (np.abs(c_got - c_ref) <= step / 2 * 1.001 + 1e-4 * (1 + np.abs(c_ref))).all()


def test_klt_needs_calibration_with_variances() -> None:
    x = np.zeros((SPEC.num_tokens, SPEC.width), np.float32)
    with pytest.raises(CodecError, match="klt needs a Calibration"):
        encode(x, cut=2, spec=SPEC, preset="klt-q10-zstd")
    good = encode(x, cut=2, spec=SPEC, preset="klt-q10-zstd", calibration=CAL)
    with pytest.raises(CodecError, match="header.dtype: klt16: klt needs a Calibration"):
        decode(good, cut=2, spec=SPEC)
    novar = Calibration(CAL.means, CAL.bases)
    with pytest.raises(CalibrationError, match="no variances"):
        decode(good, cut=2, spec=SPEC, calibration=novar)
    with pytest.raises(CodecError, match="int16 symbols"):
        encode(np.full_like(x, 1e6), cut=2, spec=SPEC, preset="klt-q10-zstd", calibration=CAL)
    with pytest.raises(CodecError, match="not both klt and pca"):
        Preset("bad", "fp16", klt=0.1, pca=0.5)


def test_klt_fields_are_validated() -> None:
    x = np.random.default_rng(3).normal(size=(SPEC.num_tokens, SPEC.width)).astype(np.float32)
    good = encode(x, cut=2, spec=SPEC, preset="klt-q20-zstd", calibration=CAL)
    h = read_header(good)
    assert h.flags & FLAG_ZSTD

    def dec(payload: bytes) -> None:
        decode(payload, cut=2, spec=SPEC, calibration=CAL)

    raw = _raw_body(good)
    for off, val, match in [
        (0, np.array([0.0], "<f4").tobytes(), "klt step: 0.0"),
        (0, np.array([np.nan], "<f4").tobytes(), "klt step: nan"),
        (4, np.array([np.inf], "<f2").tobytes(), "CLS.*NaN or Inf"),
        (4 + 2 * SPEC.width, b"\xff", None),
    ]:
        b = bytearray(raw)
        b[off : off + len(val)] = val
        if match is None:  # a zigzag 0xFFFF symbol: set the matching high byte too
            n = (SPEC.num_tokens - 1) * SPEC.width
            b[4 + 2 * SPEC.width + n] = 0xFF
            match = "zigzag code 65535"
        with pytest.raises(CodecError, match=match):
            dec(forge(good, body=_rezstd(bytes(b))))
    with pytest.raises(CodecError, match="header.rank"):
        dec(forge(good, rank=3))
    with pytest.raises(CodecError, match="header.raw_len"):
        dec(forge(good, raw_len=h.raw_len + 2))
    with pytest.raises(CodecError, match="klt flag clear"):
        dec(forge(good, flags=h.flags & ~16))
    with pytest.raises(CodecError, match="klt flag set"):
        dec(forge(good, dtype=2))
    with pytest.raises(CodecError, match="combines klt"):
        dec(forge(good, flags=h.flags | 4))


def _kltans(x: np.ndarray | None = None, preset: str = "klt-q20-ans") -> bytes:
    if x is None:
        x = np.random.default_rng(3).normal(size=(SPEC.num_tokens, SPEC.width)).astype(np.float32)
    return encode(x, cut=2, spec=SPEC, preset=preset, calibration=CAL)


_ANS_FIXED = 4 + 2 + 4 + 2 * SPEC.width  # step f32, K u16, symbols crc32, CLS fp16 row; then u32 words


def test_kltans_extremes_roundtrip() -> None:
    step = 0.2 * CAL.klt_steps(2).astype(np.float64)
    rng = np.random.default_rng(9)
    c = rng.choice([-1.0, 1.0], size=(SPEC.num_tokens - 1, SPEC.width)) * 32766.6 * step  # |symbol| 32767
    x = np.vstack([np.zeros(SPEC.width), c @ CAL.bases[2].T.astype(np.float64) + CAL.means[2]])
    payload = _kltans(x.astype(np.float32))
    assert int.from_bytes(payload[HEADER_SIZE + 4 : HEADER_SIZE + 6], "little") == 32767  # K
    d = decode(payload, cut=2, spec=SPEC, calibration=CAL)
    assert (np.abs(klt_coeffs(d.array[1:], 2) - c) <= step / 2 * 1.001 + 1e-4 * np.abs(c)).all()
    with pytest.raises(CodecError, match="int16 symbols"):
        _kltans(x.astype(np.float32) * 3)
    flat = np.tile(CAL.means[2], (SPEC.num_tokens, 1))  # every patch symbol 0: K = 0 and no ANS words
    payload = _kltans(flat)
    assert len(payload) == HEADER_SIZE + _ANS_FIXED
    np.testing.assert_allclose(
        decode(payload, cut=2, spec=SPEC, calibration=CAL).array[1:], flat[1:], atol=1e-5
    )


def test_kltans_fields_are_validated() -> None:
    good = _kltans()
    h, body = read_header(good), good[HEADER_SIZE:]
    assert h.dtype == 7 and not h.flags & FLAG_ZSTD and (len(body) - _ANS_FIXED) % 4 == 0
    words = body[_ANS_FIXED:]
    assert len(words) >= 8
    head = body[:_ANS_FIXED]

    def dec(payload: bytes) -> None:
        decode(payload, cut=2, spec=SPEC, calibration=CAL)

    def with_k(k: int, rest: bytes = words) -> bytes:
        b = body[:4] + k.to_bytes(2, "little") + body[6:_ANS_FIXED] + rest
        return forge(good, body=b, raw_len=len(b))

    def with_words(rest: bytes) -> bytes:
        return forge(good, body=head + rest, raw_len=len(head) + len(rest))

    for payload, match in [
        (forge(good, body=body + b"\0", raw_len=len(body) + 1), rf"expected {_ANS_FIXED} \+ 4 \* n"),
        (
            forge(good, body=body[: _ANS_FIXED - 1], raw_len=_ANS_FIXED - 1),
            rf"expected {_ANS_FIXED} \+ 4 \* n",
        ),
        (forge(good, raw_len=h.raw_len + 4), "header.raw_len"),
        (forge(good, flags=h.flags | FLAG_ZSTD), "sets zstd with dtype kltans"),
        (forge(good, flags=h.flags & ~16), "klt flag clear"),
        (forge(good, rank=3), "header.rank"),
        (forge(good, body=b"\0\0\0\0" + body[4:]), "klt step: 0.0"),
        (forge(good, body=np.array([np.nan], "<f4").tobytes() + body[4:]), "klt step: nan"),
        (forge(good, body=body[:10] + np.array([np.inf], "<f2").tobytes() + body[12:]), "CLS.*NaN or Inf"),
        (forge(good, body=body[:6] + bytes(b ^ 0xFF for b in body[6:10]) + body[10:]), "crc32"),
        (with_k(40000), r"ans K: 40000, expected 0..32767"),
        (with_k(0), "expected none"),
        (with_k(int.from_bytes(body[4:6], "little") + 1), "."),  # a wider model: other symbols, or K unmet
        (with_words(b"\x07\0\0\0" + words), "left over"),  # an extra word at the bottom of the stack
        (with_words(words + b"\0\0\0\0"), "ans words: ValueError"),  # ANS data never ends in a zero word
        (with_words(words[4:]), "."),
        (with_words(words[:-4]), "."),
    ]:
        with pytest.raises(CodecError, match=match):
            dec(payload)
    # the decoder's model rebuilt from (slightly) other floats, as on a platform whose maths differs:
    # never silently other symbols
    other = Calibration(CAL.means, CAL.bases, {k: v * np.float32(1.5) for k, v in CAL.variances.items()})
    with pytest.raises(CodecError):
        decode(good, cut=2, spec=SPEC, calibration=other)
    with pytest.raises(CodecError, match="header.dtype: kltans: klt needs a Calibration"):
        decode(good, cut=2, spec=SPEC)
    with pytest.raises(CalibrationError, match="no variances"):
        decode(good, cut=2, spec=SPEC, calibration=Calibration(CAL.means, CAL.bases))


def test_kltans_maps_every_coder_exception_to_codec_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import constriction

    from splitclip.codec import entropy

    class PanicException(BaseException):  # what pyo3 raises for a Rust panic
        pass

    good = _kltans()
    for exc in (PanicException("boom"), RuntimeError("boom"), KeyError("boom")):

        def raiser(*_: object, e: BaseException = exc) -> None:
            raise e

        stack = SimpleNamespace(AnsCoder=raiser)
        fake = SimpleNamespace(stream=SimpleNamespace(stack=stack, model=constriction.stream.model))
        monkeypatch.setattr(entropy, "_constriction", lambda fake=fake: fake)
        name = type(exc).__name__
        with pytest.raises(CodecError, match=f"ans words: {name}"):
            decode(good, cut=2, spec=SPEC, calibration=CAL)
        with pytest.raises(CodecError, match=f"ans encode: {name}"):
            _kltans()
    stack = SimpleNamespace(AnsCoder=lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    fake = SimpleNamespace(stream=SimpleNamespace(stack=stack, model=constriction.stream.model))
    monkeypatch.setattr(entropy, "_constriction", lambda: fake)
    with pytest.raises(KeyboardInterrupt):
        decode(good, cut=2, spec=SPEC, calibration=CAL)


def test_ans_presets_need_klt_and_no_zstd() -> None:
    with pytest.raises(CodecError, match="ans needs klt > 0"):
        Preset("bad", "fp16", ans=True)
    with pytest.raises(CodecError, match="replaces zstd"):
        Preset("bad", "fp16", klt=0.1, zstd=True, ans=True)


@pytest.mark.parametrize(
    "preset",
    [
        Preset("x-int4-prune30-pca50", "int4", zstd=True, keep=0.3, pca=0.5),
        Preset("x-fp16-pca25", "fp16", pca=0.25),
        Preset("x-fp32-prune70", "fp32", keep=0.7, zstd=True),
    ],
)
def test_unnamed_combinations_roundtrip(preset: Preset) -> None:
    x = np.random.default_rng(5).normal(size=(SPEC.num_tokens, SPEC.width)).astype(np.float32)
    d = decode(encode(x, cut=1, spec=SPEC, preset=preset, calibration=CAL), cut=1, spec=SPEC, calibration=CAL)
    assert d.preset is None  # not a named preset: nothing recorded
    kept = 1 + preset.kept_patches(SPEC.num_tokens - 1)
    assert d.array.shape == (kept, SPEC.width)
    ref = x if d.token_index is None else x[d.token_index]
    if preset.pca == 0:
        np.testing.assert_array_equal(d.array, ref)
    else:
        r = preset.rank(SPEC.width)
        mean, basis = CAL.means[1], CAL.bases[1][:, :r]
        proj = (ref[1:] - mean) @ basis @ basis.T + mean
        assert np.abs(d.array[1:] - proj).max() < 0.5 * np.abs(ref).max()
        assert np.abs(d.array[0] - ref[0]).max() <= np.abs(ref[0]).max() / QMAX.get(preset.dtype, 2000) + 1e-3


def test_invalid_preset_fields() -> None:
    with pytest.raises(CodecError, match="preset bad: dtype 'int2'"):
        Preset("bad", "int2")
    with pytest.raises(CodecError, match="0 < keep <= 1"):
        Preset("bad", "int8", keep=0.0)


def test_pca_is_near_exact_on_low_rank_data() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, SPEC.width)).astype(np.float32)
    cal = fit_calibration({2: rng.normal(size=(500, 4)).astype(np.float32) @ w + 5.0})
    x = (rng.normal(size=(SPEC.num_tokens, 4)).astype(np.float32) @ w + 5.0).astype(np.float32)
    d = decode(
        encode(x, cut=2, spec=SPEC, preset="pca25-int8-zstd", calibration=cal),
        cut=2,
        spec=SPEC,
        calibration=cal,
    )
    assert np.abs(d.array - x).max() < 0.05 * np.abs(x - 5.0).max()


def test_prune_keeps_the_most_deviant_patches() -> None:
    x = np.zeros((SPEC.num_tokens, SPEC.width), np.float32)
    rng = np.random.default_rng(0)
    x[[3, 7, 11, 12, 13, 14, 15, 16]] = 10 * rng.normal(size=(8, SPEC.width))  # 8 = round(0.5 * 16)
    d = decode(encode(x, cut=1, spec=SPEC, preset="int8-prune50-zstd"), cut=1, spec=SPEC)
    assert d.token_index is not None
    assert d.token_index.tolist() == [0, 3, 7, 11, 12, 13, 14, 15, 16]


# ------------------------------------------------------------------------------- image / embedding


@pytest.mark.parametrize("name", list(PRESETS))
@given(seed=st.integers(0, 2**31 - 1), smooth=st.booleans())
@settings(max_examples=15, deadline=None)
def test_image_roundtrip(name: str, seed: int, smooth: bool) -> None:
    rng = np.random.default_rng(seed)
    s = SPEC.image_size
    if smooth:
        g = np.linspace(0, 255, s)
        img = np.stack(
            [np.add.outer(g, g) / 2, np.add.outer(g, 255 - g) / 2, np.full((s, s), rng.integers(256))], -1
        )
        img = img.astype(np.uint8)
    else:
        img = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    d = decode(encode(img, cut=0, spec=SPEC, preset=name), cut=0, spec=SPEC)
    assert d.kind == "image" and d.array.dtype == np.uint8 and d.array.shape == (s, s, 3)
    if PRESETS[name].lossless:
        np.testing.assert_array_equal(d.array, img)
    elif smooth:
        assert np.abs(d.array.astype(int) - img).mean() < 4


@pytest.mark.parametrize("name", list(PRESETS))
@given(v=hnp.arrays(np.float32, (SPEC.embed_dim,), elements=finite32(-6e4, 6e4)))
@settings(max_examples=40, deadline=None)
def test_embedding_roundtrip(name: str, v: np.ndarray) -> None:
    d = decode(encode(v, cut=SPEC.num_blocks, spec=SPEC, preset=name), cut=SPEC.num_blocks, spec=SPEC)
    assert d.kind == "embedding" and d.array.dtype == np.float32 and d.array.shape == (SPEC.embed_dim,)
    if PRESETS[name].lossless:
        assert d.array.tobytes() == v.tobytes()
    else:
        np.testing.assert_array_equal(d.array, v.astype(np.float16).astype(np.float32))


def test_sizes_shrink_as_expected() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SPEC.num_tokens, SPEC.width)).astype(np.float32)
    size = {n: len(encode(x, cut=2, spec=SPEC, preset=n, calibration=CAL)) for n in PRESETS}
    fp32 = SPEC.num_tokens * SPEC.width * 4
    assert size["lossless"] == fp32 + HEADER_SIZE
    assert size["fp16"] == fp32 // 2 + HEADER_SIZE
    assert size["int8"] - HEADER_SIZE < fp32 / 3.5
    assert size["int4-zstd"] < size["int8-zstd"] <= size["int8"]
    assert size["int4-prune50-zstd"] < size["int4-zstd"]
    assert size["pca12-int8-zstd"] < size["pca25-int8-zstd"] < size["int8-zstd"]
    assert size["klt-q20-zstd"] < size["klt-q10-zstd"]
    assert size["klt-q40-ans"] < size["klt-q20-ans"] < size["klt-q15-ans"] < size["klt-q10-ans"]
    assert size["klt-q10-ans"] < size["klt-q10-zstd"] and size["klt-q20-ans"] < size["klt-q20-zstd"]


# ------------------------------------------------------------------------------- strict validation


def _hidden(preset: str = "int8-zstd", cut: int = 2) -> bytes:
    # rounded values: compressible, so zstd presets really set the zstd flag
    x = np.round(np.random.default_rng(3).normal(size=(SPEC.num_tokens, SPEC.width)) * 2).astype(np.float32)
    payload = encode(x, cut=cut, spec=SPEC, preset=preset, calibration=CAL)
    if PRESETS[preset].pca == 0:  # (a tiny PCA body may not compress, and then goes raw)
        assert bool(read_header(payload).flags & FLAG_ZSTD) == PRESETS[preset].zstd
    return payload


@pytest.mark.parametrize(
    ("payload", "cut", "spec", "match"),
    [
        (_hidden(), 3, SPEC, r"header\.cut: 2, expected 3"),
        (_hidden(), 2, replace(SPEC, width=26), r"header\.dim1 \(width\): 25, expected 26"),
        (_hidden(), 2, replace(SPEC, num_tokens=18), r"header\.dim0 \(tokens\): 17, expected 18"),
        (_hidden(cut=4 - 1), 3, replace(SPEC, num_blocks=3), r"header\.kind: 'hidden', expected 'embedding'"),
        (_hidden(), 9, SPEC, r"cut: 9 is out of range"),
        (b"SCLP", 2, SPEC, r"header: payload is 4 bytes"),
        (b"XXXX" + _hidden()[4:], 2, SPEC, r"header\.magic"),
        (_hidden()[:-1], 2, SPEC, r"header\.body_len"),
        (_hidden() + b"\0", 2, SPEC, r"header\.body_len"),
        (_hidden()[:-1] + bytes([_hidden()[-1] ^ 1]), 2, SPEC, r"header\.crc32"),
        (forge(_hidden(), dtype=9), 2, SPEC, r"header\.dtype: code 9"),
        (forge(_hidden(), flags=0x41), 2, SPEC, r"header\.flags"),
        (forge(_hidden(), n_scales=3), 2, SPEC, r"header\.n_scales: 3, expected 17"),
        (forge(_hidden(), raw_len=5), 2, SPEC, r"header\.raw_len: 5, expected"),
        (
            forge(_hidden("int8-prune50-zstd"), dim0=18, n_index=18),
            2,
            SPEC,
            r"header\.dim0 \(tokens, pruned\): 18, expected 1..17",
        ),
        (forge(_hidden("pca25-int8-zstd"), rank=99), 2, SPEC, r"header\.rank: 99"),
        (_hidden("pca25-int8-zstd"), 2, SPEC, r"no Calibration was given"),
    ],
)
def test_decode_rejects_with_named_field(payload: bytes, cut: int, spec: TensorSpec, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode(payload, cut=cut, spec=spec)


def _raw_body(payload: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(payload[HEADER_SIZE:])


def _rezstd(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(raw)


def test_pruned_indices_are_validated() -> None:
    good = _hidden("int8-prune50-zstd")
    raw = bytearray(_raw_body(good))
    n = read_header(good).n_index
    idx = np.frombuffer(bytes(raw[: 2 * n]), "<u2").copy()
    for bad, match in [
        (np.r_[1, idx[1:]], r"indices\[0\]: 1, expected 0"),
        (np.r_[idx[:2], idx[1], idx[3:]], "strictly increasing"),
        (np.r_[idx[:-1], SPEC.num_tokens], rf"expected < {SPEC.num_tokens}"),
    ]:
        raw[: 2 * n] = bad.astype("<u2").tobytes()
        with pytest.raises(CodecError, match=match):
            decode(forge(good, body=_rezstd(bytes(raw))), cut=2, spec=SPEC)


def test_scales_and_values_are_validated() -> None:
    good = _hidden("int8-zstd")
    raw = bytearray(_raw_body(good))
    raw[0:2] = np.array([np.inf], "<f2").tobytes()
    with pytest.raises(CodecError, match="scales: NaN, Inf or negative"):
        decode(forge(good, body=_rezstd(bytes(raw))), cut=2, spec=SPEC)
    raw = bytearray(_raw_body(good))
    raw[2 * SPEC.num_tokens] = 0x80
    with pytest.raises(CodecError, match="int8 -128"):
        decode(forge(good, body=_rezstd(bytes(raw))), cut=2, spec=SPEC)
    fp = encode(np.ones((SPEC.num_tokens, SPEC.width), np.float32), cut=2, spec=SPEC, preset="lossless")
    body = bytearray(fp[HEADER_SIZE:])
    body[4:8] = np.array([np.nan], "<f4").tobytes()
    with pytest.raises(CodecError, match="NaN or Inf"):
        decode(forge(fp, body=bytes(body)), cut=2, spec=SPEC)


def test_zstd_bomb_and_trailing_data_are_rejected() -> None:
    good = _hidden("int8-zstd")
    bomb = _rezstd(b"\0" * (64 << 20))
    with pytest.raises(CodecError, match="zstd content size"):
        decode(forge(good, body=bomb), cut=2, spec=SPEC)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(_raw_body(good))
    with pytest.raises(CodecError, match="zstd content size"):
        decode(forge(good, body=unsized), cut=2, spec=SPEC)
    with pytest.raises(CodecError, match="exactly one complete zstd frame"):
        decode(forge(good, body=good[HEADER_SIZE:] + b"junk"), cut=2, spec=SPEC)
    with pytest.raises(CodecError, match="not a zstd frame"):
        decode(forge(good, body=b"garbage!" * 4), cut=2, spec=SPEC)


def test_image_validation() -> None:
    s = SPEC.image_size
    good = encode(np.zeros((s, s, 3), np.uint8), cut=0, spec=SPEC, preset="int8")
    with pytest.raises(CodecError, match=r"header.dim0 \(height\): 32, expected 16"):
        decode(good, cut=0, spec=replace(SPEC, image_size=16))
    with pytest.raises(CodecError, match="image: cannot decode JPEG"):
        decode(forge(good, body=b"\xff\xd8garbage", raw_len=9), cut=0, spec=SPEC)
    with pytest.raises(CodecError, match="image: cannot decode JPEG"):
        truncated = good[HEADER_SIZE : HEADER_SIZE + 200]
        decode(forge(good, body=truncated, raw_len=len(truncated)), cut=0, spec=SPEC)
    big = encode(np.zeros((64, 64, 3), np.uint8), cut=0, spec=replace(SPEC, image_size=64), preset="int8")
    body = big[HEADER_SIZE:]
    with pytest.raises(CodecError, match="image: JPEG is 64x64, expected 32x32"):
        decode(forge(good, body=body, raw_len=len(body)), cut=0, spec=SPEC)
    png = encode(np.zeros((s, s, 3), np.uint8), cut=0, spec=SPEC, preset="lossless")
    with pytest.raises(CodecError, match="cannot decode JPEG"):
        decode(forge(png, dtype=4), cut=0, spec=SPEC)  # PNG bytes declared as JPEG


def test_payload_too_large() -> None:
    with pytest.raises(PayloadTooLarge, match="payload: .* expected at most 100"):
        decode(_hidden(), cut=2, spec=SPEC, limits=Limits(max_payload_bytes=100))


def test_calibration_errors() -> None:
    with pytest.raises(CodecError, match="needs a Calibration"):
        encode(
            np.zeros((SPEC.num_tokens, SPEC.width), np.float32), cut=2, spec=SPEC, preset="pca12-int8-zstd"
        )
    only1 = fit_calibration({1: np.random.default_rng(0).normal(size=(50, SPEC.width)).astype(np.float32)})
    with pytest.raises(CodecError, match=r"calibration: no PCA basis for cut 2 \(has cuts \[1\]\)"):
        decode(_hidden("pca25-int8-zstd"), cut=2, spec=SPEC, calibration=only1)
    narrow = _calibration(replace(SPEC, width=8))
    with pytest.raises(CodecError, match="calibration: width 8, expected 25"):
        decode(_hidden("pca25-int8-zstd"), cut=2, spec=SPEC, calibration=narrow)


def test_calibration_save_load(tmp_path: Path) -> None:
    path = tmp_path / "calibration.npz"
    CAL.save(path)
    loaded = Calibration.load(path)
    assert loaded.cuts == list(HIDDEN_CUTS) and loaded.width == SPEC.width
    for k in HIDDEN_CUTS:
        np.testing.assert_array_equal(loaded.bases[k], CAL.bases[k])
        np.testing.assert_array_equal(loaded.means[k], CAL.means[k])
        b = loaded.bases[k]
        np.testing.assert_allclose(b.T @ b, np.eye(SPEC.width), atol=1e-5)
        assert (np.diff(loaded.variances[k]) <= 1e-6).all()  # sorted by explained variance
    payload = _hidden("pca12-int8-zstd")
    np.testing.assert_array_equal(
        decode(payload, cut=2, spec=SPEC, calibration=loaded).array,
        decode(payload, cut=2, spec=SPEC, calibration=CAL).array,
    )
    np.savez(tmp_path / "bad.npz", mean_01=np.zeros(3), basis_01=np.zeros((4, 4)))
    with pytest.raises(CalibrationError, match="cut 1"):
        Calibration.load(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="cannot read"):
        Calibration.load(tmp_path / "junk.npz")
    with pytest.raises(CalibrationError, match="acts\\[2\\]"):
        fit_calibration({2: np.zeros((1, 4), np.float32)})


def test_encode_rejects_bad_inputs() -> None:
    x = np.zeros((SPEC.num_tokens, SPEC.width), np.float32)
    with pytest.raises(CodecError, match=r"hidden: input shape \(16, 25\), expected \(17, 25\)"):
        encode(x[1:], cut=2, spec=SPEC, preset="int8")
    x[3, 4] = np.nan
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode(x, cut=2, spec=SPEC, preset="int8")
    x[3, 4] = 1e5
    with pytest.raises(CodecError, match="overflows fp16"):
        encode(x, cut=2, spec=SPEC, preset="fp16")
    with pytest.raises(CodecError, match="image: input"):
        encode(np.zeros((32, 32, 3), np.float32), cut=0, spec=SPEC, preset="int8")


def test_get_preset_lists_known_names() -> None:
    assert get_preset("int8") is PRESETS["int8"]
    with pytest.raises(CodecError, match="unknown 'nope', expected one of lossless, fp16"):
        get_preset("nope")
    assert len(PRESETS) <= 16 and all(p.jpeg_quality == 90 for p in PRESETS.values())


# Before ids were explicit, a preset's header id was its position in the preset list + 1.
OLD_PRESET_ORDER = [
    "lossless", "fp16", "int8", "int8-zstd", "int4-zstd", "int8-prune50-zstd", "int4-prune50-zstd",
    "pca25-int8-zstd", "pca12-int8-zstd", "pca25-int4-zstd", "klt-q10-zstd", "klt-q20-zstd",
    "klt-q10-ans", "klt-q15-ans", "klt-q20-ans", "klt-q40-ans",
]  # fmt: skip


def test_preset_ids_are_unique_and_keep_the_old_positions() -> None:
    ids = {name: p.id for name, p in PRESETS.items()}
    assert len(set(ids.values())) == len(ids) and 0 not in ids.values()
    assert {n: ids[n] for n in OLD_PRESET_ORDER} == {n: i + 1 for i, n in enumerate(OLD_PRESET_ORDER)}
    assert all(i > len(OLD_PRESET_ORDER) for n, i in ids.items() if n not in OLD_PRESET_ORDER)  # appended
    x = np.zeros(SPEC.embed_dim, np.float32)
    for name, p in PRESETS.items():
        payload = encode(x, cut=SPEC.num_blocks, spec=SPEC, preset=name)
        assert read_header(payload).preset_id == p.id
        assert decode(payload, cut=SPEC.num_blocks, spec=SPEC).preset == name
    # an unnamed preset is recorded as id 0, one that reuses a name under that name's id (as before)
    assert read_header(encode(x, cut=SPEC.num_blocks, spec=SPEC, preset=Preset("x-new"))).preset_id == 0
    assert (
        read_header(encode(x, cut=SPEC.num_blocks, spec=SPEC, preset=Preset("int8", "fp16"))).preset_id == 3
    )
    with pytest.raises(CodecError, match="id 256, expected 0..255"):
        Preset("bad", id=256)


def test_every_header_dtype_has_one_body_format() -> None:
    from splitclip.codec.api import READERS, writer
    from splitclip.codec.frame import KIND_DTYPES, KIND_NAMES

    assert set(READERS) == {(k, d) for k, dts in KIND_DTYPES.items() for d in dts}
    # each preset's writer, at each kind, is the reader of the dtype it writes
    xs = {
        "image": np.zeros((SPEC.image_size, SPEC.image_size, 3), np.uint8),
        "hidden": np.ones((SPEC.num_tokens, SPEC.width), np.float32),
        "embedding": np.ones(SPEC.embed_dim, np.float32),
    }
    for p in PRESETS.values():
        for kind, cut in (("image", 0), ("hidden", 2), ("embedding", SPEC.num_blocks)):
            h = read_header(encode(xs[kind], cut=cut, spec=SPEC, preset=p, calibration=CAL))
            assert KIND_NAMES[h.kind] == kind and READERS[(h.kind, h.dtype)] is writer(kind, p)


def test_codec_errors_are_splitclip_errors() -> None:
    from splitclip.errors import SplitclipError

    for e in (CodecError, CalibrationError, PayloadTooLarge):
        assert issubclass(e, SplitclipError) and issubclass(e, ValueError) and issubclass(e, CodecError)


def test_from_manifest() -> None:
    from splitclip.bundle import Manifest, TextSpec, VisionSpec

    m = Manifest(
        bundle_id="b-x",
        model_name="demo",
        embed_dim=64,
        logit_scale=100.0,
        vision=VisionSpec(image_size=64, patch_size=8, num_blocks=6, width=128, num_tokens=65),
        text=TextSpec(context_length=32, vocab_size=1000, width=64, eos_token_id=2, pad_token_id=0),
        files={},
    )
    assert TensorSpec.from_manifest(m) == TensorSpec(6, 65, 128, 64, 64)

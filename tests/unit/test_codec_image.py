"""The cut-0 image presets: round trips, cut 0 only, strict decoding of JPEG / PNG / WebP bodies."""

from __future__ import annotations

import io
import zlib
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, features

from splitclip.codec import (
    ALL_PRESETS,
    DT_JPEG,
    DT_PNG,
    DT_WEBP,
    HEADER_SIZE,
    IMAGE_PRESETS,
    PRESETS,
    CodecError,
    ImagePreset,
    TensorSpec,
    decode,
    encode,
    get_preset,
    read_header,
)

SPEC = TensorSpec(num_blocks=4, num_tokens=17, width=25, image_size=32, embed_dim=12)
S = SPEC.image_size
LOSSLESS = [n for n, p in IMAGE_PRESETS.items() if p.lossless]
LOSSY = [n for n, p in IMAGE_PRESETS.items() if not p.lossless]


def forge(payload: bytes, body: bytes | None = None, **fields: int) -> bytes:
    """Re-pack a frame with edited header fields (and/or a new body) and a correct crc32."""
    h = read_header(payload)
    body = payload[HEADER_SIZE:] if body is None else body
    h = replace(h, **{"body_len": len(body), "raw_len": len(body), **fields, "crc": 0})
    return replace(h, crc=zlib.crc32(body, zlib.crc32(h.pack()))).pack() + body


def _image(seed: int, smooth: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if not smooth:
        return rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    g = np.linspace(0, 255, S)
    img = np.stack(
        [np.add.outer(g, g) / 2, np.add.outer(g, 255 - g) / 2, np.full((S, S), rng.integers(256))], -1
    )
    return img.astype(np.uint8)  # uint8 [S, S, 3]


def test_webp_is_available() -> None:
    assert features.check("webp"), "this Pillow has no WebP support: the webp-* presets cannot work"


def test_image_presets_are_named_appended_and_cut0_only() -> None:
    assert set(IMAGE_PRESETS).isdisjoint(PRESETS)  # PRESETS stays "applies at every cut"
    assert {"jpeg420-q90", "jpeg444-q95", "webp-q90", "webp-lossless", "png"} <= set(IMAGE_PRESETS)
    assert set(LOSSLESS) == {"webp-lossless", "png"}
    old_max = max(p.id for p in PRESETS.values())
    ids = [p.id for p in ALL_PRESETS.values()]
    assert len(set(ids)) == len(ids) and all(p.id > old_max for p in IMAGE_PRESETS.values())
    assert get_preset("jpeg444-q95") is IMAGE_PRESETS["jpeg444-q95"]
    with pytest.raises(CodecError, match="image .gif. / subsampling"):
        ImagePreset("x", image="gif")
    with pytest.raises(CodecError, match="image_lossless is a WebP option"):
        ImagePreset("x", image="jpeg", image_lossless=True)


@pytest.mark.parametrize("name", list(IMAGE_PRESETS))
@given(seed=st.integers(0, 2**31 - 1), smooth=st.booleans())
@settings(max_examples=10, deadline=None)
def test_image_preset_roundtrip(name: str, seed: int, smooth: bool) -> None:
    img = _image(seed, smooth)
    payload = encode(img, cut=0, spec=SPEC, preset=name)
    d = decode(payload, cut=0, spec=SPEC)
    assert (d.kind, d.preset, d.array.dtype, d.array.shape) == ("image", name, np.uint8, (S, S, 3))
    assert (
        read_header(payload).dtype
        == {"jpeg": DT_JPEG, "png": DT_PNG, "webp": DT_WEBP}[IMAGE_PRESETS[name].image]
    )
    if IMAGE_PRESETS[name].lossless:
        np.testing.assert_array_equal(d.array, img)
    elif smooth:
        assert np.abs(d.array.astype(int) - img).mean() < 4


def test_quality_and_chroma_order_the_error() -> None:
    """On a colourful image, higher quality and 4:4:4 each bring the pixels closer (what the presets are for)."""
    img = _image(3, smooth=False)
    img[: S // 2] = _image(4)[: S // 2]

    def err(name: str) -> float:
        return float(
            np.abs(
                decode(encode(img, cut=0, spec=SPEC, preset=name), cut=0, spec=SPEC).array - img.astype(int)
            ).mean()
        )

    assert err("jpeg420-q75") > err("jpeg420-q95") > err("jpeg420-q99")
    assert err("jpeg444-q99") < err("jpeg420-q99") and err("jpeg444-q95") < err("jpeg420-q95")
    assert err("webp-q100") < err("webp-q90")


@pytest.mark.parametrize("cut", [1, 2, SPEC.num_blocks])
@pytest.mark.parametrize("name", ["jpeg420-q90", "webp-lossless", "png"])
def test_image_presets_refuse_other_cuts(name: str, cut: int) -> None:
    x = np.zeros((SPEC.num_tokens, SPEC.width) if cut < SPEC.num_blocks else SPEC.embed_dim, np.float32)
    with pytest.raises(
        CodecError, match=f"preset {name}: an image preset applies at cut 0 only, got cut {cut}"
    ):
        encode(x, cut=cut, spec=SPEC, preset=name)


def test_every_cut_presets_keep_their_cut0_bodies() -> None:
    img = _image(1)
    assert read_header(encode(img, cut=0, spec=SPEC, preset="lossless")).dtype == DT_PNG
    old_jpeg = encode(img, cut=0, spec=SPEC, preset="int8-zstd")
    new_jpeg = encode(img, cut=0, spec=SPEC, preset="jpeg420-q90")
    assert old_jpeg[HEADER_SIZE:] == new_jpeg[HEADER_SIZE:]  # the old default is jpeg420-q90, byte for byte


def test_decode_is_strict() -> None:
    img = _image(2)
    webp = encode(img, cut=0, spec=SPEC, preset="webp-q90")
    with pytest.raises(CodecError, match=r"header.dim0 \(height\): 32, expected 16"):
        decode(webp, cut=0, spec=replace(SPEC, image_size=16))
    with pytest.raises(CodecError, match="header.flags: 1, expected 0"):
        decode(forge(webp, flags=1), cut=0, spec=SPEC)
    with pytest.raises(CodecError, match="header.raw_len"):
        decode(forge(webp, raw_len=3), cut=0, spec=SPEC)
    with pytest.raises(CodecError, match="header.dtype: jpeg, expected webp for preset webp-q90"):
        decode(forge(webp, dtype=DT_JPEG), cut=0, spec=SPEC)
    anon = forge(webp, dtype=DT_JPEG, preset_id=0)  # an unnamed preset: the body itself must match
    with pytest.raises(CodecError, match="image: cannot decode JPEG"):
        decode(anon, cut=0, spec=SPEC)
    with pytest.raises(CodecError, match="header.dtype: code 9"):
        decode(forge(webp, dtype=9), cut=0, spec=SPEC)
    with pytest.raises(CodecError, match="image: cannot decode WEBP"):
        decode(forge(webp, body=b"RIFF\x10\x00\x00\x00WEBPVP8 garbage"), cut=0, spec=SPEC)
    big = encode(
        np.zeros((64, 64, 3), np.uint8), cut=0, spec=replace(SPEC, image_size=64), preset="webp-lossless"
    )
    with pytest.raises(CodecError, match="image: WEBP is 64x64, expected 32x32"):
        decode(forge(webp, body=big[HEADER_SIZE:], preset_id=0), cut=0, spec=SPEC)
    buf = io.BytesIO()
    rgba = np.concatenate([img, np.full((S, S, 1), 128, np.uint8)], -1)  # translucent: WebP keeps alpha
    Image.fromarray(rgba, "RGBA").save(buf, format="WEBP", lossless=True)
    with pytest.raises(CodecError, match="image: WEBP mode 'RGBA', expected 'RGB'"):
        decode(forge(webp, body=buf.getvalue()), cut=0, spec=SPEC)
    buf = io.BytesIO()
    frames = [Image.fromarray(img), Image.fromarray(255 - img)]
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    with pytest.raises(CodecError, match="image: WEBP holds 2 frames, expected 1"):
        decode(forge(webp, body=buf.getvalue()), cut=0, spec=SPEC)


@pytest.mark.parametrize("name", ["jpeg444-q95", "webp-q90", "webp-lossless", "png"])
@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_fuzzed_bodies_are_codec_errors_or_images(name: str, data: st.DataObject) -> None:
    """A few bytes of the body changed: without a fixed crc32 always a CodecError; with one, the decoder
    raises only CodecError, or returns an image of the right shape (a flipped pixel byte may still decode)."""
    payload = bytearray(encode(_image(5), cut=0, spec=SPEC, preset=name))
    at = data.draw(st.lists(st.integers(HEADER_SIZE, len(payload) - 1), min_size=1, max_size=4, unique=True))
    for i in at:
        payload[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CodecError):
        decode(bytes(payload), cut=0, spec=SPEC)
    try:
        d = decode(forge(bytes(payload)), cut=0, spec=SPEC)
    except CodecError:
        return
    assert d.array.dtype == np.uint8 and d.array.shape == (S, S, 3)


def test_a_preset_reusing_an_image_name_is_unnamed_on_the_wire() -> None:
    """Its id would name another format, and decoding checks the format against the named preset."""
    fake = ImagePreset("png", image="jpeg", jpeg_quality=50)
    payload = encode(_image(6), cut=0, spec=SPEC, preset=fake)
    assert read_header(payload).preset_id == 0 and decode(payload, cut=0, spec=SPEC).preset is None

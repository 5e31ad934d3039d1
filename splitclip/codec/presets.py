"""The named codec presets (what each cut sends, and how) and their wire ids in the header."""

from __future__ import annotations

from dataclasses import dataclass

from splitclip.codec.errors import CodecError


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
    id: int = 0  # header preset id of a named preset (1..255, never reused); 0 for an unnamed one

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
        if not 0 <= self.id <= 255:
            raise CodecError(f"preset {self.name}: id {self.id}, expected 0..255 (a u8 header field)")

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


def _klt_ans(id: int, q: float) -> Preset:
    return Preset(
        f"klt-q{round(q * 100):02d}-ans",
        "fp16",
        klt=q,
        ans=True,
        doc=f"all PCA directions, step {q:.2f} * var^-1/4, CLS fp16, ANS with the calibration's model",
        id=id,
    )


# The ids are part of the wire format: append new presets with new ids, never renumber or reuse one.
_PRESET_LIST = (
    Preset("lossless", "fp32", doc="fp32 hidden / fp32 embedding / PNG image: bit-exact at every cut", id=1),
    Preset("fp16", "fp16", doc="fp16 hidden and embedding, JPEG q90 image; 2x smaller than fp32", id=2),
    Preset("int8", "int8", doc="int8 with a per-token scale; ~4x", id=3),
    Preset("int8-zstd", "int8", zstd=True, doc="int8 per token + zstd; ~4-5x", id=4),
    Preset("int4-zstd", "int4", zstd=True, doc="int4 per token (packed) + zstd; ~8x", id=5),
    Preset(
        "int8-prune50-zstd",
        "int8",
        zstd=True,
        keep=0.5,
        doc="CLS + 50% most salient patches, int8 + zstd",
        id=6,
    ),
    Preset(
        "int4-prune50-zstd", "int4", zstd=True, keep=0.5, doc="CLS + 50% of patches, int4 + zstd; ~16x", id=7
    ),
    Preset(
        "pca25-int8-zstd", "int8", zstd=True, pca=0.25, doc="top 25% PCA directions, int8 + zstd; ~14x", id=8
    ),
    Preset(
        "pca12-int8-zstd",
        "int8",
        zstd=True,
        pca=0.125,
        doc="top 12.5% PCA directions, int8 + zstd; ~25x",
        id=9,
    ),
    Preset(
        "pca25-int4-zstd", "int4", zstd=True, pca=0.25, doc="top 25% PCA directions, int4 + zstd; ~25x", id=10
    ),
    Preset(
        "klt-q10-zstd",
        "fp16",
        zstd=True,
        klt=0.10,
        zstd_level=9,
        doc="all PCA directions, step 0.10 * var^-1/4, CLS fp16, zstd; ~6x",
        id=11,
    ),
    Preset(
        "klt-q20-zstd",
        "fp16",
        zstd=True,
        klt=0.20,
        zstd_level=9,
        doc="all PCA directions, step 0.20 * var^-1/4, CLS fp16, zstd; ~8x",
        id=12,
    ),
    _klt_ans(13, 0.10),
    _klt_ans(14, 0.15),
    _klt_ans(15, 0.20),
    _klt_ans(16, 0.40),
)
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}  # the presets that apply at every cut

IMAGE_FORMATS = ("jpeg", "webp", "png")


@dataclass(frozen=True)
class ImagePreset(Preset):
    """A cut-0 image choice: the uint8 model input sent as an image file. It applies at cut 0 only (encoding
    at any other cut is a CodecError); `jpeg_quality` is the encoder quality (for lossless WebP its effort)."""

    image: str = "jpeg"  # "jpeg" | "webp" | "png"
    subsampling: str = "4:2:0"  # jpeg: chroma subsampling, "4:2:0" | "4:4:4" (WebP lossy is always 4:2:0)
    image_lossless: bool = False  # webp: lossless WebP

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image not in IMAGE_FORMATS or self.subsampling not in ("4:2:0", "4:4:4"):
            raise CodecError(
                f"preset {self.name}: image {self.image!r} / subsampling {self.subsampling!r}, expected "
                f"one of {'/'.join(IMAGE_FORMATS)} / 4:2:0 or 4:4:4"
            )
        if self.image_lossless and self.image != "webp":
            raise CodecError(f"preset {self.name}: image_lossless is a WebP option, got image {self.image!r}")

    @property
    def lossless(self) -> bool:
        return self.image == "png" or (self.image == "webp" and self.image_lossless)


def _jpeg(id: int, chroma: str, q: int) -> ImagePreset:
    sub = {"420": "4:2:0", "444": "4:4:4"}[chroma]
    return ImagePreset(f"jpeg{chroma}-q{q}", jpeg_quality=q, subsampling=sub, doc=f"JPEG {sub} q{q}", id=id)


# Cut-0 image choices, appended after the every-cut presets with their own ids (same rule: never reuse one).
_IMAGE_PRESET_LIST = (
    *(_jpeg(17 + i, "420", q) for i, q in enumerate((75, 90, 95, 99))),
    *(_jpeg(21 + i, "444", q) for i, q in enumerate((75, 90, 95, 99))),
    ImagePreset("webp-q90", image="webp", jpeg_quality=90, doc="WebP lossy q90 (4:2:0)", id=25),
    ImagePreset("webp-q100", image="webp", jpeg_quality=100, doc="WebP lossy q100 (4:2:0)", id=26),
    ImagePreset(
        "webp-lossless",
        image="webp",
        image_lossless=True,
        jpeg_quality=70,
        doc="lossless WebP (effort 70, method 2)",
        id=27,
    ),
    ImagePreset("png", image="png", jpeg_quality=100, doc="PNG at zlib level 9: bit-exact", id=28),
)
IMAGE_PRESETS: dict[str, ImagePreset] = {p.name: p for p in _IMAGE_PRESET_LIST}  # cut 0 only
ALL_PRESETS: dict[str, Preset] = {**PRESETS, **IMAGE_PRESETS}
_BY_ID = {p.id: p for p in ALL_PRESETS.values()}
assert len(_BY_ID) == len(ALL_PRESETS) == len(_PRESET_LIST) + len(_IMAGE_PRESET_LIST), "unique names and ids"
assert 0 not in _BY_ID, "preset ids must be >= 1"


def get_preset(name: str | Preset) -> Preset:
    if isinstance(name, Preset):
        return name
    try:
        return ALL_PRESETS[name]
    except KeyError:
        raise CodecError(f"preset: unknown {name!r}, expected one of {', '.join(ALL_PRESETS)}") from None


def wire_id(p: Preset) -> int:
    """The header preset id: the named preset's id, looked up by name (0 for any other name, and for a
    preset that reuses an image preset's name with other settings: its id would name another format)."""
    named = ALL_PRESETS.get(p.name)
    if named is None or (isinstance(named, ImagePreset) and named != p):
        return 0
    return named.id


def preset_name(preset_id: int) -> str | None:
    """Name of the preset a header's id stands for (None: unnamed, or a preset this codec does not know)."""
    p = _BY_ID.get(preset_id)
    return p.name if p is not None else None

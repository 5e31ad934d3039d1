"""Write the codec's golden wire payloads (codec_v1.npz + codec_v1.json) next to this script.

RUN THIS WITH THE OLD (pre-split, single-file splitclip/codec.py) CODE ONLY. The fixture records what
that code put on the wire; tests/unit/test_codec_golden.py then holds every later codec to those bytes.
Regenerating it from the code under test would make the test pass whatever the code does, and so would
defeat it. If a library that writes bodies (zstd, libjpeg, zlib) changes version, the re-encode check
skips the affected frames; to re-arm it, regenerate from a checkout of the commit that wrote the fixture
(git worktree add /tmp/golden <that commit>; cd /tmp/golden; python tests/unit/golden/make_golden.py),
then copy the two files back.

    python tests/unit/golden/make_golden.py

The inputs are built so that the encoder's float maths is exact whatever the BLAS kernel: hidden values
and calibration means are dyadic (multiples of 2^-7), the calibration basis is a signed, permuted 64x64
Hadamard matrix / 8, so every projection sum is exact in float32 and the bytes do not depend on the
machine. Decoding the PCA presets is exact too (int8/int4 * fp16 scale fits float32); decoding the KLT
presets is a matmul of arbitrary floats, which a different BLAS kernel could round differently in the
last bit.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import zstandard
from PIL import features

from splitclip import codec

HERE = Path(__file__).resolve().parent
NPZ, JSON = HERE / "codec_v1.npz", HERE / "codec_v1.json"

# the tiny test model's vision tower (image 32, patch 8 -> 17 tokens, width 64, embed 32), 4 blocks;
# "odd" has an odd width so int4 bodies end in a padding nibble
SPECS = {
    "tiny": codec.TensorSpec(num_blocks=4, num_tokens=17, width=64, image_size=32, embed_dim=32),
    "odd": codec.TensorSpec(num_blocks=4, num_tokens=17, width=25, image_size=32, embed_dim=32),
}
INNER = 2
# combinations no named preset uses (header preset id 0), for wire paths the named ones miss
EXTRA_PRESETS = [
    codec.Preset("x-fp16-pca25", "fp16", pca=0.25),
    codec.Preset("x-int4-prune30-pca50", "int4", zstd=True, keep=0.3, pca=0.5),
    codec.Preset("x-fp32-prune70", "fp32", keep=0.7, zstd=True),
    codec.Preset("x-klt-raw", "fp16", klt=0.5),
    codec.Preset("x-klt-prune50", "fp16", zstd=True, keep=0.5, klt=0.3),
    codec.Preset("x-kltans-prune50", "fp16", keep=0.5, klt=0.3, ans=True),
]


def hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def calibration(rng: np.random.Generator, width: int) -> codec.Calibration:
    """Cut INNER only: dyadic mean [width], orthonormal basis [width, width] with entries +-1/8."""
    basis = hadamard(width)[:, rng.permutation(width)] * rng.choice([-1.0, 1.0], width) / np.sqrt(width)
    mean = rng.integers(-16, 17, width) / 16
    var = 4.0 * 0.85 ** np.arange(width)  # decreasing, so the KLT steps and ANS stds differ per direction
    f32 = np.float32
    return codec.Calibration({INNER: mean.astype(f32)}, {INNER: basis.astype(f32)}, {INNER: var.astype(f32)})


def hidden(rng: np.random.Generator, spec: codec.TensorSpec, cal: codec.Calibration | None) -> np.ndarray:
    """float32 [tokens, width], multiples of 2^-7, each token at its own scale (2^-2 .. 2^2).

    With a calibration, x = mean + c @ basis.T for dyadic coefficients c drawn with the calibration's
    variances, so the projections give back c exactly; without, rounded Gaussians. Neither compresses
    much: the "levels" and "lowrank" inputs in main() are the ones that make zstd set its flag.
    """
    t, w = spec.num_tokens, spec.width
    row_scale = 2.0 ** rng.integers(-2, 3, (t, 1))
    if cal is None:
        x = np.clip(np.rint(rng.normal(0.0, 3.0, (t, w))), -64, 64) / 16 * row_scale
    else:
        std = np.sqrt(cal.variances[INNER].astype(np.float64))  # [width]
        c = np.rint(rng.normal(0.0, 1.0, (t, w)) * std * row_scale * 16) / 16  # [tokens, width]
        x = cal.means[INNER] + c @ cal.bases[INNER].T.astype(np.float64)
    return untied(x.astype(np.float32))


def untied(x: np.ndarray) -> np.ndarray:
    """x, checked to give distinct pruning scores (ties would leave the kept set to argpartition)."""
    patches = x[1:] - x[1:].mean(axis=0)
    score = np.einsum("ij,ij->i", patches, patches)
    assert len(set(score.tolist())) == len(score), "tied pruning scores: pick another seed"
    return x


def image(rng: np.random.Generator, s: int) -> np.ndarray:
    """uint8 [s, s, 3]: a gradient with noise, so JPEG has both edges and smooth areas to code."""
    g = np.linspace(0, 200, s)
    base = np.stack([np.add.outer(g, g) / 2, np.add.outer(g, g[::-1]) / 2, np.full((s, s), 90.0)], -1)
    return np.clip(base + rng.integers(-40, 41, (s, s, 3)), 0, 255).astype(np.uint8)


def libs_of(payload: bytes) -> list[str]:
    """The libraries whose output the payload's body is: the re-encode check skips if they changed."""
    h = codec.read_header(payload)
    if h.kind == codec.KIND_IMAGE:
        return ["jpeg" if h.dtype == codec.DT_JPEG else "png"]
    return ["zstd"] if h.flags & codec.FLAG_ZSTD else []


def main() -> None:
    rng = np.random.default_rng(20240611)
    tiny, odd = SPECS["tiny"], SPECS["odd"]
    cal = calibration(rng, tiny.width)
    arrays: dict[str, np.ndarray] = {
        f"cal_mean_{INNER:02d}": cal.means[INNER],
        f"cal_basis_{INNER:02d}": cal.bases[INNER],
        f"cal_var_{INNER:02d}": cal.variances[INNER],
    }
    x = hidden(rng, tiny, cal)
    tiny_scale32 = x.copy()
    tiny_scale32[3] *= np.float32(2.0**-100)  # a token this small needs fp32 scales
    # few distinct levels (dense ones), few nonzero KLT coefficients (low rank): zstd has runs to find
    levels = np.rint(rng.normal(0.0, 1.0, (tiny.num_tokens, tiny.width)))
    levels[1:, 0] = rng.permutation(tiny.num_tokens - 1) - 8  # integer data ties easily: this unties it
    levels = untied(levels.astype(np.float32))
    coef = np.zeros((tiny.num_tokens, tiny.width))
    coef[:, :8] = np.rint(rng.normal(0.0, 2.0, (tiny.num_tokens, 8)))
    lowrank = untied((cal.means[INNER] + coef @ cal.bases[INNER].T.astype(np.float64)).astype(np.float32))
    inputs = {
        "tiny_image": image(rng, tiny.image_size),
        "tiny_hidden": x,
        "tiny_hidden_scale32": tiny_scale32,
        "tiny_hidden_levels": levels,
        "tiny_hidden_lowrank": lowrank,
        "tiny_hidden_flat": np.tile(cal.means[INNER], (tiny.num_tokens, 1)),  # every KLT symbol 0: K = 0
        "tiny_embedding": (rng.integers(-4096, 4097, tiny.embed_dim) / 1024).astype(np.float32),
        "odd_hidden": hidden(rng, odd, None),
    }
    for name, a in inputs.items():
        arrays[f"input__{name}"] = a

    plan: list[tuple[str, str, int, str | codec.Preset]] = []  # spec, input, cut, preset
    for p in codec.PRESETS:
        plan += [("tiny", "tiny_image", 0, p), ("tiny", "tiny_hidden", INNER, p)]
        plan.append(("tiny", "tiny_embedding", tiny.num_blocks, p))
    plan += [("tiny", "tiny_hidden", INNER, p) for p in EXTRA_PRESETS]
    plan += [("tiny", "tiny_hidden_scale32", INNER, p) for p in ("int8", "int8-zstd", "int4-zstd", "fp16")]
    dense_zstd = ("int8-zstd", "int4-zstd", "int8-prune50-zstd", "int4-prune50-zstd", EXTRA_PRESETS[2])
    plan += [("tiny", "tiny_hidden_levels", INNER, p) for p in dense_zstd]
    pca = ("pca25-int8-zstd", "pca12-int8-zstd", "pca25-int4-zstd", EXTRA_PRESETS[1])
    plan += [("tiny", "tiny_hidden_lowrank", INNER, p) for p in pca]
    plan += [("tiny", "tiny_hidden_flat", INNER, p) for p in ("klt-q20-ans", "klt-q20-zstd")]
    plan += [("odd", "odd_hidden", INNER, p) for p in ("int4-zstd", "int4-prune50-zstd", "int8", "lossless")]

    cases: list[dict[str, Any]] = []
    for spec_name, input_name, cut, preset in plan:
        spec = SPECS[spec_name]
        p = codec.get_preset(preset)
        cal_or_none = cal if spec_name == "tiny" and p.needs_calibration else None
        payload = codec.encode(inputs[input_name], cut=cut, spec=spec, preset=p, calibration=cal_or_none)
        d = codec.decode(payload, cut=cut, spec=spec, calibration=cal_or_none)
        case = f"{input_name.removesuffix('_image').removesuffix('_embedding')}__cut{cut}__{p.name}"
        assert all(c["case"] != case for c in cases), case
        arrays[f"payload__{case}"] = np.frombuffer(payload, np.uint8)
        arrays[f"decoded__{case}"] = d.array
        if d.token_index is not None:
            arrays[f"token_index__{case}"] = d.token_index
        cases.append(
            {
                "case": case,
                "spec": spec_name,
                "input": input_name,
                "cut": cut,
                "preset": p.name,
                # unnamed presets are rebuilt from their fields; named ones are looked up by name
                "preset_fields": None if isinstance(preset, str) else dataclasses.asdict(p),
                "calibration": cal_or_none is not None,
                "decoded_preset": d.preset,
                "libs": libs_of(payload),
            }
        )

    versions = {
        "numpy": np.__version__,
        "zstd": ".".join(map(str, zstandard.ZSTD_VERSION)),
        "jpeg": features.version("libjpeg_turbo") or features.version("jpg"),
        "png": features.version("zlib"),
        "pillow": PIL.__version__,
        "constriction": metadata.version("constriction"),
        "python": sys.version.split()[0],
    }
    emb = inputs["tiny_embedding"]
    ids = {
        p: codec.read_header(codec.encode(emb, cut=4, spec=tiny, preset=p)).preset_id for p in codec.PRESETS
    }
    doc = {
        "about": "golden wire payloads written by the pre-split splitclip/codec.py; see make_golden.py",
        "versions": versions,
        "specs": {k: dataclasses.asdict(v) for k, v in SPECS.items()},
        # today's header preset ids (position in the preset list + 1): the wire keeps them forever
        "preset_ids": ids,
        "cases": cases,
    }
    with NPZ.open("wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
    JSON.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(cases)} cases, {NPZ.stat().st_size + JSON.stat().st_size} bytes")


if __name__ == "__main__":
    main()

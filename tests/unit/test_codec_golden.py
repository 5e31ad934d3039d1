"""The wire format does not move: payloads written by the pre-split codec decode to the same arrays, and
the same inputs encode to the same bytes (fixture: tests/unit/golden/, written once by make_golden.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from PIL import features

from splitclip.codec import (
    HEADER_SIZE,
    PRESETS,
    Calibration,
    Preset,
    TensorSpec,
    decode,
    encode,
    get_preset,
    read_header,
)

GOLDEN = Path(__file__).resolve().parent / "golden"
DOC: dict[str, Any] = json.loads((GOLDEN / "codec_v1.json").read_text())
with np.load(GOLDEN / "codec_v1.npz", allow_pickle=False) as _z:
    ARRAYS: dict[str, np.ndarray] = {k: _z[k] for k in _z.files}
SPECS = {name: TensorSpec(**fields) for name, fields in DOC["specs"].items()}
CASES: list[dict[str, Any]] = DOC["cases"]


def _calibration() -> Calibration:
    groups: dict[str, dict[int, np.ndarray]] = {"mean": {}, "basis": {}, "var": {}}
    for key, a in ARRAYS.items():
        if m := re.fullmatch(r"cal_(mean|basis|var)_(\d+)", key):
            groups[m.group(1)][int(m.group(2))] = a
    return Calibration(groups["mean"], groups["basis"], groups["var"])


CAL = _calibration()

# versions of the libraries whose output is a body: another version may write other (equally valid) bytes
_NOW = {
    "zstd": ".".join(map(str, zstandard.ZSTD_VERSION)),
    "jpeg": features.version("libjpeg_turbo") or features.version("jpg"),
    "png": features.version("zlib"),
}


def _changed(case: dict[str, Any], libs: set[str]) -> list[str]:
    return [
        f"{lib} {DOC['versions'][lib]} -> {_NOW[lib]}"
        for lib in case["libs"]
        if lib in libs and _NOW[lib] != DOC["versions"][lib]
    ]


def _preset(case: dict[str, Any]) -> Preset:
    fields = case["preset_fields"]
    return Preset(**fields) if fields else get_preset(case["preset"])


def _args(case: dict[str, Any]) -> dict[str, Any]:
    return {
        "cut": case["cut"],
        "spec": SPECS[case["spec"]],
        "calibration": CAL if case["calibration"] else None,
    }


def _ulps(got: np.ndarray, want: np.ndarray) -> str:
    if got.dtype != np.float32 or got.shape != want.shape:
        return f"{got.dtype} {got.shape} vs {want.dtype} {want.shape}"
    diff = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64))
    return f"{int((diff > 0).sum())} values differ, by up to {int(diff.max())} ulp"


def _assert_matmul_rounding(got: np.ndarray, want: np.ndarray, *, terms: int) -> None:
    """Equal up to the rounding of a float32 dot product of `terms` terms (the classic bound
    terms * eps * sum|a_i b_i|, here taken against the largest output, loose by design)."""
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape, _ulps(got, want)
    atol = terms * float(np.finfo(np.float32).eps) * float(np.abs(want).max())
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= atol, f"{_ulps(got, want)}; max error {err:.3g} > {atol:.3g}, more than rounding"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["case"])
def test_golden_payload_decodes_to_the_stored_array(case: dict[str, Any]) -> None:
    if changed := _changed(case, {"jpeg"}):  # zstd and PNG decoding are exact across versions
        pytest.skip(f"decoder library changed since the fixture was written: {', '.join(changed)}")
    name = case["case"]
    d = decode(ARRAYS[f"payload__{name}"].tobytes(), **_args(case))
    want = ARRAYS[f"decoded__{name}"]
    assert (d.cut, d.kind, d.preset) == (
        case["cut"],
        SPECS[case["spec"]].kind_at(case["cut"]),
        case["decoded_preset"],
    )
    assert d.array.dtype == want.dtype and d.array.shape == want.shape
    if case["calibration"] and want.dtype == np.float32:  # a hidden state, not a cut-0 image
        # the klt presets end in a float32 matmul (coefficients x basis), which BLAS rounds by the
        # kernel it picks for the CPU (seen: an AVX-512 EPYC differs from the fixture's machine by
        # 1-2e-6 on values near 7.6): the wire format is the same when only that rounding moves
        _assert_matmul_rounding(d.array, want, terms=d.array.shape[-1])
    else:
        # bit for bit (tobytes also tells -0.0 from 0.0)
        assert d.array.tobytes() == want.tobytes(), _ulps(d.array, want)
    index = ARRAYS.get(f"token_index__{name}")
    if index is None:
        assert d.token_index is None
    else:
        assert d.token_index is not None and d.token_index.tolist() == index.tolist()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["case"])
def test_golden_input_encodes_to_the_stored_bytes(case: dict[str, Any]) -> None:
    if changed := _changed(case, {"jpeg", "png", "zstd"}):
        pytest.skip(f"encoder library changed since the fixture was written: {', '.join(changed)}")
    name = case["case"]
    want = ARRAYS[f"payload__{name}"].tobytes()
    got = encode(ARRAYS[f"input__{case['input']}"], preset=_preset(case), **_args(case))
    if got != want:
        at = next(
            (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want))
        )
        where = "header" if at < HEADER_SIZE else f"body byte {at - HEADER_SIZE}"
        pytest.fail(
            f"{name}: {len(got)} bytes, expected {len(want)}; first difference in the {where}\n"
            f"  header now:    {read_header(got)}\n  header stored: {read_header(want)}"
        )


def test_preset_ids_are_append_only() -> None:
    """Header preset id of every preset the fixture knows is unchanged; new presets get new ids."""
    old: dict[str, int] = DOC["preset_ids"]
    spec = SPECS["tiny"]
    v = np.zeros(spec.embed_dim, np.float32)
    now = {p: read_header(encode(v, cut=spec.num_blocks, spec=spec, preset=p)).preset_id for p in PRESETS}
    assert {n: now[n] for n in old} == old
    new = [i for n, i in now.items() if n not in old]
    assert len(set(now.values())) == len(now) and all(i > max(old.values()) for i in new), now

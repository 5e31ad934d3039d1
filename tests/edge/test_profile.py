"""edge_node/profile.py: the start-up profile is measured once per bundle and device, then read from the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_node import profile
from edge_node.profile import EdgeProfile, load_or_measure
from splitclip.bundle import load_bundle
from splitclip.runtime import BundleRuntime


def test_measures_every_cut_once_then_reads_the_cache(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    b = load_bundle(bundle)
    rt = BundleRuntime(b)
    L = rt.num_blocks
    p = load_or_measure(b, rt, ["lossless", "int8-zstd", "no-such-preset"], cache_dir=tmp_path, repeats=2)
    assert p.bundle_id == b.manifest.bundle_id and p.device == profile.device_key()
    assert len(p.stages.stage_ms) == L + 2 and p.stages.preprocess_ms > 0 and p.measured_s > 0
    assert set(p.codecs) == {(k, name) for k in range(L + 1) for name in ("lossless", "int8-zstd")}
    assert p.codecs[1, "int8-zstd"].payload_bytes < p.codecs[1, "lossless"].payload_bytes
    (cached,) = (tmp_path / "profiles").glob("*.json")
    assert cached.name.startswith(b.manifest.bundle_id)

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(profile, "frame_costs", no_measuring)
    monkeypatch.setattr(profile, "profile_stages", no_measuring)
    again = load_or_measure(b, rt, ["int8-zstd", "lossless"], cache_dir=tmp_path)
    assert again.measured_s == 0.0 and again.codecs == p.codecs and again.stages == p.stages
    assert EdgeProfile.from_json(again.to_json()) == again


def test_a_preset_the_cache_lacks_is_measured_and_added(bundle: Path, tmp_path: Path) -> None:
    b = load_bundle(bundle)
    rt = BundleRuntime(b)
    first = load_or_measure(b, rt, ["lossless"], cache_dir=tmp_path, repeats=2)
    more = load_or_measure(b, rt, ["lossless", "fp16"], cache_dir=tmp_path, repeats=2)
    assert more.stages == first.stages  # the stage times came from the cache
    assert {name for _, name in more.codecs} == {"lossless", "fp16"}
    assert load_or_measure(b, rt, ["fp16"], cache_dir=tmp_path).measured_s == 0.0


@pytest.mark.parametrize("junk", ["{not json", '{"version": 0}'])
def test_an_unreadable_or_old_cache_is_measured_again(bundle: Path, tmp_path: Path, junk: str) -> None:
    b = load_bundle(bundle)
    rt = BundleRuntime(b)
    path = profile.cache_file(tmp_path, b.manifest.bundle_id, profile.device_key())
    path.parent.mkdir(parents=True)
    path.write_text(junk)
    p = load_or_measure(b, rt, ["lossless"], cache_dir=tmp_path, repeats=2)
    assert p.measured_s > 0 and EdgeProfile.from_json(path.read_text()).codecs == p.codecs


def test_the_cache_is_per_device(monkeypatch) -> None:
    a = profile.cache_file(Path("/c"), "bid", "host-a|cpu|ort-threads=0")
    b = profile.cache_file(Path("/c"), "bid", "host-a|cpu|ort-threads=2")
    assert a != b and a.parent == Path("/c/profiles")
    monkeypatch.setenv("SPLITCLIP_CACHE_DIR", "/elsewhere")
    assert profile.cache_file(None, "bid", "d").parent == Path("/elsewhere/profiles")


def test_image_presets_are_profiled_at_cut_0_only_and_reach_the_planner(bundle: Path, tmp_path: Path) -> None:
    """png / webp-lossless are real cut-0 choices: measured there (they are a CodecError anywhere else) and
    kept by the planner when the bundle's table says they clear the floor."""
    from edge_node.autoplan import Policy, candidates

    b = load_bundle(bundle)
    rt = BundleRuntime(b)
    p = load_or_measure(b, rt, ["png", "webp-lossless", "int8-zstd"], cache_dir=tmp_path, repeats=1)
    assert {k for k, name in p.codecs if name in ("png", "webp-lossless")} == {0}
    assert {k for k, name in p.codecs if name == "int8-zstd"} == set(range(rt.num_blocks + 1))
    plans = {(c.cut, c.preset) for c in candidates(p, None, Policy(min_agreement=0.99), say=lambda _: None)}
    assert {(0, "png"), (0, "webp-lossless")} <= plans  # lossless: >= any floor without a table
    assert (1, "int8-zstd") not in plans  # lossy and no table: not known to clear the floor

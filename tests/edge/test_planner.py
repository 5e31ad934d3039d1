"""edge_node/planner.py and `splitclip edge plan`: the latency model, real frame costs, the CLI."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_node import planner
from edge_node.planner import LOCAL, FrameCost, StageProfile
from splitclip.bundle import load_bundle
from splitclip.codec import HEADER_SIZE
from splitclip.runtime import BundleRuntime

ROOT = Path(__file__).resolve().parents[2]

# 3 blocks: embed 1, blocks 2/3/4, head 5 ms; preprocess 10, normalise 0.5
PROFILE = StageProfile(preprocess_ms=10.0, normalize_ms=0.5, stage_ms=(1.0, 2.0, 3.0, 4.0, 5.0))


def test_the_tower_is_split_between_edge_and_cloud_at_every_cut() -> None:
    tower = 0.5 + 15.0
    assert PROFILE.edge_ms(0) == 10.0 and PROFILE.cloud_ms(0) == tower  # the cloud normalises the image
    assert PROFILE.edge_ms(1) == 10.0 + 0.5 + 1.0 + 2.0  # embed + block 0
    assert PROFILE.cloud_ms(1) == 3.0 + 4.0 + 5.0
    assert PROFILE.edge_ms(3) == 10.0 + tower and PROFILE.cloud_ms(3) == 0.0  # cut L sends the embedding
    assert PROFILE.edge_ms(LOCAL) == 10.0 + tower and PROFILE.cloud_ms(LOCAL) == 0.0
    for k in range(4):
        assert PROFILE.edge_ms(k) + PROFILE.cloud_ms(k) == pytest.approx(10.0 + tower)


def costs(inner_bytes: int) -> list[FrameCost]:
    # at cuts 0 and L the payload is the same whatever the preset; the Frame differs by the codec name
    out = [FrameCost(0, "int8-zstd", 2_009, 0.3, 0.3, 1_980), FrameCost(0, "fp16", 2_004, 0.3, 0.3, 1_980)]
    out += [FrameCost(k, "int8-zstd", inner_bytes, 0.2, 0.1, inner_bytes - 30) for k in (1, 2)]
    return [*out, FrameCost(3, "int8-zstd", 609, 0.0, 0.0, 580), FrameCost(3, "fp16", 604, 0.0, 0.0, 580)]


def test_plans_follow_the_link_and_the_cloud() -> None:
    slow = planner.plan(PROFILE, costs(8_000), mbps=0.1, rtt_ms=50, cloud_speedup=1)
    assert slow[0].cut == LOCAL  # nothing beats not using a slow link
    fast = planner.plan(PROFILE, costs(8_000), mbps=1_000, rtt_ms=0, cloud_speedup=100)
    assert fast[0].cut == 0  # a fast link and a fast cloud: upload the image
    tiny_inner = planner.plan(PROFILE, costs(100), mbps=1, rtt_ms=0, cloud_speedup=100)
    assert tiny_inner[0].cut == 1  # inner frames smaller than the image: cut early
    # image and embedding frames are the same whatever the preset: one plan each
    assert [p.cut for p in fast].count(0) == 1 and [p.cut for p in fast].count(3) == 1
    for p in fast:
        assert p.total_ms == pytest.approx(p.edge_ms + p.upload_ms + p.cloud_ms)
    assert [p.total_ms for p in fast] == sorted(p.total_ms for p in fast)
    with pytest.raises(ValueError, match="mbps"):
        planner.plan(PROFILE, costs(1), mbps=0, rtt_ms=0)


def test_more_bandwidth_never_slows_a_plan() -> None:
    by_bw = [
        {p.label: p.total_ms for p in planner.plan(PROFILE, costs(5_000), mbps=bw, rtt_ms=20)}
        for bw in (1, 10, 100)
    ]
    for slower, faster in itertools.pairwise(by_bw):
        assert all(faster[k] <= slower[k] for k in slower)


def test_frame_costs_are_real_frames(bundle: Path, images: list[np.ndarray]) -> None:
    b = load_bundle(bundle)
    rt = BundleRuntime(b)
    v = rt.manifest.vision
    got = {(c.cut, c.preset): c for c in planner.frame_costs(rt, b, images[:3], ["lossless", "int8-zstd"])}
    L = rt.num_blocks
    assert set(got) == {(k, p) for k in range(L + 1) for p in ("lossless", "int8-zstd")}
    payload = HEADER_SIZE + v.num_tokens * v.width * 4  # fp32 [tokens, width]
    assert payload < got[1, "lossless"].bytes < payload + 100  # the whole Frame: + ids and codec name
    prompts = ["a photo of a cat with a very long description"] * 10
    with_prompts = planner.frame_costs(rt, b, images[:1], ["lossless"], cuts=[1], prompts=prompts)[0]
    assert with_prompts.bytes >= got[1, "lossless"].bytes + sum(map(len, prompts))
    assert got[1, "int8-zstd"].bytes < got[1, "lossless"].bytes
    assert got[L, "lossless"].bytes < got[1, "lossless"].bytes  # the embedding
    prof = planner.profile_stages(rt, images[0], repeats=2)
    assert len(prof.stage_ms) == L + 2 and all(t > 0 for t in prof.stage_ms)


def run_plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splitclip.cli", "edge", "plan", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_edge_plan_command(bundle: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    res = run_plan("--bundle", str(bundle), "--mbps", "0.01,1000", "--cloud-speedup", "50",
                   "--rtt-ms", "1", "--repeats", "2", "--json", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "best plan per bandwidth" in res.stdout
    report = json.loads(out.read_text())
    assert set(report["plans"]) == {"0.01", "1000"}
    assert report["plans"]["0.01"][0]["label"] == "local"  # 10 kbit/s: never worth the link
    assert {p["cut"] for p in report["plans"]["1000"]} == {LOCAL, 0, 1, 2, 3}  # tiny bundle: 3 blocks
    assert res.stdout.count("Mbit/s:") == 2  # one best plan per bandwidth

    bad = run_plan("--bundle", str(bundle), "--codecs", "int8-zstd,nope")
    assert bad.returncode != 0 and "unknown codec preset" in bad.stderr and "nope" in bad.stderr
    bad = run_plan("--bundle", str(bundle), "--mbps", "fast")
    assert bad.returncode != 0 and "--mbps" in bad.stderr
    from partitioner.export import partition

    uncalibrated = tmp_path / "nocal"
    partition(tiny_clip_dir, uncalibrated, calibration_images=0, progress=False)
    bad = run_plan("--bundle", str(uncalibrated))  # the default presets include KLT ones
    assert bad.returncode != 0 and "calibration.npz" in bad.stderr, bad.stderr
    ok = run_plan("--bundle", str(uncalibrated), "--codecs", "int8-zstd", "--repeats", "1", "--labels",
                  str(ROOT / "models" / "demo-labels.txt"))  # fmt: skip
    assert ok.returncode == 0 and "48 prompts in each frame" in ok.stdout, ok.stderr
    bad = run_plan("--bundle", str(tmp_path / "missing"))
    assert bad.returncode != 0 and "error:" in bad.stderr

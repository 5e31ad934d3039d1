"""A short `splitclip bench e2e` (real cloud, emulated link, weak edge): the planner's plan is among the fastest fixed plans of the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.e2e import fixed_plans
from benchmarks.e2e_edge import parse_plan
from benchmarks.e2e_stats import CONTROL, step_change
from splitclip.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[2]
PLANS = ["local", "cut0/webp-lossless", "cut2/klt-q20-ans", "cut4/fp16"]
# "among the fastest": the planner's median is within 25 % of the best fixed plan's median, or the
# plan it used most is one of the two fastest fixed plans; medians of a few frames on a shared 2-core
# box move by up to ~40 %, so the 5 % acceptance target is for the full benchmark, not this test
TOLERANCE = 0.25


def test_fixed_plans_respect_the_floor(demo_bundle_dir: Path) -> None:
    b = load_bundle(demo_bundle_dir)
    table = b.agreement()
    assert table is not None
    plans = fixed_plans(table, b.manifest.num_blocks, 0.99)
    assert plans[0] == "local"
    assert "cut0/jpeg420-q90" not in plans  # 85 % on the demo: under the floor
    for p in plans[1:]:
        cut, preset = p.removeprefix("cut").split("/")
        row = table.get(int(cut), preset)
        assert row is not None and row.agreement >= 0.99, p
    assert set(PLANS) <= set(plans)


def test_fixed_plan_labels_name_the_edge_stages() -> None:
    assert parse_plan("cut2/klt-q20-ans") == (2, "klt-q20-ans", "fp32")
    assert parse_plan("cut1/int8/int8-zstd") == (1, "int8-zstd", "int8")  # the planner's label
    assert parse_plan("cut3/int8") == (3, "int8", "fp32")  # the int8 codec preset, fp32 stages


def test_step_change_counts_frames_to_the_new_plan() -> None:
    def frames(mbps: float, plans: list[str]) -> list[dict[str, object]]:
        return [{"mbps": mbps, "plan": p, "latency_ms": 10.0 + i} for i, p in enumerate(plans)]

    tl = frames(100, ["a"] * 10) + frames(1, ["a", "a", "a", "b"] + ["b"] * 6)
    s = step_change(tl, 10)
    assert [x["settled"] for x in s] == ["a", "b"]
    assert s[1]["replanned"] and s[1]["frames_to_settle"] == 3
    assert not s[0]["replanned"]


def test_short_e2e_planner_among_the_fastest(demo_bundle_dir: Path, tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    cmd = [
        sys.executable, "-m", "benchmarks.e2e", "--bundle", str(demo_bundle_dir), "--mbps", "20",
        "--rtt-ms", "20", "--plans", ",".join(PLANS), "--images", "6", "--frames", "6", "--warmup", "1",
        "--auto-warmup", "6", "--runs", "1", "--final-frames", "4", "--timeline", "", "--json", str(out_json),
        "--out", str(out_md),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out_json.read_text())
    (setting,) = res["settings"]
    rows = {r["plan"]: r for r in setting["rows"]}
    assert set(rows) == {*PLANS, CONTROL, "auto"}
    # the final: the screening's fastest fixed plan(s) and the planner, on 4 fresh frames each; its
    # numbers are the summary's
    final = {r["plan"]: r for r in setting["final"]["rows"]}
    screen_best = min((r for n, r in rows.items() if n in PLANS), key=lambda r: r["median_ms"])["plan"]
    assert screen_best in final and "auto" in final and set(final) <= {*PLANS, CONTROL, "auto"}
    assert (CONTROL in final) == ("local" in final)
    assert all(r["n"] == 4 for r in final.values()), final
    assert (setting["best"], setting["ratio"]) == (setting["final"]["best"], setting["final"]["ratio"])
    for name, r in rows.items():
        assert r["n"] == 6, (name, r["n"])
        assert r["agreement"] >= 0.8, (name, r["agreement"])  # >= 99 % plans, 6 frames
    for name in PLANS[1:]:
        assert rows[name]["split"] == 6, (name, rows[name]["reasons"])  # every fixed remote frame split
    assert rows[CONTROL]["split"] == 0  # the A/A control answers locally, on a node of its own
    lo, hi = setting["aa_ci"]
    assert lo <= setting["aa"] <= hi and setting["ratio_ci"][0] <= setting["ratio"] <= setting["ratio_ci"][1]
    fixed = sorted((r for n, r in rows.items() if n not in ("auto", CONTROL)), key=lambda r: r["median_ms"])
    best = fixed[0]["median_ms"]
    used = rows["auto"]["used"][0][0]
    top2 = {r["plan"] for r in fixed[:2]}
    ok = rows["auto"]["median_ms"] <= (1 + TOLERANCE) * best or used in top2
    assert ok, (rows["auto"]["median_ms"], best, used, top2)
    md = out_md.read_text()
    assert ("**no**" in md) == (not setting["within"])  # the 5 % verdict is the computed one
    assert "edge device:" in md

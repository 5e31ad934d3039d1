"""Int8 edge plans: profiled, offered to the planner only where their own rows clear the floor, and run by an auto node."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge_node.autoplan import Candidate, Policy, candidates
from edge_node.node import EdgeNode
from edge_node.planner import StageProfile
from edge_node.profile import EdgeProfile, load_or_measure
from splitclip.agreement import AgreementTable
from splitclip.bundle import load_bundle
from splitclip.prompts import prompt_set, zero_shot_probs
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower
from tests.edge.conftest import PROMPTS
from tests.edge.refcloud import RefCloud
from tests.edge.test_autoplan import KLT, L, World, edge_profile, planner_for, run, table


def int8_profile(block_ms: float = 15.0, int8_block_ms: float = 3.0) -> EdgeProfile:
    """The synthetic ViT-B-like profile of test_autoplan, with int8 blocks of `int8_block_ms`."""
    prof = edge_profile(block_ms)
    st = prof.stages
    q = StageProfile(st.preprocess_ms, st.normalize_ms, (5.0, *[int8_block_ms] * L, 2.0))
    return replace(prof, int8=q)


def int8_table(agreement: float) -> AgreementTable:
    """test_autoplan's table plus an int8 row for every (cut >= 1, preset) row, at `agreement`."""
    t = table()
    int8 = [replace(r, edge="int8", agreement=agreement) for r in t.rows if r.cut >= 1]
    return replace(t, rows=(*t.rows, *int8))


def test_an_int8_plan_is_labelled_with_its_edge_stages() -> None:
    assert Candidate(2, KLT, 3_700, 1.0, 1.0, 1.0, 0.99, "int8").label == "cut2/int8/klt-q20-ans"
    assert Candidate(2, KLT, 3_700, 1.0, 1.0, 1.0, 0.99).label == "cut2/klt-q20-ans"


def test_int8_plans_cost_the_int8_stage_times_and_the_fp32_tail() -> None:
    prof = int8_profile()
    plans = {c.label: c for c in candidates(prof, int8_table(0.995), Policy())}
    fp32, int8 = plans[f"cut4/{KLT}"], plans[f"cut4/int8/{KLT}"]
    assert fp32.edge_ms - int8.edge_ms == pytest.approx(4 * (15.0 - 3.0))
    assert int8.cloud_compute_ms == fp32.cloud_compute_ms  # the cloud runs fp32 stages[k:L] either way
    assert int8.agreement == 0.995 and int8.edge == "int8"
    assert not any(c.cut == 0 and c.edge == "int8" for c in plans.values())  # cut 0 runs no stage


def test_the_planner_picks_int8_when_it_is_much_faster_and_clears_the_floor() -> None:
    # a slow device next to a cloud no faster than itself: only cheaper edge blocks help, so with int8
    # blocks 5x faster the best plan runs the whole tower here in int8 and sends the embedding
    prof = int8_profile(15.0, 3.0)
    planner = planner_for(prof, int8_table(0.995))
    world = World(100.0, speed=1.0)
    best = world.best(planner.plans)
    assert best.edge == "int8" and best.cut == L, best.label  # cut12/int8/fp16: the whole tower, int8
    run(planner, world, 60)
    assert planner.current.label == best.label


@pytest.mark.parametrize("agreement", [0.985, 0.0])
def test_never_int8_when_its_rows_are_under_the_floor(agreement: float) -> None:
    prof = int8_profile(15.0, 3.0)
    planner = planner_for(prof, int8_table(agreement))
    assert all(c.edge == "fp32" for c in planner.plans)
    used = run(planner, World(100.0, speed=1.0), 60)
    assert not any("/int8/" in label for label in used)
    # a lower floor admits them: the same rows are then allowed
    assert any(c.edge == "int8" for c in candidates(prof, int8_table(agreement), Policy(min_agreement=0.0)))


def test_never_int8_without_a_table_or_without_int8_stages() -> None:
    assert all(c.edge == "fp32" for c in candidates(int8_profile(), None, Policy(min_agreement=0.0)))
    assert all(c.edge == "fp32" for c in candidates(edge_profile(), int8_table(1.0), Policy()))


def test_the_profile_times_the_int8_stages_and_caches_them(
    tiny_int8_bundle_dir: Path, tmp_path: Path
) -> None:
    b = load_bundle(tiny_int8_bundle_dir)
    rt = BundleRuntime(b)
    prof = load_or_measure(b, rt, ["lossless"], cache_dir=tmp_path, repeats=2)
    assert prof.int8 is not None and len(prof.int8.stage_ms) == len(prof.stages.stage_ms)
    assert prof.int8.preprocess_ms == prof.stages.preprocess_ms and all(ms > 0 for ms in prof.int8.stage_ms)
    again = load_or_measure(b, rt, ["lossless"], cache_dir=tmp_path)
    assert again.measured_s == 0.0 and again.int8 == prof.int8  # read back, not measured again
    assert EdgeProfile.from_json(prof.to_json()) == replace(prof, measured_s=0.0)


def test_an_auto_node_runs_an_int8_plan_end_to_end(
    tiny_int8_bundle_dir: Path, images, tmp_path: Path
) -> None:
    bundle = tiny_int8_bundle_dir
    cloud = RefCloud(bundle)
    cloud.start()
    fast = {"probe_interval_s": 0.2, "probe_max_s": 0.5, "hello_timeout_s": 3.0}
    try:
        # the tiny random model's int8 rows are not at 99 %: a floor of 0 lets every measured row in
        with EdgeNode(
            bundle, cloud=f"127.0.0.1:{cloud.port}", cut="auto", min_agreement=0.0, cache_dir=tmp_path, **fast
        ) as node:
            auto = node.plans.auto
            assert auto is not None
            int8 = [c for c in auto.plans if c.edge == "int8"]
            assert {c.cut for c in int8} == set(range(1, node.num_blocks + 1))
            auto.current = next(
                c for c in int8 if c.cut == 1 and c.preset == "lossless"
            )  # as if it looked best
            auto.policy = Policy(min_agreement=0.0, patience=10_000, explore_every=10_000)  # and keep it
            results = sorted(node.classify_many(images[:6], PROMPTS), key=lambda r: r.frame_id)
            local = node.engine  # the same numbers, computed here: int8 stages[0:1], fp32 rest
            rt = local.rt
            tower = Tower(rt, edge="int8")
            text = local.text(prompt_set(PROMPTS, ()))
    finally:
        cloud.stop()
    assert cloud.frames + cloud.classify_calls >= 6
    for img, r in zip(images[:6], results, strict=True):
        assert r.ok and r.mode == "split" and r.plan == "cut1/int8/lossless" and r.cut == 1, r
        x = tower.at_cut(tower.model_input(img), 1)  # [1, tokens, width] by the int8 stages
        emb = Tower(rt).finish(x, 1)  # fp32 stages[1:L], as the cloud
        want = zero_shot_probs(emb, text, rt.manifest.logit_scale)[0]
        np.testing.assert_allclose(r.probabilities, want, atol=1e-4)

"""The numbers of `splitclip bench e2e` (benchmarks/e2e.py): per-plan rows, the planner against the best fixed plan, bootstrap intervals and the step-change summary, from the frames the edge worker reported."""

from __future__ import annotations

import random
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

WITHIN = 0.05  # the acceptance target: planner median within 5 % of the best fixed plan's
# The A/A control: `local` again, on a fresh node of its own per setting (as the planner has), measured
# like every plan.
# control / local is what two runs of one code path differ by here: the bench's own noise floor.
CONTROL = "local*"
FINAL_MAX = 3  # fixed plans in a setting's final, so its cost stays bounded
NOT_FIXED = ("auto", CONTROL)  # measured beside the fixed plans, never a candidate for the best one


def cut_of(plan: str) -> int | None:
    return None if plan == "local" or plan in NOT_FIXED else int(plan.split("/")[0].removeprefix("cut"))


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    i = q * (len(s) - 1)
    lo = int(i)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


def ratio_ci(a: Sequence[float], b: Sequence[float], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of median(a) / median(b): how far the ratio of two plans' medians can
    move on frames like these (resampling each plan's frames with replacement)."""
    rng = random.Random(seed)
    med = statistics.median
    rs = sorted(med(rng.choices(a, k=len(a))) / med(rng.choices(b, k=len(b))) for _ in range(n))
    return rs[int(0.025 * n)], rs[int(0.975 * n) - 1]


def summarise(frames: list[dict[str, Any]]) -> dict[str, Any]:
    med = statistics.median
    lat = [f["latency_ms"] for f in frames]
    return {
        "n": len(frames),
        "median_ms": med(lat),
        "p95_ms": pct(lat, 0.95),
        "edge_ms": med(f["edge_ms"] for f in frames),
        "transfer_ms": med(f["transfer_ms"] for f in frames),
        "cloud_ms": med(f["cloud_ms"] for f in frames),
        "bytes": statistics.fmean(f["bytes"] for f in frames),
        "wire_bytes": statistics.fmean(f["wire_up"] for f in frames),
        "agreement": statistics.fmean(1.0 if f["agree"] else 0.0 for f in frames),
        "split": sum(f["mode"] == "split" for f in frames),
        "used": Counter(f["plan"] or "error" for f in frames).most_common(),
        "reasons": Counter(f["reason"] for f in frames if f["mode"] == "local").most_common(),
    }


def analyse(setting_frames: list[dict[str, Any]], plans: list[str]) -> dict[str, Any]:
    """The rows of one link setting (pooled over runs) and the computed findings."""
    measured = {
        plan: fs
        for plan in [*plans, CONTROL, "auto"]
        if (fs := [f for f in setting_frames if f["requested"] == plan and f["measured"]])
    }
    rows = [{"plan": plan, **summarise(fs)} for plan, fs in measured.items()]
    by_plan = {r["plan"]: r for r in rows}
    fixed = [r for r in rows if r["plan"] not in NOT_FIXED]
    best = min(fixed, key=lambda r: r["median_ms"])
    best["best"] = True
    auto, control, local = by_plan.get("auto"), by_plan.get(CONTROL), by_plan.get("local")
    out: dict[str, Any] = {"rows": rows, "best": best["plan"], "best_ms": best["median_ms"]}

    def lat(plan: str) -> list[float]:
        return [f["latency_ms"] for f in measured[plan]]

    if auto is not None:
        out["auto_ms"] = auto["median_ms"]
        out["ratio"] = auto["median_ms"] / best["median_ms"]
        out["ratio_ci"] = ratio_ci(lat("auto"), lat(best["plan"]))
        out["within"] = out["ratio"] <= 1 + WITHIN
        runs = sorted({f["run"] for f in setting_frames})
        per_run = []
        for run in runs:
            rf = [f for f in setting_frames if f["run"] == run and f["measured"]]
            meds = {
                p: statistics.median(f["latency_ms"] for f in rf if f["requested"] == p)
                for p in {f["requested"] for f in rf}
            }
            fixed_meds = {p: m for p, m in meds.items() if p not in NOT_FIXED}
            bp = min(fixed_meds, key=lambda p: fixed_meds[p])
            aa = meds[CONTROL] / meds["local"] if CONTROL in meds and "local" in meds else None
            per_run.append({"run": run, "best": bp, "ratio": meds["auto"] / fixed_meds[bp], "aa": aa})
        out["per_run"] = per_run
    if control is not None and local is not None:
        out["aa"] = control["median_ms"] / local["median_ms"]
        out["aa_ci"] = ratio_ci(lat(CONTROL), lat("local"))
    up = [r for r in fixed if cut_of(r["plan"]) == 0]
    inner = [r for r in fixed if (c := cut_of(r["plan"])) is not None and 0 < c < max_cut(plans)]
    out["local_ms"] = local["median_ms"] if local else None
    out["upload"] = min(up, key=lambda r: r["median_ms"]) if up else None
    out["inner"] = min(inner, key=lambda r: r["median_ms"]) if inner else None
    return out


def finalists(a: dict[str, Any], within: float, most: int = FINAL_MAX) -> list[str]:
    """The fixed plans of a setting's final: the screening's fastest, and those within `within` of it
    (at most `most`, fastest first)."""
    fixed = sorted((r for r in a["rows"] if r["plan"] not in NOT_FIXED), key=lambda r: r["median_ms"])
    return [r["plan"] for r in fixed if r["median_ms"] <= (1 + within) * fixed[0]["median_ms"]][:most]


def max_cut(plans: list[str]) -> int:
    return max((c for p in plans if (c := cut_of(p)) is not None), default=0)


def step_change(timeline: list[dict[str, Any]], steps_frames: int) -> list[dict[str, Any]]:
    """Per step: the plan it settles on (the most used in the step's last half), frames until that plan
    is in use and stays so (exploration frames aside: they are counted, not waited for), latency before
    (last 10 frames of the previous step) and after (frames of this step once settled)."""
    out = []
    phases = [timeline[i : i + steps_frames] for i in range(0, len(timeline), steps_frames)]
    prev_plan: str | None = None
    for j, ph in enumerate(phases):
        tail = ph[len(ph) // 2 :]
        settled = Counter(f["plan"] for f in tail).most_common(1)[0][0]
        after = None
        for i in range(len(ph)):
            rest = [f["plan"] for f in ph[i:]]
            if rest[0] == settled and rest.count(settled) >= 0.8 * len(rest):
                after = i
                break
        lat_after = [f["latency_ms"] for f in ph[(after or 0) :] if f["plan"] == settled]
        before = phases[j - 1][-10:] if j else []
        out.append(
            {
                "mbps": ph[0]["mbps"],
                "settled": settled,
                "replanned": prev_plan is not None and settled != prev_plan,
                "frames_to_settle": after,
                "first_frame_ms": ph[0]["latency_ms"],
                "before_ms": statistics.median(f["latency_ms"] for f in before) if before else None,
                "after_ms": statistics.median(lat_after) if lat_after else None,
                "used": Counter(f["plan"] for f in ph).most_common(),
            }
        )
        prev_plan = settled
    return out

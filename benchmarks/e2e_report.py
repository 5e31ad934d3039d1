"""The markdown report of `splitclip bench e2e` (benchmarks/e2e.py): summary, findings in words, plots, the step change and one table per link setting."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from benchmarks.e2e_stats import CONTROL, FINAL_MAX, NOT_FIXED, analyse, step_change

ROOT = Path(__file__).resolve().parent.parent
# what a setting's final decides, when it has one (the screening's values are kept under "screen")
SUMMARY_KEYS = ("best", "best_ms", "auto_ms", "ratio", "ratio_ci", "within", "per_run", "aa", "aa_ci")


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def report(
    args: argparse.Namespace,
    bundle_dir: Path,
    m: Any,
    device: str,
    plans: list[str],
    rates: list[float],
    frames: list[dict[str, Any]],
    timeline: list[dict[str, Any]],
    throttle: dict[str, int],
) -> dict[str, Any]:
    settings = []
    for mbps in rates:
        fs = [f for f in frames if f["mbps"] == mbps]
        a = analyse([f for f in fs if not f.get("final")], plans)
        if fin := [f for f in fs if f.get("final")]:
            # the verdict from the final: fresh frames, so the screening's luckiest plan gets no edge
            fa = analyse(fin, plans)
            a["screen"] = {k: a[k] for k in SUMMARY_KEYS if k in a}
            a.update({k: fa[k] for k in SUMMARY_KEYS if k in fa}, final=fa)
            for r in a["rows"]:
                r["best"] = r["plan"] == a["best"]
        a.update(mbps=mbps, rtt_ms=args.rtt_ms)
        settings.append(a)
    steps = step_change(timeline, args.timeline_frames) if timeline else []
    rel = (lambda p: os.path.relpath(p, args.out.parent)) if args.out else str
    images: list[str] = []
    if args.plots:
        from benchmarks import plots

        images.append(rel(plots.latency_by_plan(settings, args.plots / "e2e_latency_by_plan.png")))
        if timeline:
            images.append(rel(plots.timeline(timeline, args.plots / "e2e_step_change.png")))
    cmd = (
        f"splitclip bench e2e --bundle {os.path.relpath(bundle_dir, ROOT)} --mbps {args.mbps} --rtt-ms "
        f"{args.rtt_ms:g} --images {args.images} --frames {args.frames} --runs {args.runs} --edge-cpu "
        f"{args.edge_cpu:g}"
        + (f" --plans {args.plans}" if args.plans else "")
        + (f" --timeline-frames {args.timeline_frames}" if args.timeline_frames != 30 else "")
        + (f" --final-frames {args.final_frames}" if args.final_frames != 100 else "")
        + (f" --final-within {args.final_within:g}" if args.final_within != 0.25 else "")
        + (f" --noise {args.noise:g}" if args.noise else "")
        + (f" --floor {args.floor:g}" if args.floor != 0.99 else "")
        + (f" --timeline {args.timeline or chr(39) * 2}" if args.timeline != "100,1,20" else "")
        + (f" --out {args.out}" if args.out else "")
        + (f" --plots {args.plots}" if args.plots else "")
    )
    L: list[str] = [
        "# End to end: fixed plans vs the planner (`splitclip bench e2e`)",
        "",
        f"`{cmd}`",
        "",
        f"- bundle `{m.bundle_id}` ({m.num_blocks} blocks, image {m.vision.image_size} px), "
        f"{len(plans)} fixed plans at or above the {args.floor:.0%} agreement floor + `auto` (the planner) "
        f"+ `{CONTROL}` (the A/A control: `local` again, on a fresh node of its own per setting like the planner's; "
        f"`{CONTROL}` / `local` is how far two runs of one code path differ here)",
        f"- edge device: {device}; one ONNX Runtime thread; its own profile cache, measured under the quota"
        + (
            f"; throttled in {throttle.get('nr_throttled', 0)} of {throttle.get('nr_periods', 0)} periods"
            if throttle
            else ""
        ),
        "- cloud: local Ray + Serve + embedded Valkey (`demo.cloudproc.CloudProcess`, 2 CPUs) on the same "
        "2-core box, unlimited; the link: `benchmarks.link.LinkProxy`, uplink rate as given, "
        f"{args.rtt_ms / 2:g} ms added each way, a {args.burst_bytes:,} B token bucket, downlink unlimited",
        f"- {args.images} demo images (half held-out combos"
        + (f", Gaussian sensor noise of {args.noise:g} grey levels" if args.noise > 0 else "")
        + f"); screening: {args.frames} measured frames per plan, setting "
        f"and run after {args.warmup} warm-up frames (planner: {args.auto_warmup}, a fresh node per setting), "
        f"{args.runs} runs pooled; plans interleaved round by round in shuffled order; one frame in flight, "
        f"{args.gap_ms:g} ms idle before each (a camera's frame gap: without one a frame's latency depends "
        "on whether the frame before it spent the edge's CPU quota, and plans that follow a local frame lose); "
        "the fixed plans (`local` too) share one node with a cloud, its plan set per frame, the planner has "
        "its own (30 nodes in one process would steal the quota from whichever frame runs)",
        (
            f"- final: per setting, the fixed plans within {args.final_within:.0%} of the screening's best "
            f"median (at most {FINAL_MAX}, picked in run 1), the planner, and the A/A control when `local` is "
            f"among them, run {args.final_frames} more frames each per run, interleaved in shuffled order; "
            "the summary's medians, ratios and 5 % verdict are the final's (fresh frames: the plan that was "
            "luckiest in the screening gets no edge), the tables per link show both"
            if args.final_frames
            else "- no final (`--final-frames 0`): the summary is the screening's"
        ),
        "- latency: the node's own (start of preprocessing to answer); edge = preprocess + edge stages + "
        "encode (local: all), cloud = the cloud's reported `total`, transfer = the rest (link, rtt, gRPC, "
        "proxy); their medians, so they need not add up to the median",
        "- bytes: payload per image (the codec's), and wire = bytes up through the link per frame "
        "(gRPC framing and the 48 prompts included); agreement: top-1 equal to the unsplit model's "
        "(full local inference) over the demo labels, on these frames",
        "",
        "## Summary",
        "",
        "| link | best fixed plan | its median | planner median | planner / best (per run) [95 % CI] | "
        f"within 5 % | A/A `{CONTROL}` / `local` (per run) [95 % CI] | planner's plans | "
        "fastest split 0<k<L | local | fastest image upload | split beats both |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in settings:
        auto = next(r for r in s.get("final", s)["rows"] if r["plan"] == "auto")
        per = ", ".join(f"{p['ratio']:.2f}" for p in s.get("per_run", []))
        aa_runs = ", ".join(f"{p['aa']:.2f}" for p in s.get("per_run", []) if p.get("aa") is not None)
        aa = (
            f"{s['aa']:.2f} ({aa_runs}) [{s['aa_ci'][0]:.2f}–{s['aa_ci'][1]:.2f}]"
            if s.get("aa") is not None
            else "–"
        )
        ci = f" [{s['ratio_ci'][0]:.2f}–{s['ratio_ci'][1]:.2f}]" if "ratio_ci" in s else ""
        inner, upl = s["inner"], s["upload"]
        beats = (
            inner is not None
            and (s["local_ms"] is None or inner["median_ms"] < s["local_ms"])
            and (upl is None or inner["median_ms"] < upl["median_ms"])
        )
        s["split_beats_both"] = beats
        used = ", ".join(f"{p} {n}" for p, n in auto["used"])
        L.append(
            f"| {s['mbps']:g} Mbit/s | `{s['best']}` | {s['best_ms']:.1f} ms | {s['auto_ms']:.1f} ms | "
            f"{s['ratio']:.2f} ({per}){ci} | {'yes' if s['within'] else '**no**'} | {aa} | {used} | "
            + (f"`{inner['plan']}` {inner['median_ms']:.1f} ms" if inner else "–")
            + f" | {_ms(s['local_ms'])} ms | "
            + (f"`{upl['plan']}` {upl['median_ms']:.1f} ms" if upl else "–")
            + f" | {'yes' if beats else 'no'} |"
        )
    misses = [s for s in settings if not s["within"]]
    L += [""]
    if misses:
        L.append(
            "**The planner misses the 5 % target at "
            + ", ".join(
                f"{s['mbps']:g} Mbit/s ({s['ratio']:.2f}x the best fixed plan's median)" for s in misses
            )
            + ".**"
        )
        noise = [s for s in misses if "ratio_ci" in s and s["ratio_ci"][0] <= 1.0]
        if noise:
            L.append(
                "At "
                + ", ".join(
                    f"{s['mbps']:g} Mbit/s (95 % CI {s['ratio_ci'][0]:.2f}–{s['ratio_ci'][1]:.2f}"
                    + (f"; A/A {s['aa_ci'][0]:.2f}–{s['aa_ci'][1]:.2f}" if "aa_ci" in s else "")
                    + ")"
                    for s in noise
                )
                + " the bootstrap interval of that ratio includes 1: on these frames the miss is not "
                "told apart from the bench's noise."
            )
    else:
        L.append(
            "The planner's median is within 5 % of the best fixed plan's at every link setting (pooled runs)."
        )
    L.append("")
    wins = [s for s in settings if s["split_beats_both"]]
    if wins:
        L.append(
            "Split (0 < k < L) beats both local and image upload at "
            + ", ".join(f"{s['mbps']:g} Mbit/s (`{s['inner']['plan']}`)" for s in wins)
            + "."
        )
    nowin = [s for s in settings if not s["split_beats_both"]]
    if nowin:
        why = []
        for s in nowin:
            inner = s["inner"]
            if inner is None:
                why.append(f"{s['mbps']:g} Mbit/s: no inner-cut plan was run")
                continue
            loc = s["local_ms"]
            parts = [f"fastest split `{inner['plan']}` {inner['median_ms']:.1f} ms"]
            if loc is not None and inner["median_ms"] >= loc:
                parts.append(
                    f"local {loc:.1f} ms is faster: the whole tower on the weak edge costs less than the split's "
                    f"edge part + transfer + cloud ({inner['edge_ms']:.1f} + {inner['transfer_ms']:.1f} + "
                    f"{inner['cloud_ms']:.1f} ms, the rtt alone {args.rtt_ms:g} ms)"
                )
            upl = s["upload"]
            if upl is not None and inner["median_ms"] >= upl["median_ms"]:
                parts.append(f"image upload `{upl['plan']}` {upl['median_ms']:.1f} ms is faster")
            why.append(f"{s['mbps']:g} Mbit/s: " + "; ".join(parts))
        L.append("Split (0 < k < L) does not beat both local and image upload at: " + "; ".join(why) + ".")
    if images:
        L += ["", *(f"![{Path(p).stem}]({p})" for p in images)]
    if steps:
        L += [
            "",
            "## Step change",
            "",
            f"One planner node, {args.timeline_frames} frames per step, rates "
            + " → ".join(f"{s['mbps']:g}" for s in steps)
            + " Mbit/s (rtt as above). Settled = the plan most used in the step's last half; frames to "
            "settle = frames after the step until that plan is in use (and stays so for ≥ 80 % of the rest); "
            "exploration frames are counted where they fall.",
            "",
            "| step to | settled plan | re-planned | frames to settle | first frame | median before (last 10) | "
            "median after (settled) | plans used |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in steps:
            used = ", ".join(f"{p} {n}" for p, n in s["used"])
            L.append(
                f"| {s['mbps']:g} Mbit/s | `{s['settled']}` | {'yes' if s['replanned'] else 'no'} | "
                f"{s['frames_to_settle']} | {s['first_frame_ms']:.1f} ms | {_ms(s['before_ms'])} ms | "
                f"{_ms(s['after_ms'])} ms | {used} |"
            )
    for s in settings:
        L += [
            "",
            f"## {s['mbps']:g} Mbit/s up, rtt {args.rtt_ms:g} ms",
            "",
        ]
        L += plan_rows(s["rows"])
        if "final" in s:
            L += [
                "",
                f"Final ({args.final_frames} frames per plan and run; the summary's numbers):",
                "",
                *plan_rows(s["final"]["rows"]),
            ]
    md = "\n".join(L) + "\n"
    return {"markdown": md, "settings": settings, "steps": steps, "frames": frames, "timeline": timeline,
            "device": device, "plans": plans}  # fmt: skip


def plan_rows(rows: list[dict[str, Any]]) -> list[str]:
    """A markdown table, one row per plan, fastest first."""
    out = [
        "| plan | median ms | p95 ms | edge | transfer | cloud | payload B/image | wire B/frame | "
        "agreement | answered split | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["median_ms"]):
        note = "**best fixed**" if r.get("best") else ""
        if r["plan"] == "auto":
            note = "**planner**: " + ", ".join(f"{p} {n}" for p, n in r["used"])
        if r["plan"] == CONTROL:
            note = "A/A control (`local`, a fresh node of its own)"
        elif r["reasons"] and r["plan"] != "local" and r["plan"] not in NOT_FIXED:
            note += " local: " + ", ".join(f"{p} {n}" for p, n in r["reasons"])
        out.append(
            f"| `{r['plan']}` | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | {r['edge_ms']:.1f} | "
            f"{r['transfer_ms']:.1f} | {r['cloud_ms']:.1f} | {r['bytes']:,.0f} | {r['wire_bytes']:,.0f} | "
            f"{r['agreement']:.1%} | {r['split']}/{r['n']} | {note} |"
        )
    return out

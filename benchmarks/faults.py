"""`splitclip bench faults`: a fault drill on real processes, through the link proxy.

One cloud (`python -m cloud_service.cli`: a local Ray + Serve, in its own session) that uses a Valkey
the drill owns (so it can kill it and restart it on the same port), a LinkProxy (benchmarks/link.py) in
front of the cloud's gRPC port, and an EdgeNode through the proxy classifying frames at a steady rate.
Each fault is injected while frames flow, then cleared:

- stall: the proxy stops forwarding and closes nothing (no FIN, no RST): only deadlines can notice;
- reset: every connection through the proxy is aborted with RST while frames are in flight;
- redis: the cloud's Valkey is SIGKILLed, restarted empty on the same port after the hold;
- slow: the VisionTail replica's worker process is SIGSTOPped (frames pass their deadline), SIGCONT after;
- kill: the cloud's whole session is SIGKILLed mid-stream, then started again;
- roll: the cloud is redeployed (stopped, started) with another bundle while the edge runs the old one;
  the edge then rolls too (a new EdgeNode on the new bundle).

Per fault: frames sent and answered (by name: each exactly once?), answers by mode/reason, the time from
the fault to the first local answer and from its clearing to the first split answer of a frame sent after
it (split mode back), and late cloud answers dropped because the frame had been answered locally.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.faultdrill import (
    Drill,
    DrillError,
    DrillSettings,
    FaultRun,
    record,
    replica_pids,
    rolled_copy,
    until,
)

HELP = "fault drill: stall, reset, Redis, slow replica, cloud kill, bundle roll, each answered once"
DESCRIPTION = __doc__.split("\n", 2)[2] if __doc__ else ""
ROOT = Path(__file__).resolve().parent.parent
FAULTS = ("stall", "reset", "redis", "slow", "kill", "roll")  # the drill's order; "kill-roll": both at once
SPLIT = "cloud"

# The reasons each fault may give, per feed (the node before and after an edge roll), and those it must.
_LOST = {SPLIT, "link_lost", "breaker_open"}
EXPECT: dict[str, dict[str, tuple[set[str], set[str]]]] = {
    "stall": {"edge": (_LOST | {"deadline"}, {SPLIT, "deadline"})},
    "reset": {"edge": (_LOST, {SPLIT, "link_lost"})},
    "redis": {"edge": ({SPLIT}, {SPLIT})},
    "slow": {
        "edge": (_LOST | {"deadline"}, {SPLIT, "deadline"}),
        "patient": ({SPLIT, "deadline"}, {SPLIT, "deadline"}),  # its breaker never opens
    },
    "kill": {"edge": (_LOST, {SPLIT, "link_lost"})},
    # a clean stop can fail in-flight frames inside the cloud (an error Result) as it winds down
    "roll": {
        "old": (_LOST | {"cloud_error", "bundle_mismatch"}, {"bundle_mismatch"}),
        "new": ({SPLIT}, {SPLIT}),
    },
    "kill-roll": {
        "old": (_LOST | {"bundle_mismatch"}, {"link_lost", "bundle_mismatch"}),
        "new": ({SPLIT}, {SPLIT}),
    },
}


def build_parser(p: argparse.ArgumentParser) -> None:
    p.description = "Fault drill through the link proxy, on a real cloud.\n\n" + DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--bundle",
        default=os.environ.get("SPLITCLIP_BUNDLE") or str(ROOT / "bundles" / "demo"),
        help="bundle directory (default SPLITCLIP_BUNDLE, else bundles/demo); the roll copies it",
    )
    p.add_argument("--faults", default=",".join(FAULTS), help=f"in this order (default {','.join(FAULTS)})")
    p.add_argument("--fps", type=float, default=20.0, help="frames per second the edge sends (default 20)")
    p.add_argument("--deadline-s", type=float, default=1.0, help="the edge's frame deadline (default 1)")
    p.add_argument("--hold-s", type=float, default=3.0, help="how long stall/redis/slow last (default 3)")
    p.add_argument("--delay-ms", type=float, default=10.0, help="the link's one-way delay (default 10)")
    p.add_argument("--window", type=int, default=8, help="frames in flight on the stream (default 8)")
    p.add_argument("--warmup", type=int, default=20, help="split answers before each fault (default 20)")
    p.add_argument("--settle", type=int, default=20, help="split answers after it clears (default 20)")
    p.add_argument("--recover-s", type=float, default=30.0, help="give up on split mode after (default 30)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the cloud's local Ray (default 2)")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")


def problems(r: FaultRun) -> list[str]:
    """What differs from EXPECT: the reasons each feed gave, each frame once, split mode back."""
    out = (
        []
        if r.once_each
        else [
            f"sent {r.sent}, answered {r.answered}, counted {r.counted} ({r.duplicates} twice, {r.missing} never)"
        ]
    )
    for tag, (allowed, required) in EXPECT[r.fault].items():
        got = set(r.by_feed.get(tag, {}))
        if got - allowed:
            out.append(f"{tag}: unexpected reasons {sorted(got - allowed)}")
        if required - got:
            out.append(f"{tag}: no answer with reason {sorted(required - got)}")
    if r.to_split_s is None:
        out.append("not back to split mode")
    return out


# -- the faults: each injects, clears, and says what the frames saw -------------------------------
def stall(d: Drill) -> FaultRun:
    with d.feed() as f:
        d.warm(f)
        t0 = time.monotonic()
        d.proxy.stall()
        try:
            time.sleep(d.s.hold_s)
        finally:
            d.proxy.resume()
        t1 = time.monotonic()
        d.settle(f, t1)
    return record("stall", [f], t0, t1, f"silent {t1 - t0:.1f} s")


def reset(d: Drill) -> FaultRun:
    with d.feed() as f:
        d.warm(f)
        # a longer delay holds frames on the link, so that some are in flight when the RST comes
        d.proxy.set(delay_ms=d.s.delay_ms + 150 * d.s.deadline_s)  # a round trip well inside the deadline
        try:
            held = until(lambda: f.in_flight >= 3, 10.0)
            t0 = time.monotonic()
            d.proxy.reset()
        finally:
            d.proxy.set(delay_ms=d.s.delay_ms)
        d.settle(f, t0)  # nothing to clear: the proxy takes new connections at once
    return record("reset", [f], t0, t0, "" if held else "fewer than 3 frames were in flight")


def redis(d: Drill) -> FaultRun:
    node_id = d.node.settings.node_id
    with d.feed() as f:
        d.warm(f)
        before = d.registered(node_id, 5.0)
        t0 = time.monotonic()
        d.redis.kill()
        try:
            time.sleep(d.s.hold_s)
        finally:
            d.redis.start()  # empty, on the same port
        t1 = time.monotonic()
        back = d.registered(node_id, d.s.recover_s)
        d.settle(f, t1)
    note = (
        "node not in the registry before"
        if before is None
        else (
            "node not in the registry again"
            if back is None
            else f"node in the registry again after {back:.1f} s"
        )
    )
    r = record("redis", [f], t0, t1, note)
    r.registry_s = back
    return r


def slow(d: Drill) -> FaultRun:
    """The tail stops; beside the drill's node, a "patient" one whose breaker never opens keeps its
    stream, so the cloud's answers to frames already answered locally do come back, late, and must be
    dropped (the drill's node drops its stream when its breaker opens, and with it those answers)."""
    pids = replica_pids(d.cloud.pid, "VisionTail")
    if not pids:
        raise DrillError("no VisionTail replica process found in the cloud's session")
    patient = d.edge(d.cloud.bundle, breaker_failures=1 << 30)
    try:
        with d.feed() as f, d.feed(patient, "patient") as p:
            d.warm(f)
            d.warm(p)
            t0 = time.monotonic()
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(d.s.hold_s)
            finally:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
            t1 = time.monotonic()
            d.settle(f, t1)
            d.settle(p, t1)
            # the backlog's answers: wait for them, a while, so that the late ones are counted
            until(
                lambda: patient.stats.late_dropped - p.late0 >= p.count(_deadline, after=0.0), d.s.deadline_s
            )
    finally:
        patient.close()
    note = f"{len(pids)} replica(s) stopped {t1 - t0:.1f} s; late: {p.late} of the patient node's {p.count(_deadline, after=0.0)} deadlines"
    return record("slow", [f, p], t0, t1, note)


def _deadline(r: Any) -> bool:
    return r.reason == "deadline"


def kill(d: Drill) -> FaultRun:
    with d.feed() as f:
        d.warm(f)
        t0 = time.monotonic()
        d.cloud.kill()
        up = d.start_cloud()
        t1 = time.monotonic()
        d.settle(f, t1)
    return record("kill", [f], t0, t1, f"cloud restart {up:.1f} s")


def roll(d: Drill, *, hard: bool = False) -> FaultRun:
    """The cloud goes down and comes back with the other bundle (`hard`: SIGKILL, else a clean stop);
    the old node must answer locally with bundle_mismatch; then the edge rolls to a new node."""
    name = "kill-roll" if hard else "roll"
    new_bundle = d.bundles[1] if d.cloud.bundle == d.bundles[0] else d.bundles[0]
    if not new_bundle.exists():
        rolled_copy(d.bundles[0], new_bundle)
    old = d.node
    with d.feed(old, "old") as f_old:
        d.warm(f_old)
        t0 = time.monotonic()
        if hard:
            d.cloud.kill()
        else:
            d.cloud.stop()
        d.cloud.bundle = new_bundle
        up = d.start_cloud()
        back = time.monotonic()
        seen = f_old.wait(
            lambda r: r.reason.startswith("bundle_mismatch"), d.s.settle, after=back, timeout=d.s.recover_s
        )
    t1 = time.monotonic()  # the edge rolls
    d.node = None
    old.close()
    d.node = d.edge(new_bundle)
    with d.feed(d.node, "new") as f_new:
        d.settle(f_new, t1)
    mismatch = f_old.first(lambda r: r.reason.startswith("bundle_mismatch"), after=back)
    note = f"cloud down and up with the new bundle in {back - t0:.1f} s (start {up:.1f} s); " + (
        f"old node bundle_mismatch {mismatch[0] - back:.2f} s after"
        if mismatch and seen
        else "old node never said bundle_mismatch"
    )
    return record(name, [f_old, f_new], t0, t1, note)


DRILLS: dict[str, Callable[[Drill], FaultRun]] = {
    "stall": stall, "reset": reset, "redis": redis, "slow": slow, "kill": kill,
    "roll": roll, "kill-roll": lambda d: roll(d, hard=True),
}  # fmt: skip


# -- the report ----------------------------------------------------------------------------------
def _s(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} s"


def table(runs: list[FaultRun]) -> str:
    rows = [
        "| fault | sent | answered | twice | answers (mode/reason: frames) | fault → first local answer "
        "| cleared → split | late answers dropped | as expected | note |",
        "|---|---:|---:|---:|---|---|---:|---:|---|---|",
    ]
    for r in runs:
        answers = ", ".join(f"{m}/{why}: {n}" for (m, why), n in sorted(r.answers.items()))
        to_local = _s(r.to_local_s) + (f" ({r.first_local})" if r.first_local else "")
        ok = "; ".join(problems(r)) or "yes"
        rows.append(
            f"| {r.fault} | {r.sent} | {r.answered} | {r.duplicates} | {answers} | {to_local} | "
            f"{_s(r.to_split_s)} | {r.late} | {ok} | {r.note} |"
        )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the cloud, Valkey and proxy go too
    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    unknown = [n for n in names if n not in DRILLS]
    if unknown:
        print(f"error: unknown faults {', '.join(unknown)} (have {', '.join(DRILLS)})", file=sys.stderr)
        return 2
    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").is_file():
        print(
            f"error: no bundle at {bundle} (make demo, or splitclip partition, or --bundle)", file=sys.stderr
        )
        return 2
    s = DrillSettings(
        fps=args.fps, deadline_s=args.deadline_s, hold_s=args.hold_s, delay_ms=args.delay_ms,
        window=args.window, warmup=args.warmup, settle=args.settle, recover_s=args.recover_s,
        num_cpus=args.num_cpus,
    )  # fmt: skip
    try:
        s.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="splitclip-faults-"))
    runs: list[FaultRun] = []
    with Drill(bundle, work, s, log=lambda m: print(m, flush=True)) as d:
        for name in names:
            r = DRILLS[name](d)
            runs.append(r)
            print(f"{name}: sent {r.sent}, answered {r.answered}, to local {_s(r.to_local_s)}, "
                  f"to split {_s(r.to_split_s)}; {dict(r.answers)}", flush=True)  # fmt: skip
    settings = (
        f"{s.fps:g} frames/s, frame deadline {s.deadline_s:g} s, window {s.window}, hold {s.hold_s:g} s, "
        f"link delay {s.delay_ms:g} ms each way, breaker 3 failures, probes 0.25..1 s, cloud heartbeat "
        f"{s.heartbeat_s:g} s, local Ray {s.num_cpus} CPUs"
    )
    report = f"Bundle {Path(args.bundle).name}; {settings}.\n\n{table(runs)}\n"
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(not problems(r) for r in runs) else 1


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="splitclip bench faults")
    build_parser(_p)
    raise SystemExit(run(_p.parse_args()))

"""`splitclip bench e2e`: every fixed plan and the online planner, through a real cloud and an emulated link, from a weak edge device.

Setup: a real cloud (demo.cloudproc.CloudProcess: local Ray + Serve + embedded Valkey) behind a
benchmarks/link.LinkProxy (uplink rate `--mbps`, rtt `--rtt-ms` as half of it added each way; downlink
unlimited); the edge runs in its own process (benchmarks/e2e_edge.py) under a cgroup CPU quota of
`--edge-cpu` CPUs (benchmarks/weak_device.py; unlimited, and said, where cgroups are not writable),
with one ONNX Runtime thread and its own device-profile cache (profiled under the quota).

Plans: local; cut 0 with every image preset; every inner cut with every preset; cut L; each only if the
bundle's agreement table puts it at or above `--floor`; and `auto` (the node's planner, a fresh node per
link setting, so it learns that link from scratch). At each link setting every plan answers the same
images, one frame at a time, the plans interleaved round by round in a shuffled order (machine noise
falls on all of them alike); fixed plans have `--warmup` unmeasured frames, the planner `--auto-warmup`
(it must learn first: how long that takes is the step-change run's subject). The sweep repeats
`--runs` times; the table pools the runs, and the planner/best ratio is also given per run.

Final: a screening of 30 plans on a few frames each cannot tell 5 % apart (the A/A control shows
how far two runs of one plan differ). So each setting ends with a final: the fixed plans within
`--final-within` of the screening's best (at most 3, picked in run 1), the planner and the A/A control
run `--final-frames` more frames each, and the 5 % verdict is taken on those fresh frames.

Step change (`--timeline 100,1,20`): one planner node, `--timeline-frames` frames per step, the link's
rate changed between two frames; frames until the plan in use is the one it then keeps, latency
before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.e2e_report import report
from benchmarks.e2e_stats import CONTROL, analyse, finalists

HELP = "end to end: every fixed plan and the planner, real cloud, emulated link, weak edge"
ROOT = Path(__file__).resolve().parent.parent
DESCRIPTION = __doc__.split("\n", 2)[2] if __doc__ else ""


def build_parser(p: argparse.ArgumentParser) -> None:
    p.description = "End-to-end latency per plan and link, planner vs the best fixed plan.\n\n" + DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--bundle", default=os.environ.get("SPLITCLIP_BUNDLE") or str(ROOT / "bundles" / "demo"))
    p.add_argument("--mbps", default="1,5,20,100", help="uplink rates, Mbit/s (default 1,5,20,100)")
    p.add_argument(
        "--rtt-ms", type=float, default=20.0, help="round-trip time added by the link (default 20)"
    )
    p.add_argument("--images", type=int, default=12, help="distinct demo images (default 12)")
    p.add_argument("--frames", type=int, default=10, help="measured frames per plan, setting and run (10)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured frames per fixed plan and setting (2)")
    p.add_argument("--auto-warmup", type=int, default=8, help="unmeasured frames of the planner (8)")
    p.add_argument(
        "--final-frames",
        type=int,
        default=100,
        help="frames per plan and run of each setting's final: the fixed plans within --final-within of the "
        "best (at most 3, picked in run 1), the planner and, with local, the A/A control, on more frames "
        "than the screening of every plan; the 5 %% verdict is the final's (default 100; 0 = none)",
    )
    p.add_argument(
        "--final-within",
        type=float,
        default=0.25,
        help="fixed plans whose screening median is within this fraction of the best go to the final (0.25)",
    )
    p.add_argument("--runs", type=int, default=3, help="sweeps of every setting (default 3)")
    p.add_argument("--edge-cpu", type=float, default=0.25, help="CPUs of the edge process (default 0.25)")
    p.add_argument(
        "--cgroup-period-us",
        type=int,
        default=4000,
        help="CFS period of the quota (default 4000, the least that holds a 1 ms quota at 0.25 CPU: with "
        "longer periods a frame waits out whole throttles, slower and noisier than a weak CPU)",
    )
    p.add_argument("--floor", type=float, default=0.99, help="agreement floor of the fixed plans (0.99)")
    p.add_argument("--plans", default=None, help="comma list of fixed plans to run (default: all allowed)")
    p.add_argument(
        "--gap-ms",
        type=float,
        default=25.0,
        help="idle time before each frame, as between a camera's frames (default 25; see the report)",
    )
    p.add_argument(
        "--noise", type=float, default=0.0, help="sensor noise of the images, grey levels (default 0)"
    )
    p.add_argument("--burst-bytes", type=int, default=1500, help="the link's token bucket (default 1500)")
    p.add_argument("--timeline", default="100,1,20", help="step-change rates, Mbit/s ('' = none)")
    p.add_argument("--timeline-frames", type=int, default=30, help="frames per step (default 30)")
    p.add_argument("--labels", type=Path, default=ROOT / "models" / "demo-labels.txt")
    p.add_argument("--seed", type=int, default=77, help="image and order seed (default 77)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    p.add_argument("--plots", type=Path, default=None, help="write the PNG plots into this folder")
    p.add_argument("--json", type=Path, default=None, help="also write every frame here")


# -- plans ---------------------------------------------------------------------------------------
def fixed_plans(table: Any, num_blocks: int, floor: float) -> list[str]:
    """local, then every (cut, preset) of the table at or above the floor, by cut and bytes: fp32 edge
    stages first, then the int8 ones where the bundle has them (`cut<k>/int8/<preset>`, the planner's
    label), so the planner is never compared only with plans slower than its own choices."""
    rows = sorted(
        (r for r in table.allowed(floor) if 0 <= r.cut <= num_blocks),
        key=lambda r: (r.edge != "fp32", r.cut, r.bytes, r.preset),
    )
    return [
        "local",
        *(f"cut{r.cut}/{r.preset}" if r.edge == "fp32" else f"cut{r.cut}/{r.edge}/{r.preset}" for r in rows),
    ]


# -- the edge worker -----------------------------------------------------------------------------
class Edge:
    """The edge worker process (benchmarks/e2e_edge.py), one JSON line each way per command."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as f:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f, text=True
            )
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the edge worker exited ({self.proc.poll()}); {self.log}:\n{tail}")
        return dict(json.loads(line))

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def write_images(folder: Path, n: int, image_size: int, seed: int, noise: float = 0.0) -> None:
    """n demo scenes (half seen, half held-out combos) as PNG files, as a camera would hand them over;
    `noise` > 0 adds Gaussian sensor noise of that many grey levels (flat synthetic scenes compress far
    better than a camera's frames, which flatters lossless image upload)."""
    import numpy as np
    from PIL import Image

    from partitioner.synthetic import make_scenes

    seen, _ = make_scenes(n - n // 2, seed, "seen", image_size)
    held, _ = make_scenes(n // 2, seed, "heldout", image_size)
    rng = np.random.default_rng(seed)
    for i, img in enumerate([*seen, *held]):
        if noise > 0:
            img = np.clip(img + rng.normal(0.0, noise, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img, "RGB").save(folder / f"img_{i:03d}.png")


# -- the run -------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from benchmarks.link import LinkProxy
    from benchmarks.weak_device import CpuLimit
    from demo.cloudproc import CloudProcess
    from splitclip.bundle import load_bundle

    # SIGTERM unwinds like Ctrl-C, so the cloud (Ray, Valkey), the link and the cgroup are torn down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bundle_dir = Path(args.bundle).resolve()
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    table = bundle.agreement()
    if table is None:
        print(
            f"error: {bundle_dir} has no agreement.json: rebuild it with `splitclip partition`",
            file=sys.stderr,
        )
        return 2
    plans = fixed_plans(table, m.num_blocks, args.floor)
    if args.plans:
        wanted = [p.strip() for p in args.plans.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in plans]
        if unknown:
            print(f"error: not a plan at or above the floor: {', '.join(unknown)} (have {', '.join(plans)})",
                  file=sys.stderr)  # fmt: skip
            return 2
        plans = wanted
    rates = [float(x) for x in args.mbps.split(",") if x.strip()]
    steps = [float(x) for x in args.timeline.split(",") if x.strip()]
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="splitclip-e2e-"))
    (work / "images").mkdir()
    write_images(work / "images", args.images, m.vision.image_size, args.seed, args.noise)
    limit = CpuLimit(args.edge_cpu, period_us=args.cgroup_period_us)
    if not limit.start():
        print(f"note: the edge runs UNLIMITED: {limit.why}", flush=True)
    print(f"edge device: {limit.describe()}", flush=True)
    print(f"{len(plans)} fixed plans + auto; links {rates} Mbit/s, rtt {args.rtt_ms:g} ms", flush=True)
    frames: list[dict[str, Any]] = []
    timeline: list[dict[str, Any]] = []
    t_start = time.monotonic()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "SPLITCLIP_ORT_THREADS": "1",
        "SPLITCLIP_CACHE_DIR": str(work / "cache"),
    }
    for k in ("SPLITCLIP_CUT", "SPLITCLIP_CODEC", "SPLITCLIP_CLOUD"):
        env.pop(k, None)
    edge: Edge | None = None
    try:
        with CloudProcess(bundle_dir, log_path=work / "cloud.log") as cloud:
            up_s = cloud.start()
            print(f"cloud up in {up_s:.1f} s at {cloud.address}", flush=True)
            host, _, port = cloud.address.rpartition(":")
            link = LinkProxy(host, int(port), delay_ms=args.rtt_ms / 2, burst_bytes=args.burst_bytes)
            with link as proxy:
                cmd = [
                    sys.executable, "-m", "benchmarks.e2e_edge", "--bundle", str(bundle_dir),
                    "--cloud", proxy.address, "--images", str(work / "images"), "--labels", str(args.labels),
                ]  # fmt: skip
                edge = Edge(limit.wrap(cmd), env, work / "edge.log")
                print(f"edge worker up ({edge.ready['images']} images, reference answers)", flush=True)
                for plan in [*plans, CONTROL]:
                    edge.ask(op="open", plan=plan)
                n_rounds = max(args.warmup, args.auto_warmup) + args.frames
                finals: dict[float, list[str]] = {}  # per link: the final's fixed plans (from run 1)

                def frame(plan: str, run_i: int, mbps: float, r: int, measured: bool, final: bool) -> None:
                    assert edge is not None
                    time.sleep(args.gap_ms / 1e3)
                    b0 = proxy.bytes_up
                    f = edge.ask(op="frame", plan=plan, image=r % args.images)
                    f.update(
                        requested=plan, run=run_i, mbps=mbps, round=r, measured=measured, final=final,
                        wire_up=proxy.bytes_up - b0,
                    )  # fmt: skip
                    frames.append(f)

                for run_i in range(args.runs):
                    for mbps in rates:
                        t0 = time.monotonic()
                        proxy.set(mbps_up=mbps)
                        opened = edge.ask(op="open", plan="auto")  # a fresh planner per setting ...
                        edge.ask(op="open", plan=CONTROL)  # ... and a fresh control beside it
                        for r in range(n_rounds):
                            order = [*plans, CONTROL, "auto"]
                            rng.shuffle(order)
                            for plan in order:
                                warm = args.auto_warmup if plan == "auto" else args.warmup
                                if r >= n_rounds - args.frames - warm:
                                    frame(plan, run_i, mbps, r, r >= n_rounds - args.frames, False)
                        done = [f for f in frames if f["run"] == run_i and f["mbps"] == mbps]
                        a = analyse(done, plans)
                        line = (
                            f"run {run_i + 1}/{args.runs} {mbps:g} Mbit/s: best fixed {a['best']} "
                            f"{a['best_ms']:.1f} ms, planner {a['auto_ms']:.1f} ms ({a['ratio']:.2f}x; "
                            f"profile+open {opened['s']:.1f} s)"
                        )
                        if args.final_frames:
                            if mbps not in finals:  # picked in run 1, kept for the others
                                finals[mbps] = finalists(a, args.final_within)
                            fin = finals[mbps]
                            order = [*fin, "auto", *([CONTROL] if "local" in fin else [])]
                            for r in range(n_rounds, n_rounds + args.final_frames):
                                rng.shuffle(order)
                                for plan in order:
                                    frame(plan, run_i, mbps, r, True, True)
                            fa = analyse(
                                [f for f in frames if f["run"] == run_i and f["mbps"] == mbps and f["final"]],
                                fin,
                            )
                            line += f"; final ({', '.join(fin)}): {fa['best']} {fa['best_ms']:.1f} ms, planner {fa['ratio']:.2f}x"
                        print(f"{line} [{time.monotonic() - t0:.0f} s]", flush=True)
                if steps:
                    proxy.set(mbps_up=steps[0])
                    edge.ask(op="open", plan="auto")
                    for mbps in steps:
                        proxy.set(mbps_up=mbps)
                        for i in range(args.timeline_frames):
                            time.sleep(args.gap_ms / 1e3)
                            f = edge.ask(op="frame", plan="auto", image=i % args.images)
                            f.update(mbps=mbps, step_frame=i)
                            timeline.append(f)
                    print(f"step change done: {len(timeline)} frames", flush=True)
                edge.close()
                edge = None
    finally:
        if edge is not None:
            edge.close()
        throttle = limit.throttled()
        device = limit.describe()
        limit.remove()
    result = report(args, bundle_dir, m, device, plans, rates, frames, timeline, throttle)
    result["wall_s"] = time.monotonic() - t_start
    print(result["markdown"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(result["markdown"])
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in result.items() if k != "markdown"}, indent=1))
    print(f"({result['wall_s']:.0f} s; logs in {work})", flush=True)
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="splitclip bench e2e")
    build_parser(_p)
    raise SystemExit(run(_p.parse_args()))

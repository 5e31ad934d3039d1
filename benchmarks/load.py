"""`splitclip bench load`: many edge node processes against the multi-node cluster, for a minute or more.

N edge node processes (multiprocessing, spawn), each an EdgeNode streaming its own frames over one
bidi stream with a fixed plan from a mix of cuts and codec presets, at a paced rate, against a
`splitclip cluster` (started here with cloud_service.cluster, or an existing one via --cluster-dir).
Counted per node: frames lost (sent, never answered), duplicated (a frame id answered twice), errors
(results with an error, exceptions), local answers and their reasons. Reported: throughput, end-to-end
latency percentiles (the EdgeResult's, preprocessing to answer), the VisionTail's ORT batch sizes
(Ray's Prometheus export of splitclip_batch_size, summed over the nodes) and the VisionTail replica
counts over time (Serve's status, sampled every second). Optionally a PNG of replicas and throughput.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HELP = "many edge node processes against the multi-node cluster: lost/dup/errors, latency, replicas"

PROMPTS = ["a photo of a cat", "a photo of a dog", "red circle", "blue square"]
TOKEN = "bench-load-token"


def build_parser(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n", 2)[2] if __doc__ else ""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--bundle", default=os.environ.get("SPLITCLIP_BUNDLE"), help="bundle directory (required)")
    p.add_argument("--nodes", type=int, default=16, help="edge node processes (default 16)")
    p.add_argument("--frames", type=int, default=500, help="frames per node (default 500)")
    p.add_argument(
        "--rate", type=float, default=8.0, help="frames/s per node, 0 = as fast as it goes (default 8)"
    )
    p.add_argument("--window", type=int, default=8, help="frames in flight per node (default 8)")
    p.add_argument("--cluster-dir", default=None, help="use the cluster `splitclip cluster up --dir` started")
    p.add_argument(
        "--workers", type=int, default=2, help="worker nodes of the cluster started here (default 2)"
    )
    p.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs per worker node (default 1)")
    p.add_argument(
        "--target-ongoing", type=float, default=0.5,
        help="VisionTail target_ongoing_requests of the cluster started here (default 0.5, docs/cluster.md)",
    )  # fmt: skip
    p.add_argument(
        "--linger", type=float, default=25.0, help="s to keep sampling after the load (default 25)"
    )
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    p.add_argument("--plot", default=None, help="PNG of replicas and throughput over time (matplotlib)")


def plans(num_blocks: int) -> list[tuple[int, str]]:
    """The mix of (cut, preset) plans the nodes take in turn: image upload, inner cuts, the embedding."""
    L, mid = num_blocks, max(1, num_blocks // 2)
    return [
        (1, "int8-zstd"), (mid, "klt-q20-ans"), (0, "int8-zstd"), (L, "fp16"),
        (mid, "lossless"), (1, "klt-q10-ans"), (mid, "int8"), (max(1, L - 1), "int4-zstd"),
    ]  # fmt: skip


# -- one edge node process -------------------------------------------------------------------------
def edge_process(
    i: int, address: str, bundle: str, plan: tuple[int, str], frames: int, rate: float, window: int,
    token: str, start_at: float, out: Any,
) -> None:  # fmt: skip
    """Runs in a child process: stream `frames` frames, send back one summary dict on `out`."""
    os.environ.setdefault("SPLITCLIP_ORT_THREADS", "1")  # 16 processes on a few cores: no thread pools each
    import numpy as np

    from edge_node.node import EdgeNode

    rng = np.random.default_rng(i)
    images = [(rng.random((40 + k % 9, 48, 3)) * 255).astype(np.uint8) for k in range(16)]
    cut, preset = plan
    summary: dict[str, Any] = {"node": i, "plan": f"cut{cut}/{preset}", "sent": 0, "exceptions": []}
    answers: list[tuple[float, int, str, str, float, bool]] = []  # wall time, id, mode, reason, ms, error
    try:
        with EdgeNode(
            bundle, cloud=address, cut=cut, codec=preset, window=window, node_token=token,
            node_id=f"load-{i}", probe_interval_s=0.25, probe_max_s=1.0,
        ) as node:  # fmt: skip
            time.sleep(max(0.0, start_at - time.time()))  # every node starts together

            def feed() -> Any:
                t0 = time.monotonic()
                for k in range(frames):
                    if rate > 0:
                        time.sleep(max(0.0, t0 + k / rate - time.monotonic()))
                    summary["sent"] += 1
                    yield images[k % len(images)]

            for r in node.classify_many(feed(), PROMPTS):
                answers.append((time.time(), r.frame_id, r.mode, r.reason, r.latency_ms, r.error is not None))
            summary["node_errors"] = node.stats.errors
    except Exception as e:  # reported, counted as an error
        summary["exceptions"].append(f"{type(e).__name__}: {e}")
    summary["answers"] = answers
    out.put(summary)


# -- sampling the cluster --------------------------------------------------------------------------
@dataclass
class Samples:
    t: list[float] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    starting: list[int] = field(default_factory=list)


def sample_replicas(cluster: Any, stop: threading.Event, s: Samples, period_s: float = 1.0) -> None:
    while not stop.is_set():
        try:
            reps = cluster.replicas("VisionTail")
        except Exception:  # a busy dashboard misses a sample; the next one comes a second later
            reps = None
        if reps is not None:
            s.t.append(time.time())
            s.running.append(sum(r["state"] == "RUNNING" for r in reps))
            s.starting.append(
                sum(r["state"] in ("STARTING", "PENDING_ALLOCATION", "PENDING_INITIALIZATION") for r in reps)
            )
        stop.wait(period_s)


def batch_histogram(cluster: Any) -> dict[str, float]:
    """splitclip_batch_size bucket counts (cumulative, by `le`) + _sum/_count, summed over the nodes."""
    out: dict[str, float] = {}
    for n in cluster.nodes:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{n.metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            continue
        for line in text.splitlines():
            if not line.startswith("ray_splitclip_batch_size"):
                continue
            name, value = line.rsplit(" ", 1)
            if name.startswith("ray_splitclip_batch_size_bucket"):
                key = name.split('le="', 1)[1].split('"', 1)[0]
            else:
                key = name.split("{", 1)[0].removeprefix("ray_splitclip_batch_size_")
            out[key] = out.get(key, 0.0) + float(value)
    return out


# -- the run ----------------------------------------------------------------------------------------
def run_load(
    cluster: Any, bundle: str, *, nodes: int, frames: int, rate: float, window: int, token: str,
    linger_s: float = 6.0,
) -> dict[str, Any]:  # fmt: skip
    """Drive `nodes` edge processes against `cluster` (a cloud_service.cluster.Cluster); the results."""
    from splitclip.bundle import load_bundle

    num_blocks = load_bundle(bundle).manifest.num_blocks
    mix = plans(num_blocks)
    ctx = mp.get_context("spawn")  # a fresh interpreter per node: no inherited threads or channels
    q = ctx.Queue()
    start_at = time.time() + 3.0 + 1.0 * nodes  # time for every process to import and load the bundle
    procs = [
        ctx.Process(
            target=edge_process,
            args=(i, cluster.address, bundle, mix[i % len(mix)], frames, rate, window, token, start_at, q),
        )
        for i in range(nodes)
    ]
    before = batch_histogram(cluster)
    samples, stop = Samples(), threading.Event()
    sampler = threading.Thread(target=sample_replicas, args=(cluster, stop, samples), daemon=True)
    sampler.start()
    for p in procs:
        p.start()
    summaries: list[dict[str, Any]] = []
    while len(summaries) < nodes:
        try:
            summaries.append(q.get(timeout=1.0))
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and q.empty():
                break  # a node process died without a summary: counted below
    for p in procs:
        p.join(30)
    for i in sorted(set(range(nodes)) - {s["node"] for s in summaries}):
        code = procs[i].exitcode
        summaries.append(
            {"node": i, "plan": "?", "sent": 0, "answers": [], "exceptions": [f"node {i} exited {code}"]}
        )
    time.sleep(linger_s)  # Ray exports metrics every few seconds; and see the replicas scale back down
    stop.set()
    sampler.join()
    after = batch_histogram(cluster)
    hist = {k: after[k] - before.get(k, 0.0) for k in after}
    return {"summaries": summaries, "samples": samples, "batch": hist, "start": start_at, "mix": mix}


def tally(res: dict[str, Any], frames: int) -> dict[str, Any]:
    answers = [a for s in res["summaries"] for a in s["answers"]]
    lost = dup = errors = 0
    for s in res["summaries"]:
        ids = Counter(a[1] for a in s["answers"])
        dup += sum(c - 1 for c in ids.values() if c > 1)
        lost += s["sent"] - len(ids) + (frames - s["sent"])
        errors += len(s["exceptions"]) + sum(a[5] for a in s["answers"]) + s.get("node_errors", 0)
    lat = sorted(a[4] for a in answers)
    t0 = res["start"]
    t_end = max((a[0] for a in answers), default=t0)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0

    return {
        "frames": len(answers), "lost": lost, "dup": dup, "errors": errors,
        "seconds": t_end - t0, "throughput": len(answers) / max(t_end - t0, 1e-9),
        "p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99),
        "modes": Counter(a[2] for a in answers), "reasons": Counter(a[3].split(":")[0] for a in answers),
        "exceptions": [e for s in res["summaries"] for e in s["exceptions"]],
    }  # fmt: skip


def report(res: dict[str, Any], t: dict[str, Any], setup: str) -> str:
    argv = sys.argv[1:]
    cmd = " ".join(argv[2:] if argv[:2] == ["bench", "load"] else argv)
    lines = [
        "## Result", "", f"Command: `splitclip bench load {cmd}`".rstrip(), "", setup, "",
        "| frames answered | lost | duplicated | errors | seconds | frames/s | p50 ms | p95 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {t['frames']} | {t['lost']} | {t['dup']} | {t['errors']} | {t['seconds']:.1f} | "
        f"{t['throughput']:.1f} | {t['p50']:.1f} | {t['p95']:.1f} | {t['p99']:.1f} |",
        "", "Answers by mode / reason: " + ", ".join(f"{k} {v}" for k, v in sorted(t["reasons"].items())), "",
    ]  # fmt: skip
    per = Counter(s["plan"] for s in res["summaries"])
    lines += ["Plans (nodes each): " + ", ".join(f"`{k}` {v}" for k, v in sorted(per.items())), ""]
    b = res["batch"]
    count = b.get("count", 0.0)
    if count:
        lines += [f"VisionTail ORT runs: {count:.0f}, mean batch {b.get('sum', 0.0) / count:.2f} frames", ""]
        lines += ["| batch size ≤ | ORT runs |", "|---:|---:|"]
        prev = 0.0
        for le in sorted((k for k in b if k not in ("sum", "count")), key=lambda k: float(k)):
            lines.append(f"| {le.removesuffix('.0')} | {b[le] - prev:.0f} |")
            prev = b[le]
        lines.append("")
    s = res["samples"]
    if s.t:
        lines += [
            "VisionTail replicas over time (RUNNING / starting, every 5th sample, s from the start):",
            "",
        ]
        cells = [
            f"{tt - res['start']:.0f}s: {r}/{st}"
            for tt, r, st in zip(s.t, s.running, s.starting, strict=True)
        ]
        lines += [" · ".join(cells[::5]), "", f"Most replicas RUNNING at once: {max(s.running)}", ""]
    if t["exceptions"]:
        lines += ["Exceptions:", "", *(f"- {e}" for e in t["exceptions"]), ""]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = res["start"]
    arrivals = [a[0] - t0 for s in res["summaries"] for a in s["answers"]]
    end = int(max(arrivals, default=0)) + 1
    per_s = Counter(int(x) for x in arrivals if x >= 0)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(range(end), [per_s.get(k, 0) for k in range(end)], label="frames answered / s", color="tab:blue")
    ax.set_xlabel("s")
    ax.set_ylabel("frames / s")
    ax2 = ax.twinx()
    s = res["samples"]
    ax2.step([x - t0 for x in s.t], s.running, where="post", color="tab:red", label="VisionTail replicas")
    ax2.set_ylabel("replicas (RUNNING)")
    ax2.set_ylim(0, max(s.running, default=1) + 1)
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def autoscaling(target: float, max_replicas: int) -> dict[str, dict[str, Any]]:
    """The VisionTail autoscaling the load run uses (docs/cluster.md says why not the file's 64)."""
    return {
        "VisionTail": {
            "autoscaling_config": {
                "max_replicas": max_replicas, "target_ongoing_requests": target, "upscale_delay_s": 2.0, "downscale_delay_s": 10.0,
                "look_back_period_s": 3.0, "metrics_interval_s": 1.0,
            }
        }
    }  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from cloud_service import cluster as clus

    if not args.bundle:
        print("error: --bundle (or SPLITCLIP_BUNDLE) is required", file=sys.stderr)
        return 2
    bundle = str(Path(args.bundle).resolve())
    token = os.environ.get("SPLITCLIP_NODE_TOKEN", "")
    own = args.cluster_dir is None
    if own:
        token = token or TOKEN
        d = tempfile.mkdtemp(prefix="splitclip-load-")
        print(f"bench load: starting a cluster in {d} (head + {args.workers} workers) ...", flush=True)
        c = clus.up(
            d, bundle, workers=args.workers, worker_cpus=args.worker_cpus,
            deployments=autoscaling(args.target_ongoing, max(1, int(args.workers * args.worker_cpus))), env={"SPLITCLIP_NODE_TOKEN": token},
        )  # fmt: skip
    else:
        c = clus.Cluster.load(args.cluster_dir)
        token = token or c.env_vars.get("SPLITCLIP_NODE_TOKEN", "")
    try:
        print(f"bench load: {args.nodes} nodes x {args.frames} frames against {c.address} ...", flush=True)
        res = run_load(
            c, bundle, nodes=args.nodes, frames=args.frames, rate=args.rate, window=args.window,
            token=token, linger_s=args.linger,
        )  # fmt: skip
    finally:
        if own:
            clus.down(c.dir)
    t = tally(res, args.frames)
    setup = (
        f"{args.nodes} edge node processes x {args.frames} frames at {args.rate:g} frames/s each "
        f"(window {args.window}), bundle `{Path(bundle).name}`, cluster: head + {len(c.workers)} workers "
        f"x {c.worker_cpus:g} CPUs, {os.cpu_count()} CPUs on the machine."
    )
    text = report(res, t, setup)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    if args.plot:
        plot(res, args.plot)
        print(f"wrote {args.plot}")
    return 0 if t["lost"] == t["dup"] == t["errors"] == 0 else 1


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="splitclip bench load")
    build_parser(_p)
    raise SystemExit(run(_p.parse_args()))

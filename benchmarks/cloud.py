"""`splitclip bench cloud`: whole-path throughput vs the raw ONNX Runtime tail, on the same cores.

1. raw: TailCore (the VisionTail's own code, same ORT threads and spinning as the replica) runs
   blocks k..L + head on batches of max_batch_size and of 1, in this process, before Ray starts, and
   at max_batch_size again after Ray has stopped (a VM's speed drifts): the ceiling the service can
   reach. ORT at its own defaults (threads, spinning on) is shown beside it.
2. whole path: a local Ray + Serve with deploy/serve_config.yaml and an embedded Valkey; N clients
   (asyncio gRPC, one call in flight each) send pre-encoded frames at cut k as unary Classify calls,
   through Serve's gRPC proxy, the ingress, the tail, the scorer and back. Optionally one bidi stream
   with N frames in flight.
3. the same at the highest client count with max_batch_size=1 (no grouping anywhere), to show what
   batching buys.
Every point: warm-up, then `--repeat` windows of `--duration` s; the median is reported. The ratio is
given against the median of all raw windows at max_batch_size (before and after) and, the most
conservative reading, against the fastest single raw window of any row. CPU seconds per process
(from /proc) during the windows give where the CPU goes per frame.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.cloud_cpu import MixCpu, nice_by_role, processes, raw_cpu_at_sizes, tail_share

HELP = "whole-path gRPC throughput vs raw ONNX Runtime tail"

DESCRIPTION = __doc__.split("\n", 2)[2] if __doc__ else ""


def build_parser(p: argparse.ArgumentParser) -> None:
    p.description = "Images/s through the whole cloud path vs raw ONNX Runtime tail.\n\n" + DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--bundle",
        default=os.environ.get("SPLITCLIP_BUNDLE"),
        help="bundle directory (required; or SPLITCLIP_BUNDLE)",
    )
    p.add_argument("--cut", type=int, default=1, help="cut k the frames are sent at (default 1)")
    p.add_argument("--codec", default="lossless", help="codec preset of the frames (default lossless)")
    p.add_argument("--clients", default="1,8,32", help="concurrent client counts (default 1,8,32)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured window (default 10)")
    p.add_argument(
        "--repeat", type=int, default=3, help="windows per point; the median is reported (default 3)"
    )
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per point (default 3)")
    p.add_argument("--max-batch-size", type=int, default=None, help="tail batch size (default: config)")
    p.add_argument("--batch-wait-s", type=float, default=None, help="tail batch wait (default: config)")
    p.add_argument(
        "--threads", type=int, default=None, help="ORT threads of the tail, raw and served (default: config)"
    )
    p.add_argument("--config", default=None, help="Serve config (default: deploy/serve_config.yaml)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument("--grpc-port", type=int, default=None, help="Serve's gRPC port (default: config, 9000)")
    p.add_argument("--http-port", type=int, default=None, help="Serve's HTTP port (default: config, 8000)")
    p.add_argument(
        "--worker-niceness",
        type=int,
        default=None,
        help="niceness Ray starts its workers at (RAY_worker_niceness; Ray's default 15). The bench's "
        "clients run at this process's niceness: 0 gives the tail the same share of the cores as them",
    )
    p.add_argument("--no-unbatched", action="store_true", help="skip the max_batch_size=1 comparison")
    p.add_argument("--no-stream", action="store_true", help="skip the one-bidi-stream row")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")


# -- CPU accounting ------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _role(pid: int, cmd: str) -> str:
    if pid == os.getpid():
        return "client (bench driver)"
    if "ServeReplica:" in cmd:
        return cmd.split("ServeReplica:", 1)[1].split()[0].split(":")[-1].split(".")[0]
    if "ProxyActor" in cmd:
        return "proxy"
    if "ServeController" in cmd:
        return "controller"
    if "/ray/" in cmd or cmd.startswith("ray::"):
        return "ray (raylet, gcs, agents)"
    if "valkey" in cmd or "redis" in cmd:
        return "valkey"
    return "other processes"


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) for every process on the machine (Linux /proc)."""
    return {
        pid: (_role(pid, cmd), (int(st[11]) + int(st[12])) / _TICK)  # utime + stime
        for pid, cmd, st in processes()
    }


def cpu_delta(a: dict[int, tuple[str, float]], b: dict[int, tuple[str, float]]) -> Counter[str]:
    """CPU seconds per role between two snapshots (processes alive in both)."""
    out: Counter[str] = Counter()
    for pid, (role, t) in b.items():
        if pid in a:
            out[role] += t - a[pid][1]
    return out


# -- measurements --------------------------------------------------------------------------------
@dataclass
class Point:
    name: str
    runs: list[float] = field(default_factory=list)  # images/s per window
    cpu: Counter[str] = field(default_factory=Counter)  # CPU seconds per role over all windows
    seconds: float = 0.0  # wall seconds of all windows
    frames: int = 0  # frames answered in all windows
    latency_ms: list[float] = field(default_factory=list)  # end-to-end, client side

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else 0.0

    def spread(self) -> str:
        return f"{min(self.runs):.1f}–{max(self.runs):.1f}" if len(self.runs) > 1 else ""


def raw_tail(
    bundle: str, cut: int, frames: list[Any], batch: int, threads: int | None, spinning: bool | None,
    duration: float, repeat: int,
) -> Point:  # fmt: skip
    """Images/s of TailCore alone on batches of `batch` decoded frames."""
    import numpy as np

    from cloud_service.vision_tail import TailCore

    core = TailCore(bundle, threads or 0, spinning=spinning)
    stacked = np.stack([frames[i % len(frames)] for i in range(batch)])  # [batch, ...]
    core.run_group(cut, stacked)  # warm-up
    p = Point(f"raw batch {batch}")
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration:
            core.run_group(cut, stacked)
            n += batch
        p.runs.append(n / (time.perf_counter() - t0))
    return p


async def wait_answering(address: str, frame: Any, timeout_s: float = 120.0) -> None:
    """Until one Classify is answered: a fresh deploy can be RUNNING before its proxy routes to it,
    and a client in `drive` stops at its first error."""
    import grpc

    from benchmarks.cloud_client import CHANNEL_OPTIONS
    from cloud_service.grpc_api import pb_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.SplitClipStub(channel)
        while True:
            try:
                await stub.Classify(frame, timeout=30)
                return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


async def drive(
    address: str, frames: list[Any], clients: int, warmup: float, duration: float, repeat: int,
    name: str, stream: bool = False,
) -> Point:  # fmt: skip
    """`clients` concurrent unary callers with one call in flight each (or, with `stream`, one bidi
    stream keeping `clients` frames in flight); `repeat` windows of `duration` s after `warmup`."""
    import grpc

    from benchmarks.cloud_client import CHANNEL_OPTIONS
    from cloud_service.grpc_api import pb_grpc

    p = Point(name)
    done = 0
    counting = False
    stop = asyncio.Event()

    def finished(t_start: float) -> None:
        nonlocal done
        if counting:
            done += 1
            p.latency_ms.append((time.perf_counter() - t_start) * 1e3)

    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.SplitClipStub(channel)

        async def client(i: int) -> None:
            k = i
            while not stop.is_set():
                t = time.perf_counter()
                await stub.Classify(frames[k % len(frames)], timeout=120)
                finished(t)
                k += clients

        async def one_stream() -> None:
            slots = asyncio.Semaphore(clients)
            sent: dict[int, float] = {}

            async def requests() -> Any:
                k = 0
                while not stop.is_set():
                    await slots.acquire()
                    f = type(frames[0])()
                    f.CopyFrom(frames[k % len(frames)])
                    f.frame_id = k
                    sent[k] = time.perf_counter()
                    k += 1
                    yield f

            async for r in stub.ClassifyStream(requests(), timeout=3600):
                finished(sent.pop(r.frame_id))
                slots.release()

        tasks = [asyncio.create_task(one_stream())] if stream else [
            asyncio.create_task(client(i)) for i in range(clients)
        ]  # fmt: skip
        await asyncio.sleep(warmup)
        for _ in range(repeat):
            done, counting = 0, True
            a, t0 = cpu_snapshot(), time.perf_counter()
            await asyncio.sleep(duration)
            counting, n, elapsed = False, done, time.perf_counter() - t0
            p.cpu += cpu_delta(a, cpu_snapshot())
            p.runs.append(n / elapsed)
            p.seconds += elapsed
            p.frames += n
        stop.set()
        if stream:
            tasks[0].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return p


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from ray import serve

    from benchmarks.cloud_client import FrameMaker
    from cloud_service import launch
    from cloud_service.embedded_redis import EmbeddedRedis
    from cloud_service.settings import CloudSettings
    from splitclip import codec
    from splitclip.runtime import BundleRuntime

    logging.basicConfig(level=logging.WARNING)
    if not args.bundle:
        print("error: --bundle (or SPLITCLIP_BUNDLE) is required", file=sys.stderr)
        return 2
    bundle = str(Path(args.bundle).resolve())
    counts = [int(c) for c in args.clients.split(",")]
    base = launch.with_overrides(
        launch.load_config(args.config), grpc_port=args.grpc_port, http_port=args.http_port
    )
    app_args = base["applications"][0].get("args", {})
    s = CloudSettings.load({**app_args, "bundle": bundle})
    mbs = args.max_batch_size or s.max_batch_size
    wait = args.batch_wait_s if args.batch_wait_s is not None else s.batch_wait_s
    threads = args.threads if args.threads is not None else s.tail_threads

    rt = BundleRuntime(bundle, threads=1)
    maker = FrameMaker(rt)
    if not 0 <= args.cut < rt.num_blocks:
        print(f"error: --cut must be in 0..{rt.num_blocks - 1} (cut L has no tail to run)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(16)]
    prompts = ["a photo of a cat", "a photo of a dog", "a red circle", "a blue square"]
    frames = [
        maker.frame(im, args.cut, prompts, frame_id=i, preset=args.codec) for i, im in enumerate(images)
    ]
    decoded = [
        codec.decode(f.payload, cut=args.cut, spec=maker.spec, calibration=maker.calibration).array
        for f in frames
    ]
    m = rt.manifest
    setup = (
        f"bundle `{m.bundle_id}` ({m.model_name}: {m.num_blocks} blocks, width {m.vision.width}, "
        f"{m.vision.num_tokens} tokens), cut {args.cut}, codec `{args.codec}` "
        f"({len(frames[0].payload)} B/frame), max_batch_size {mbs}, batch_wait_s {wait}, "
        f"tail ORT threads {threads or 'default'} (spinning off), {os.cpu_count()} CPUs, "
        f"{args.repeat} x {args.duration:.0f} s windows per point (median)"
        + (f", Ray workers at nice {args.worker_niceness}" if args.worker_niceness is not None else "")
    )
    print(f"bench cloud: {setup}", flush=True)
    raw_d = max(2.0, args.duration / 2)

    def raw(batch: int, th: int | None, spin: bool | None, label: str) -> Point:
        p = raw_tail(bundle, args.cut, decoded, batch, th, spin, raw_d, args.repeat)
        p.name = label
        print(f"{label}: {p.median:.1f} images/s ({p.spread()})", flush=True)
        return p

    raw_rows = [
        raw(mbs, threads, False, f"raw ORT tail, batch {mbs}, tail settings"),
        raw(1, threads, False, "raw ORT tail, batch 1, tail settings"),
        raw(mbs, None, True, f"raw ORT tail, batch {mbs}, ORT defaults"),  # ORT's own default: spinning
    ]
    ref = raw_rows[0].median  # for the progress lines; the report pools both raw runs at max_batch_size

    redis = EmbeddedRedis().start()
    if args.worker_niceness is not None:  # read by the raylet when it starts (a RayConfig entry)
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # noqa: SIM112 (Ray spells it so)
    launch.init_ray(args.num_cpus, log_to_driver=False)
    rows: list[Point] = []
    hist: dict[int, int] = {}
    nices: dict[str, set[int]] = {}
    groups: dict[int, int] = {}
    try:
        port = base["grpc_options"]["port"]
        address = f"127.0.0.1:{port}"

        def deploy(max_batch_size: int) -> None:
            overrides = {"bundle": bundle, "redis_url": redis.url, "max_batch_size": max_batch_size,
                         "batch_wait_s": wait, "tail_threads": threads}  # fmt: skip
            launch.deploy(launch.with_overrides(base, args=overrides))
            asyncio.run(wait_answering(address, frames[0]))

        def point(c: int, name: str, stream: bool = False) -> Point:
            p = asyncio.run(drive(address, frames, c, args.warmup, args.duration, args.repeat, name, stream))
            print(f"{name}: {p.median:8.1f} images/s ({p.spread()}, {p.median / ref:.0%} of raw)", flush=True)
            return p

        deploy(mbs)
        tail = launch.driver_handle("VisionTail")
        ingress = launch.driver_handle("Ingress")
        for c in counts:
            tail.reset_stats.remote().result()
            ingress.reset_stats.remote().result()
            rows.append(point(c, f"whole path, {c} clients"))
            hist = tail.stats.remote().result()["batch_sizes"]
            groups = ingress.stats.remote().result()["batch_sizes"]
        nices = nice_by_role(_role)
        if not args.no_stream:
            rows.append(point(counts[-1], f"whole path, 1 bidi stream, {counts[-1]} frames in flight", True))
        if not args.no_unbatched:
            serve.delete("splitclip")  # a fresh deploy, so no old replica answers during the measurement
            deploy(1)
            rows.append(point(counts[-1], f"whole path, {counts[-1]} clients, max_batch_size=1"))
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
        redis.stop()
    # the raw ceiling again on the now idle cores: a VM's speed drifts, and one raw measurement
    # taken minutes before the whole path can flatter or hurt the ratio
    raw_rows.append(
        raw(mbs, threads, False, f"raw ORT tail, batch {mbs}, tail settings, after the whole path")
    )

    # ORT alone at the batch sizes the tail ran at the top client count, on the idle cores
    mix = raw_cpu_at_sizes(bundle, args.cut, decoded, hist, threads, max(1.0, raw_d / 2), also=(mbs,))
    print(f"raw ORT CPU per frame at the tail's batch sizes: {mix.ms_per_frame:.1f} ms", flush=True)

    text = report(args, setup, raw_rows, rows, hist, groups, counts[-1], mbs, mix, nices)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return 0


_ROLE_ORDER = ["proxy", "Ingress", "VisionTail", "Scorer", "TextEncoder", "controller",
               "ray (raylet, gcs, agents)", "valkey", "client (bench driver)", "other processes"]  # fmt: skip


def report(
    args: argparse.Namespace,
    setup: str,
    raw_rows: list[Point],
    rows: list[Point],
    hist: dict[int, int],
    groups: dict[int, int],
    top: int,
    mbs: int,
    mix: MixCpu | None = None,
    nices: dict[str, set[int]] | None = None,
) -> str:
    ceiling = [p for p in raw_rows if p.name.startswith(f"raw ORT tail, batch {mbs}, tail settings")]
    pooled = [r for p in ceiling for r in p.runs]
    ref = statistics.median(pooled) if pooled else raw_rows[0].median
    best = max((r for p in raw_rows for r in p.runs), default=ref)
    # Under `splitclip bench cloud ...` argv[1:3] are the subcommand words; under `python -m` they are not.
    argv = sys.argv[1:]
    cmd = " ".join(argv[2:] if argv[:2] == ["bench", "cloud"] else argv)
    lines = [
        "| path | images/s (median) | range | vs raw ORT tail | p50 latency ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in raw_rows:
        lines.append(f"| {p.name} | {p.median:.1f} | {p.spread()} | {p.median / ref:.0%} | |")
    for p in rows:
        lat = statistics.median(p.latency_ms) if p.latency_ms else 0.0
        lines.append(f"| {p.name} | {p.median:.1f} | {p.spread()} | {p.median / ref:.0%} | {lat:.0f} |")
    by = {p.name: p for p in rows}
    main = by.get(f"whole path, {top} clients")
    unb = by.get(f"whole path, {top} clients, max_batch_size=1")
    lines.append("")
    if main:
        lines.append(
            f"Whole path at {top} clients / raw ORT tail (median of all {len(pooled)} raw windows at "
            f"batch {mbs}, before and after, {ref:.1f} images/s): **{main.median / ref:.2f}**"
        )
        lines.append(
            f"Whole path at {top} clients / fastest single raw window of any row ({best:.1f} images/s, "
            f"the most conservative reading): **{main.median / best:.2f}**"
        )
    if main and unb and unb.median:
        lines.append(
            f"Batching speed-up at {top} clients (vs max_batch_size=1): **{main.median / unb.median:.2f}x**"
        )

    def histogram(title: str, h: dict[int, int]) -> list[str]:
        total = sum(h.values()) or 1
        frames = sum(int(k) * v for k, v in h.items()) or 1
        out = ["", title, "", "| size | calls | share of calls | share of frames |", "|---:|---:|---:|---:|"]
        return out + [
            f"| {k} | {v} | {v / total:.0%} | {int(k) * v / frames:.0%} |"
            for k, v in sorted(h.items(), key=lambda kv: int(kv[0]))
        ]

    lines += histogram(f"ORT batch sizes in the VisionTail at {top} clients (all windows):", hist)
    lines += histogram(f"Frames per Ingress → VisionTail call at {top} clients:", groups)

    lines += ["", "CPU per answered frame (ms of CPU time, from /proc, over the measured windows):", ""]
    shown = [p for p in rows if p.frames]
    lines.append("| process | " + " | ".join(p.name.replace("whole path, ", "") for p in shown) + " |")
    lines.append("|---|" + "---:|" * len(shown))
    roles = [r for r in _ROLE_ORDER if any(p.cpu.get(r, 0) > 0 for p in shown)]
    for r in [*roles, "total"]:

        def ms(p: Point, r: str = r) -> float:
            v = sum(p.cpu.values()) if r == "total" else p.cpu.get(r, 0.0)
            return 1e3 * v / p.frames

        lines.append(f"| {r} | " + " | ".join(f"{ms(p):.1f}" for p in shown) + " |")
    if main and main.frames and mix and mix.ms_per_frame:
        lines += tail_cpu_lines(main, mix, top, mbs)
    if nices:
        shown_nice = [f"{r} {'/'.join(map(str, sorted(nices[r])))}" for r in _ROLE_ORDER if r in nices]
        lines += [
            "",
            "Niceness during the whole path (Ray starts its workers at 15): " + ", ".join(shown_nice),
        ]
    busy = max((p.cpu.get("other processes", 0.0) / p.seconds for p in shown if p.seconds), default=0.0)
    lines += [
        "",
        f"Other processes used up to {busy:.2f} CPUs during the windows"
        + (" — **a busy machine: numbers are low**." if busy > 0.15 else " (an otherwise idle machine)."),
    ]
    head = [
        "## Result",
        "",
        f"Command: `splitclip bench cloud {cmd}`" if cmd else "Command: `splitclip bench cloud`",
        "",
        setup[0].upper() + setup[1:] + ".",
        "",
    ]
    return "\n".join(head + lines) + "\n"


def tail_cpu_lines(main: Point, mix: MixCpu, top: int, mbs: int) -> list[str]:
    """The VisionTail's CPU per frame against ORT alone at the same batch sizes, and where the rest
    of the whole path's gap to raw goes."""
    tail_ms = 1e3 * main.cpu.get("VisionTail", 0.0) / main.frames
    total_ms = 1e3 * sum(main.cpu.values()) / main.frames
    at_mbs = mix.per_size_ms.get(mbs, 0.0)
    lines = [
        "",
        f"VisionTail CPU per frame at {top} clients vs ORT alone (same threads, same cut, in one process "
        "on the idle cores after the whole path):",
        "",
        "| batch size | frames the tail ran at it | raw ORT CPU ms per frame |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {s} | {mix.weights.get(s, 0)} | {ms:.1f} |" for s, ms in sorted(mix.per_size_ms.items())]
    lines += [
        "",
        f"- VisionTail, measured: **{tail_ms:.1f} ms** CPU per frame; raw ORT at the same batch sizes "
        f"(weighted by frames): **{mix.ms_per_frame:.1f} ms**; ratio tail / raw at the same sizes: "
        f"**{tail_ms / mix.ms_per_frame:.2f}**",
    ]
    if at_mbs:
        lines.append(
            f"- what the smaller batches cost: raw at the tail's sizes / raw at batch {mbs} = "
            f"{mix.ms_per_frame / at_mbs:.2f}"
        )
    lines.append(
        f"- the tail's share of the whole path's CPU: {tail_share(main.cpu):.0%} "
        f"({tail_ms:.1f} of {total_ms:.1f} ms per frame; the rest is proxy, ingress, scorer, Ray and the client)"
    )
    return lines


def _cli(argv: list[str] | None = None, runner: Callable[[argparse.Namespace], int] = run) -> int:
    p = argparse.ArgumentParser(prog="splitclip bench cloud")
    build_parser(p)
    return runner(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(_cli())

"""`splitclip bench cloud`: whole-path throughput vs the raw ONNX Runtime tail, on the same cores.

1. raw: TailCore (the VisionTail's own code) runs blocks k..L + head on batches of max_batch_size,
   in this process, before Ray starts: the ceiling the service can reach.
2. whole path: a local Ray + Serve with deploy/serve_config.yaml and an embedded Valkey; N clients
   (asyncio gRPC, one call in flight each) send pre-encoded frames at cut k as unary Classify calls,
   through Serve's gRPC proxy, the ingress, the tail, the scorer and back.
3. the same at the highest client count with max_batch_size=1, to show what batching buys.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

DESCRIPTION = __doc__.split("\n", 2)[2] if __doc__ else ""


def build_parser(p: argparse.ArgumentParser) -> None:
    p.description = "Images/s through the whole cloud path vs raw ONNX Runtime tail.\n\n" + DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--bundle", default=os.environ.get("SPLITCLIP_BUNDLE"), help="bundle directory")
    p.add_argument("--cut", type=int, default=1, help="cut k the frames are sent at (default 1)")
    p.add_argument("--codec", default="lossless", help="codec preset of the frames (default lossless)")
    p.add_argument("--clients", default="1,8,32", help="concurrent client counts (default 1,8,32)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per point (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per point (default 3)")
    p.add_argument("--max-batch-size", type=int, default=32, help="tail batch size (default 32)")
    p.add_argument("--batch-wait-s", type=float, default=0.004, help="tail batch wait (default 0.004)")
    p.add_argument(
        "--threads", type=int, default=0, help="ORT threads of the tail, raw and served (0: ORT default)"
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.add_argument("--no-unbatched", action="store_true", help="skip the max_batch_size=1 comparison")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")


def raw_tail(bundle: str, cut: int, frames: list[Any], batch: int, threads: int, duration: float) -> float:
    """Images/s of TailCore alone on batches of `batch` decoded frames."""
    import numpy as np

    from cloud_service.vision_tail import TailCore

    core = TailCore(bundle, threads)
    stacked = np.stack([frames[i % len(frames)] for i in range(batch)])  # [batch, ...]
    core.run_group(cut, stacked)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        core.run_group(cut, stacked)
        n += batch
    return n / (time.perf_counter() - t0)


async def drive(address: str, frames: list[Any], clients: int, warmup: float, duration: float) -> float:
    """Images/s answered with `clients` concurrent callers, each with one unary call in flight."""
    import grpc

    from cloud_service.client import CHANNEL_OPTIONS
    from cloud_service.grpc_api import pb_grpc

    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.SplitClipStub(channel)
        counting = False
        done = 0
        stop = asyncio.Event()

        async def client(i: int) -> None:
            nonlocal done
            k = i
            while not stop.is_set():
                await stub.Classify(frames[k % len(frames)], timeout=120)
                k += clients
                if counting:
                    done += 1

        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        await asyncio.sleep(warmup)
        counting, t0 = True, time.perf_counter()
        await asyncio.sleep(duration)
        counting, n, elapsed = False, done, time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*tasks)
    return n / elapsed


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import ray
    from ray import serve

    from cloud_service import launch
    from cloud_service.client import FrameMaker
    from cloud_service.embedded_redis import EmbeddedRedis
    from splitclip import codec
    from splitclip.runtime import BundleRuntime

    logging.basicConfig(level=logging.WARNING)
    if not args.bundle:
        print("error: --bundle (or SPLITCLIP_BUNDLE) is required", file=sys.stderr)
        return 2
    bundle = str(Path(args.bundle).resolve())
    counts = [int(c) for c in args.clients.split(",")]
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
    print(
        f"bench cloud: bundle {m.bundle_id} ({m.model_name}, {m.num_blocks} blocks, width {m.vision.width}, "
        f"{m.vision.num_tokens} tokens), cut {args.cut}, codec {args.codec} "
        f"({len(frames[0].payload)} B/frame), {os.cpu_count()} CPUs",
        flush=True,
    )
    raw = raw_tail(bundle, args.cut, decoded, args.max_batch_size, args.threads, args.duration)
    raw1 = raw_tail(bundle, args.cut, decoded, 1, args.threads, args.duration / 2)
    print(
        f"raw ORT tail: {raw:.1f} images/s at batch {args.max_batch_size}, {raw1:.1f} at batch 1", flush=True
    )

    redis = EmbeddedRedis().start()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    rows: list[tuple[str, float]] = []
    try:
        base = launch.load_config()
        port = base["grpc_options"]["port"]

        def deploy(max_batch_size: int) -> None:
            cfg = launch.with_overrides(
                base,
                args={
                    "bundle": bundle,
                    "redis_url": redis.url,
                    "max_batch_size": max_batch_size,
                    "batch_wait_s": args.batch_wait_s,
                    "tail_threads": args.threads,
                },
            )
            launch.deploy(cfg)

        deploy(args.max_batch_size)
        address = f"127.0.0.1:{port}"
        tail = serve.get_deployment_handle("VisionTail", "splitclip")
        hist: dict[int, int] = {}
        for c in counts:
            tail.reset_stats.remote().result()
            ips = asyncio.run(drive(address, frames, c, args.warmup, args.duration))
            hist = tail.stats.remote().result()["batch_sizes"]
            rows.append((f"whole path, {c} clients", ips))
            print(f"whole path, {c:>3} clients: {ips:8.1f} images/s  ({ips / raw:.0%} of raw)", flush=True)
        unbatched = None
        if not args.no_unbatched:
            serve.delete("splitclip")  # a fresh deploy, so no old replica answers during the measurement
            deploy(1)
            unbatched = asyncio.run(drive(address, frames, counts[-1], args.warmup, args.duration))
            print(
                f"whole path, {counts[-1]:>3} clients, max_batch_size=1: {unbatched:8.1f} images/s",
                flush=True,
            )
    finally:
        serve.shutdown()
        ray.shutdown()
        redis.stop()

    table = report(args, m, len(frames[0].payload), raw, raw1, rows, hist, unbatched, counts[-1])
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table)
        print(f"wrote {args.out}")
    return 0


def report(
    args: argparse.Namespace,
    m: Any,
    payload_bytes: int,
    raw: float,
    raw1: float,
    rows: list[tuple[str, float]],
    hist: dict[int, int],
    unbatched: float | None,
    top_clients: int,
) -> str:
    lines = [
        "# Cloud benchmark (`splitclip bench cloud`)",
        "",
        f"Command: `splitclip bench cloud {' '.join(sys.argv[1:])}`" if sys.argv[1:] else "",
        "",
        f"Bundle `{m.bundle_id}` ({m.model_name}: {m.num_blocks} blocks, width {m.vision.width}, "
        f"{m.vision.num_tokens} tokens), cut {args.cut}, codec `{args.codec}` ({payload_bytes} B/frame), "
        f"max_batch_size {args.max_batch_size}, batch_wait_s {args.batch_wait_s}, ORT threads "
        f"{args.threads or 'default'}, {os.cpu_count()} CPUs, {args.duration:.0f} s per point.",
        "",
        "| path | images/s | vs raw ORT tail |",
        "|---|---:|---:|",
        f"| raw ORT tail, batch {args.max_batch_size} | {raw:.1f} | 100% |",
        f"| raw ORT tail, batch 1 | {raw1:.1f} | {raw1 / raw:.0%} |",
    ]
    lines += [f"| {name} | {ips:.1f} | {ips / raw:.0%} |" for name, ips in rows]
    if unbatched is not None:
        lines.append(
            f"| whole path, {top_clients} clients, max_batch_size=1 | {unbatched:.1f} | {unbatched / raw:.0%} |"
        )
    lines.append("")
    if rows:
        lines.append(f"Whole path at {top_clients} clients / raw ORT tail: **{rows[-1][1] / raw:.2f}**")
    if unbatched:
        lines.append(f"Batching speed-up at {top_clients} clients: **{rows[-1][1] / unbatched:.2f}x**")
    total = sum(hist.values()) or 1
    lines += [
        "",
        f"Tail batch sizes at {top_clients} clients (batches):",
        "",
        "| batch size | batches | share |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {size} | {n} | {n / total:.0%} |" for size, n in sorted(hist.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="splitclip bench cloud")
    build_parser(_p)
    raise SystemExit(run(_p.parse_args()))

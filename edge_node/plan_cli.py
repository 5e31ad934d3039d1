"""`splitclip edge plan`: measure this device, then rank cuts x codec presets by latency per link."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HELP = "rank cuts x codec presets by latency on this device per bandwidth"

ROOT = Path(__file__).resolve().parent.parent
# >= 99 % top-1 agreement at cut L/2 on the demo model (docs/bench_codecs.md)
DEFAULT_PRESETS = "fp16,int8-zstd,klt-q10-zstd,klt-q10-ans"

DESCRIPTION = """\
Which cut k and codec preset answer a frame soonest from this device, for each link bandwidth.

Times every vision stage here with ONNX Runtime (batch 1), encodes real frames of the sample
images at every cut with each preset, and models the rest:
  preprocess + edge stages[0:k] + encode + frame bytes / bandwidth + rtt
  + (decode + stages[k:L] + head) / cloud speed-up
k = 0 uploads the image, k = L the embedding, and "local" is full local inference (no network).
Frame bytes are the whole gRPC Frame, prompts included (--labels / --prompt: the ones you will
send). Text encoding is not counted (cached on both sides). Agreement of each preset with the
unsplit model is in docs/bench_codecs.md (`splitclip bench codecs`); the defaults keep >= 99 %
at cut L/2 there. Use the chosen plan with `splitclip edge classify --cut K --codec PRESET`."""


def build_parser(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--bundle", type=Path, help="bundle directory [SPLITCLIP_BUNDLE, bundles/demo]")
    p.add_argument(
        "--images", type=Path, nargs="+", help="sample images or directories (default: models/samples)"
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--labels", type=Path, metavar="FILE", help="prompts the frames carry, one per line")
    what.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT", help="a prompt (repeat)")
    p.add_argument(
        "--codecs", default=DEFAULT_PRESETS, help=f"comma-separated presets (default {DEFAULT_PRESETS})"
    )
    p.add_argument(
        "--mbps", default="1,10,100", help="link bandwidths in Mbit/s, comma-separated (default 1,10,100)"
    )
    p.add_argument("--rtt-ms", type=float, default=20.0, help="round trip to the cloud in ms (default 20)")
    p.add_argument(
        "--cloud-speedup",
        type=float,
        default=1.0,
        help="how many times faster the cloud runs a stage than this device (default 1: same hardware)",
    )
    p.add_argument("--repeats", type=int, default=20, help="timed runs per stage (median; default 20)")
    p.add_argument("--top", type=int, default=6, help="plans shown per bandwidth (default 6)")
    p.add_argument("--json", type=Path, help="also write the profile, frame costs and plans here")


def _bandwidths(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: --mbps expects numbers like 1,10,100; got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise SystemExit(f"error: --mbps expects positive numbers; got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    from edge_node import planner
    from edge_node.cli import expand_paths
    from splitclip import codec
    from splitclip.bundle import BundleError, load_bundle
    from splitclip.classify import read_labels
    from splitclip.runtime import BundleRuntime

    bandwidths = _bandwidths(args.mbps)
    presets = [c.strip() for c in args.codecs.split(",") if c.strip()]
    unknown = [c for c in presets if c not in codec.PRESETS]
    if unknown or not presets:
        raise SystemExit(f"error: unknown codec preset(s) {unknown}; known: {', '.join(codec.PRESETS)}")
    if args.cloud_speedup <= 0 or args.rtt_ms < 0 or args.repeats < 1:
        raise SystemExit("error: expected --cloud-speedup > 0, --rtt-ms >= 0 and --repeats >= 1")
    bundle_dir = args.bundle or Path(os.environ.get("SPLITCLIP_BUNDLE") or ROOT / "bundles" / "demo")
    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as e:
        raise SystemExit(f"error: {e}") from None
    need = [c for c in presets if codec.get_preset(c).needs_calibration]
    if need and not bundle.has_calibration:
        raise SystemExit(
            f"error: preset(s) {need} need the bundle's calibration.npz, which {bundle_dir} lacks"
        )
    sources = args.images or [ROOT / "models" / "samples"]
    images = expand_paths(sources)
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise SystemExit(f"error: no such image(s): {missing}")
    if not images:
        raise SystemExit(f"error: no images found in {[str(p) for p in sources]}")
    prompts = args.prompts or (read_labels(args.labels) if args.labels else [])

    rt = BundleRuntime(bundle)
    print(f"profiling {bundle.manifest.bundle_id} ({rt.num_blocks} blocks) on this device ...", flush=True)
    prof = planner.profile_stages(rt, images[0], args.repeats)
    costs = planner.frame_costs(rt, bundle, images, presets, prompts=prompts)

    L = rt.num_blocks
    names = ["embed", *[f"block {i}" for i in range(L)], "head"]
    stages = ", ".join(f"{n} {t:.2f}" for n, t in zip(names, prof.stage_ms, strict=True))
    print(
        f"\nstage ms (batch 1): preprocess {prof.preprocess_ms:.2f}, normalise {prof.normalize_ms:.2f}, {stages}"
    )
    print(f"full local inference: {prof.edge_ms(planner.LOCAL):.2f} ms per frame")

    print(f"\ngRPC frame bytes (median over {len(images)} images; {len(prompts)} prompts in each frame):")
    print("| cut | " + " | ".join(presets) + " |")
    print("|---:|" + "---:|" * len(presets))
    by = {(c.cut, c.preset): c for c in costs}
    for k in range(L + 1):
        print(f"| {k} | " + " | ".join(f"{by[k, p].bytes:,}" for p in presets) + " |")

    report: dict[str, object] = {
        "profile": {"preprocess_ms": prof.preprocess_ms, "normalize_ms": prof.normalize_ms,
                    "stage_ms": dict(zip(names, prof.stage_ms, strict=True))},
        "frame_costs": [c.__dict__ for c in costs],
        "rtt_ms": args.rtt_ms, "cloud_speedup": args.cloud_speedup, "plans": {},
    }  # fmt: skip
    best_lines = []
    for mbps in bandwidths:
        plans = planner.plan(prof, costs, mbps=mbps, rtt_ms=args.rtt_ms, cloud_speedup=args.cloud_speedup)
        report["plans"][f"{mbps:g}"] = [planner.as_dict(p) for p in plans]  # type: ignore[index]
        print(f"\n{mbps:g} Mbit/s, rtt {args.rtt_ms:g} ms, cloud {args.cloud_speedup:g}x this device:")
        print("| plan | bytes | edge ms | upload ms | cloud ms | total ms |")
        print("|---|---:|---:|---:|---:|---:|")
        for p in plans[: args.top]:
            print(
                f"| {p.label} | {p.bytes:,} | {p.edge_ms:.2f} | {p.upload_ms:.2f} | {p.cloud_ms:.2f} | {p.total_ms:.2f} |"
            )
        b = plans[0]
        how = "answer locally" if b.cut == planner.LOCAL else f"--cut {b.cut} --codec {b.preset}"
        best_lines.append(f"  {mbps:>8g} Mbit/s: {b.label} ({b.total_ms:.1f} ms)  ->  {how}")
    print("\nbest plan per bandwidth:")
    print("\n".join(best_lines))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0

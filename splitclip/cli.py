"""The `splitclip` command. Each subcommand lives in its own module with `build_parser(p)` and `run(args)`;
modules keep heavy imports (torch, ray) inside `run`, so `--help` stays fast and the edge install,
which has no torch, can still run its commands."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# (command path, module, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("train-demo",), "partitioner.train_demo", "train the small demo CLIP model on generated shapes"),
    (
        ("eval-demo",),
        "partitioner.demo_eval",
        "zero-shot accuracy of a demo checkpoint on seen / held-out combos",
    ),
    (("random-clip",), "partitioner.random_clip", "save a random-weight CLIP checkpoint (tests, benchmarks)"),
    (("partition",), "partitioner.export", "split a CLIP checkpoint into an ONNX bundle (any cut 0..L)"),
    (("classify",), "splitclip.classify", "classify images locally with a bundle (full local inference)"),
    (
        ("edge", "classify"),
        "edge_node.cli",
        "classify images on an edge node: split via the cloud, local fallback",
    ),
    (("edge", "watch"), "edge_node.watch", "classify images dropped into a directory until stopped"),
    (
        ("edge", "plan"),
        "edge_node.plan_cli",
        "rank cuts x codec presets by latency on this device per bandwidth",
    ),
    (("cloud",), "cloud_service.cli", "start the Ray Serve cloud service (local Ray, embedded Valkey)"),
    (
        ("bench", "codecs"),
        "splitclip.bench_codecs",
        "bytes / agreement / speed of every codec preset at several cuts",
    ),
    (("bench", "cloud"), "cloud_service.bench", "whole-path gRPC throughput vs raw ONNX Runtime tail"),
    (("bench", "edge"), "edge_node.bench", "edge footprint, overhead and failover time"),
    (("demo",), "splitclip.demo", "the whole system on embedded defaults (what `make demo` runs)"),
]

GROUP_HELP = {"edge": "edge node commands", "bench": "benchmarks that print tables"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitclip",
        description="Edge-cloud split inference for CLIP-style models. Run `splitclip COMMAND --help` for details.",
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module, help_text in COMMANDS:
        if len(path) == 1:
            sub = top.add_parser(path[0], help=help_text, description=help_text)
        else:
            group = groups.get(path[0])
            if group is None:
                gp = top.add_parser(path[0], help=GROUP_HELP[path[0]], description=GROUP_HELP[path[0]])
                group = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
                groups[path[0]] = group
            sub = group.add_parser(path[1], help=help_text, description=help_text)
        sub.set_defaults(_module=module)
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # e.g. the cloud extra is not installed on an edge device
            sub.set_defaults(_unavailable=f"`splitclip {' '.join(path)}` is unavailable here: {e}")
            continue
        mod.build_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_unavailable", None):
        print(args._unavailable, file=sys.stderr)
        return 2
    mod = importlib.import_module(args._module)
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:  # BundleError, CheckpointError, CodecError, PromptError: user-facing
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

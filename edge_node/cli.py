"""`splitclip edge classify PATH... (--prompt TEXT ... | --labels FILE) [--cloud HOST:PORT] ...`

Classifies images with an `EdgeNode`: split mode when a cloud is given and healthy, local otherwise.
Shows a progress bar, then a summary table (top label, probability, mode, bytes sent, latency), and
writes one JSON object per image to --out. Unset flags fall back to `SPLITCLIP_*` variables.
Bad arguments and input files are UsageErrors (one line, exit 2, splitclip/cli.py prints them); an
image that cannot be read gets an error result and a line on stderr, the others are still answered,
and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from edge_node.results import EdgeResult
from splitclip.classify import read_labels
from splitclip.errors import SplitclipError, UsageError
from splitclip.prompts import prompt_set

if TYPE_CHECKING:
    from edge_node.settings import EdgeSettings

HELP = "classify images on an edge node: split via the cloud, local fallback"

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def build_parser(c: argparse.ArgumentParser) -> None:
    """Arguments of `splitclip edge classify` (splitclip/cli.py creates the subcommand)."""
    c.add_argument("paths", nargs="+", type=Path, help="images, or directories of images")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT", help="a prompt (repeat)")
    what.add_argument("--labels", type=Path, metavar="FILE", help="file with one prompt per line")
    c.add_argument(
        "--template",
        action="append",
        dest="templates",
        default=[],
        metavar="TEXT",
        help='prompt template with {} where the label goes, e.g. "a photo of a {}" (repeat: averaged)',
    )
    c.add_argument("--bundle", type=Path, help="bundle directory [SPLITCLIP_BUNDLE, bundles/demo]")
    c.add_argument("--cloud", metavar="HOST:PORT", help="cloud gRPC address [SPLITCLIP_CLOUD]; none = local")
    c.add_argument(
        "--cut",
        type=_cut,
        metavar="K|auto",
        help="split after K vision blocks, or auto: the node chooses per frame [SPLITCLIP_CUT, auto with a cloud]",
    )
    c.add_argument(
        "--codec",
        metavar="PRESET",
        help="codec preset of a fixed cut; given alone, it fixes cut L/2 [SPLITCLIP_CODEC, int8-zstd]",
    )
    c.add_argument(
        "--objective",
        choices=("latency", "bytes"),
        help="auto: fastest plan, or fewest bytes within --latency-budget [SPLITCLIP_OBJECTIVE, latency]",
    )
    c.add_argument(
        "--latency-budget", type=float, metavar="MS", help="auto, bytes: [SPLITCLIP_LATENCY_BUDGET_MS]"
    )
    c.add_argument(
        "--min-agreement",
        type=float,
        metavar="F",
        help="auto: agreement floor [SPLITCLIP_MIN_AGREEMENT, 0.99]",
    )
    c.add_argument("--top-k", type=int, help="labels per result [SPLITCLIP_TOP_K, 5]")
    c.add_argument(
        "--deadline", type=float, metavar="S", help="per-frame deadline [SPLITCLIP_FRAME_DEADLINE_S]"
    )
    c.add_argument("--window", type=int, help="frames in flight [SPLITCLIP_WINDOW]")
    c.add_argument("--node-id", help="node id [SPLITCLIP_NODE_ID]")
    c.add_argument("--out", type=Path, metavar="results.jsonl", help="write one JSON result per line")
    c.add_argument("--quiet", action="store_true", help="no progress bar and no table")


def _cut(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a block count K or auto, got {text!r}") from None


def expand_paths(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def check_out(out: Path) -> None:
    """--out must be a file we can create: its parent an existing directory, itself not one."""
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is a file, not a directory")
    if not parent.exists():
        raise UsageError(f"--out {out}: directory {parent} does not exist")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory")


def node_settings(args: argparse.Namespace) -> EdgeSettings:
    """The node's settings: flags over `SPLITCLIP_*`. The plan follows EdgeSettings.from_env: with a
    cloud and neither --cut nor --codec the planner chooses; --codec alone fixes cut L // 2 with it."""
    from edge_node.settings import EdgeSettings

    return EdgeSettings.from_env(
        bundle=args.bundle,
        cloud=args.cloud,
        cut=args.cut,
        codec=args.codec,
        objective=args.objective,
        latency_budget_ms=args.latency_budget,
        min_agreement=args.min_agreement,
        top_k=args.top_k,
        frame_deadline_s=args.deadline,
        window=args.window,
        node_id=args.node_id,
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edge_node.node import EdgeNode

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    prompts = args.prompts or read_labels(args.labels)  # a missing or empty file is a UsageError
    templates = list(args.templates or ())
    prompt_set(prompts, templates)  # bad prompts or templates fail now, as a PromptError
    if args.out is not None:
        check_out(args.out)
    images = expand_paths(args.paths)
    if not images:
        raise UsageError("no images found in the given paths")
    try:
        node = EdgeNode(settings=node_settings(args))
    except OSError as e:  # e.g. an unreadable SPLITCLIP_NODE_TOKEN_FILE
        raise UsageError(str(e)) from None
    except ValueError as e:
        if isinstance(e, SplitclipError):
            raise
        raise UsageError(str(e)) from None
    results: list[EdgeResult] = []
    try:
        out = args.out.open("w") if args.out else None
    except OSError as e:
        node.close()
        raise UsageError(f"--out {args.out}: {e.strerror or e}") from None
    try:
        with node:
            if not args.quiet:
                print(f"bundle {node.bundle_id}, mode {node.mode} ({node.mode_reason})", file=sys.stderr)
            bar = tqdm(total=len(images), unit="img", disable=args.quiet, file=sys.stderr)
            sources = [str(p) for p in images]
            for r in node.classify_many(images, prompts, templates=templates, sources=sources):
                results.append(r)
                if out is not None:
                    out.write(json.dumps(r.to_dict()) + "\n")
                if r.error is not None:
                    bar.write(f"error: {r.source}: {r.error}", file=sys.stderr)
                bar.update(1)
                bar.set_postfix(mode=r.mode)
            bar.close()
    finally:
        if out is not None:
            out.close()
    if not args.quiet:
        print_table(sorted(results, key=lambda r: r.frame_id), sys.stdout)
    return 1 if any(not r.ok for r in results) else 0


def print_table(results: Sequence[EdgeResult], f: TextIO) -> None:
    rows = [("image", "top label", "prob", "mode", "reason", "bytes", "latency ms")]
    for r in results:
        rows.append(
            (
                Path(r.source).name,
                r.top_label or f"ERROR {r.error}",
                f"{r.top_prob:.3f}" if r.top_prob is not None else "-",
                r.mode,
                _short(r.reason, 32),
                str(r.bytes_sent),
                f"{r.latency_ms:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {2, 5, 6}
    for n, row in enumerate(rows):
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=f)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=f)
    split = sum(r.mode == "split" for r in results)
    total_bytes = sum(r.bytes_sent for r in results)
    mean_ms = sum(r.latency_ms for r in results) / max(1, len(results))
    print(
        f"{len(results)} images: {split} split, {len(results) - split} local; "
        f"{total_bytes} bytes sent; mean latency {mean_ms:.1f} ms",
        file=f,
    )


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m edge_node.cli`: the same command, printing expected errors as splitclip/cli.py does."""
    p = argparse.ArgumentParser(prog="splitclip edge classify")
    build_parser(p)
    try:
        return run(p.parse_args(argv))
    except SplitclipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`splitclip cloud nodes`: the edge nodes the cloud heard from within the last 3 heartbeat intervals."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloud_service.registry import NodeInfo

HELP = "list the live edge nodes (the node registry in Redis)"

DESCRIPTION = """\
List the edge nodes whose last Hello (their heartbeat) is younger than 3 heartbeat intervals, from
the node registry in Redis (keys splitclip:v1:node:<id>). A node silent for 3 intervals has dropped
out. Columns: node id, its bundle (* = not the cloud's), seconds since its last Hello, its mode
(split / local) and the frames it has answered."""


def build_parser(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--redis-url",
        default=None,
        help="the cloud's Redis (default SPLITCLIP_REDIS_URL; `splitclip cloud` prints its embedded one)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")


def run(args: argparse.Namespace) -> int:
    from cloud_service.registry import list_nodes
    from cloud_service.settings import CloudSettings
    from splitclip.errors import UsageError

    url = args.redis_url or CloudSettings.load().redis_url
    if not url:
        raise UsageError("no Redis to read: pass --redis-url or set SPLITCLIP_REDIS_URL")
    nodes = list_nodes(url)
    if args.json:
        for n in nodes:
            print(json.dumps(asdict(n)))
        return 0
    print(format_table(nodes))
    return 0


def format_table(nodes: list[NodeInfo]) -> str:
    if not nodes:
        return "no live nodes"
    rows = [("ID", "BUNDLE", "LAST SEEN", "MODE", "FRAMES")]
    for n in nodes:
        bundle = n.bundle_id + ("" if n.accepted else " *")
        rows.append((n.node_id, bundle, f"{n.age_s:.1f} s ago", n.mode or "-", str(n.frames_answered)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)

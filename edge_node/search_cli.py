"""`splitclip search TEXT | --image PATH [--since T] [--until T] [--node ID ...] [--label L] [-k K] [--json]`

Searches the frames the fleet's nodes indexed (SPLITCLIP_INDEX; docs/search.md) through the cloud's
Search RPC: by text, embedded by the cloud's text tower with the given templates, or by an example
image, whose file the cloud preprocesses and embeds. Prints one row per hit, best first: rank, score
(cosine similarity), node, frame id, time (local, ISO 8601), source and top labels; --json prints the
same as one JSON object.

--since / --until take a duration back from now (90s, 30m, 1h, 2d, 1w) or an ISO 8601 time
(2026-12-02T08:00, 2026-12-02 08:00:00+01:00, 2026-12-02; without an offset it is local time).
The connection is the edge's: --cloud or SPLITCLIP_CLOUD, the node token from SPLITCLIP_NODE_TOKEN(_FILE),
TLS from SPLITCLIP_TLS_CA. Bad arguments are UsageErrors; a failed call is one line naming the cause
(the cloud unreachable, its search store down, search off on it, a refused token), exit 2 (splitclip/cli.py prints them).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from splitclip.constants import SEARCH_MAX_K
from splitclip.errors import SplitclipError, UsageError

HELP = "search the fleet's indexed frames by text or by an example image"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class SearchError(SplitclipError):
    """The Search call failed; the message says why in one line."""


def build_parser(p: argparse.ArgumentParser) -> None:
    """Arguments of `splitclip search` (splitclip/cli.py creates the command)."""
    p.add_argument("text", nargs="?", help='what to look for, e.g. "a red truck"')
    p.add_argument("--image", type=Path, metavar="PATH", help="search by an example image instead of text")
    p.add_argument(
        "--template",
        action="append",
        dest="templates",
        default=[],
        metavar="TEXT",
        help='text query template with {}, e.g. "a photo of a {}" (repeat: averaged)',
    )
    p.add_argument(
        "--since", metavar="T", help="frames captured at or after T: 30m, 1h, 2d (ago) or ISO time"
    )
    p.add_argument("--until", metavar="T", help="frames captured at or before T (same forms)")
    p.add_argument(
        "--node", action="append", dest="nodes", default=[], metavar="ID", help="only this node (repeat)"
    )
    p.add_argument("--label", help="only frames with this label among their top labels")
    p.add_argument("-k", type=int, default=10, help=f"hits to show (1..{SEARCH_MAX_K}, default 10)")
    p.add_argument("--bundle-id", default="", help="the bundle whose frames to search (default: the cloud's)")
    p.add_argument("--cloud", metavar="HOST:PORT", help="cloud gRPC address [SPLITCLIP_CLOUD]")
    p.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="deadline of the call (default 10)"
    )
    p.add_argument("--json", action="store_true", help="print the hits as JSON")


def parse_when(text: str, *, now: float | None = None, flag: str = "--since") -> float:
    """A duration back from `now` (30m, 1h, 2d) or an ISO 8601 time -> seconds since the epoch."""
    now = time.time() if now is None else now
    m = _DURATION.match(text)
    if m is not None:
        return now - float(m.group(1)) * _UNIT_S[m.group(2).lower()]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"{flag} {text!r}: expected a duration such as 30m, 1h, 2d or an ISO time such as 2026-12-02T08:00"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # a time without an offset is local time
    return when.timestamp()


def build_request(args: argparse.Namespace, *, now: float | None = None) -> Any:
    """The SearchRequest of the parsed arguments (UsageError for any that cannot be used)."""
    from splitclip.wire import pb

    if (args.text is None) == (args.image is None):
        raise UsageError('give a text query or --image PATH (one of them): splitclip search "a red truck"')
    if args.text is not None and not args.text.strip():
        raise UsageError("the text query is empty")
    if args.image is not None and args.templates:
        raise UsageError("--template applies to a text query, not to --image")
    for t in args.templates:
        if "{}" not in t:
            raise UsageError(f"--template {t!r} has no {{}} where the query goes")
    if not 1 <= args.k <= SEARCH_MAX_K:
        raise UsageError(f"-k must be in 1..{SEARCH_MAX_K}, got {args.k}")
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    now = time.time() if now is None else now
    since = parse_when(args.since, now=now, flag="--since") if args.since else 0.0
    until = parse_when(args.until, now=now, flag="--until") if args.until else 0.0
    if since and until and since > until:
        raise UsageError(f"--since {args.since} is after --until {args.until}")
    image = b""
    if args.image is not None:
        image = _read_image(args.image)
    return pb.SearchRequest(
        bundle_id=args.bundle_id,
        text=args.text.strip() if args.text else "",
        templates=args.templates,
        image=image,
        k=args.k,
        node_ids=args.nodes,
        since=since,
        until=until,
        label=args.label or "",
    )


def _read_image(path: Path) -> bytes:
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
        with Image.open(path) as im:
            im.verify()  # a clear error here rather than INVALID_ARGUMENT from the cloud
    except FileNotFoundError:
        raise UsageError(f"--image {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--image {path} is a directory") from None
    except (UnidentifiedImageError, SyntaxError, OSError) as e:
        raise UsageError(f"--image {path}: not an image file ({e})") from None
    return data


def run(args: argparse.Namespace) -> int:
    import grpc

    from edge_node.client import CloudClient
    from edge_node.settings import EdgeSettings

    req = build_request(args)
    try:
        settings = EdgeSettings.from_env(cloud=args.cloud)
    except OSError as e:  # e.g. an unreadable SPLITCLIP_NODE_TOKEN_FILE
        raise UsageError(str(e)) from None
    if settings.cloud is None:
        raise UsageError("no cloud to search: give --cloud HOST:PORT or set SPLITCLIP_CLOUD")
    client = CloudClient(settings)
    try:
        resp = client.search(req, args.timeout)
    except grpc.RpcError as e:
        raise SearchError(explain(e, settings.cloud, args.timeout)) from None
    finally:
        client.close()
    hits = [hit_dict(n, h) for n, h in enumerate(resp.hits, start=1)]
    if args.json:
        json.dump({"bundle_id": resp.bundle_id, "hits": hits}, sys.stdout, indent=2)
        print()
    else:
        print_table(hits, sys.stdout)
        print(f"{len(hits)} hits, bundle {resp.bundle_id}", file=sys.stdout)
    return 0


def explain(e: Any, cloud: str, timeout: float) -> str:
    """One line for a failed Search call."""
    import grpc

    code, details = e.code(), (e.details() or "").strip()
    if code == grpc.StatusCode.UNAVAILABLE and "search store is unavailable" in details:
        return f"the cloud at {cloud} answered, but {details}"  # its PostgreSQL is down, not the link
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the cloud at {cloud} ({details or 'unavailable'})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the cloud at {cloud} did not answer within {timeout:g} s"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"the cloud at {cloud} refused the node token (SPLITCLIP_NODE_TOKEN): {details}"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"the cloud at {cloud} has no Search (an older version)"
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return f"search: {details}"  # e.g. search is off on this cloud, another bundle
    return f"search failed: {code.name if code else 'UNKNOWN'}: {details}"


def hit_dict(rank: int, h: Any) -> dict[str, Any]:
    return {
        "rank": rank,
        "score": round(float(h.score), 6),
        "node_id": h.node_id,
        "frame_id": int(h.frame_id),
        "captured_at": float(h.captured_at),
        "time": local_iso(h.captured_at),
        "source": h.source,
        "labels": list(h.labels),
    }


def local_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds") if ts else "-"


def print_table(hits: Sequence[dict[str, Any]], f: TextIO) -> None:
    rows = [("rank", "score", "node", "frame id", "time", "source", "labels")]
    for h in hits:
        rows.append(
            (
                str(h["rank"]),
                f"{h['score']:.3f}",
                h["node_id"],
                str(h["frame_id"]),
                h["time"],
                h["source"] or "-",
                ", ".join(h["labels"]) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {0, 1, 3}
    for n, row in enumerate(rows):
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=f)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=f)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m edge_node.search_cli`: the same command, printing expected errors as splitclip/cli.py does."""
    p = argparse.ArgumentParser(prog="splitclip search")
    build_parser(p)
    try:
        return run(p.parse_args(argv))
    except SplitclipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

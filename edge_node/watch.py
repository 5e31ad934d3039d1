"""`splitclip edge watch INBOX (--prompt TEXT ... | --labels FILE) --out results.jsonl`: the long-running
edge process (what the Kubernetes DaemonSet runs). Images dropped into INBOX, e.g. by a camera, are
classified in arrival order, one JSON line each is appended to --out, and the image is then moved to
--done (or deleted). Runs until SIGTERM / Ctrl-C; the node switches between split and local by itself.
With --metrics-port (SPLITCLIP_METRICS_PORT) > 0 it serves Prometheus metrics (edge_node/metrics.py)
at http://SPLITCLIP_METRICS_HOST:PORT/metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

from edge_node.cli import IMAGE_SUFFIXES
from splitclip.classify import read_labels
from splitclip.errors import UsageError

HELP = "classify images dropped into a directory until stopped"

log = logging.getLogger("splitclip.edge.watch")


def pending(inbox: Path) -> list[Path]:
    """Images ready in the inbox, oldest first (names starting with '.' are still being written)."""
    files = [p for p in inbox.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))


def watch(
    node,
    inbox: Path,
    prompts: list[str],
    out: Path,
    *,
    done: Path | None,
    interval: float,
    stop: threading.Event,
) -> int:
    """Classify until `stop` is set; returns how many images were answered."""
    answered = 0
    with out.open("a") as sink:
        while not stop.is_set():
            batch = pending(inbox)
            if not batch:
                stop.wait(interval)
                continue
            for path, r in zip(
                batch, node.classify_many(batch, prompts, sources=[str(p) for p in batch]), strict=True
            ):
                sink.write(json.dumps(r.to_dict()) + "\n")
                sink.flush()
                answered += 1
                if done is not None:
                    path.replace(done / path.name)
                else:
                    path.unlink(missing_ok=True)
    return answered


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("inbox", type=Path, help="directory to watch for new images")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT", help="a prompt (repeat)")
    what.add_argument("--labels", type=Path, metavar="FILE", help="file with one prompt per line")
    p.add_argument(
        "--out", type=Path, required=True, metavar="results.jsonl", help="append one JSON result per image"
    )
    p.add_argument("--done", type=Path, help="move answered images here (default: delete them)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between inbox scans when idle (0.5)")
    p.add_argument("--bundle", type=Path, help="bundle directory [SPLITCLIP_BUNDLE]")
    p.add_argument("--cloud", metavar="HOST:PORT", help="cloud gRPC address [SPLITCLIP_CLOUD]; none = local")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics at :PORT/metrics [SPLITCLIP_METRICS_PORT, 0 = off]",
    )


def run(args: argparse.Namespace) -> int:
    from edge_node.metrics import NodeMetrics
    from edge_node.node import EdgeNode
    from edge_node.settings import EdgeSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prompts = args.prompts or read_labels(args.labels)
    for d in (args.inbox, args.done):
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    settings = EdgeSettings.from_env(
        bundle=args.bundle,
        cloud=args.cloud,
        metrics_port=args.metrics_port,
    )
    if not 0 <= settings.metrics_port <= 65535:
        raise UsageError(f"metrics port must be in 0..65535 (0 = off), got {settings.metrics_port}")
    with EdgeNode(settings=settings) as node, ExitStack() as cleanup:
        if settings.metrics_port:
            metrics = NodeMetrics(node)
            try:
                server = metrics.serve(settings.metrics_host, settings.metrics_port)
            except OSError as e:
                raise UsageError(f"metrics port {settings.metrics_port}: {e.strerror or e}") from None
            cleanup.callback(server.close)
            log.info("metrics on %s", server.url)
        log.info(
            "watching %s: bundle %s, mode %s (%s)", args.inbox, node.bundle_id, node.mode, node.mode_reason
        )
        n = watch(node, args.inbox, prompts, args.out, done=args.done, interval=args.interval, stop=stop)
    log.info("stopped after %d images", n)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="splitclip edge watch", description=__doc__)
    build_parser(parser)
    sys.exit(run(parser.parse_args()))

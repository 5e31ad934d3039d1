"""The edge side of `splitclip bench e2e`: a worker process that runs EdgeNodes on command and reports each frame.

Run by benchmarks/e2e.py (under a CPU quota, benchmarks/weak_device.py) as
`python -m benchmarks.e2e_edge --bundle B --cloud ADDR --images DIR --labels FILE`. It reads one JSON
command per line on stdin and answers one JSON line on stdout (logs go to stderr):

    {"op": "open", "plan": "local" | "auto" | "local*" | "cut<k>/<preset>"}   that plan (auto: a fresh
                                                    node of its own; local*: local, on a fresh node)
    {"op": "frame", "plan": P, "image": i}    one frame of image i on that node (its reply: latency, bytes,
                                              agreement, the node's per-stage `timings`, the
                                              process's CPU ms over the frame)
    {"op": "quit"}

Frames run one at a time (one in flight, over the node's bidi stream), so a frame's latency is its own.
At start it answers every image with full local inference: that top-1 is the unsplit model's (the
bundle's stages equal it to 1e-4), against which each frame's top-1 is counted as agreeing or not.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

EDGE_KEYS = ("preprocess", "edge_stages", "encode")


def parse_plan(plan: str) -> tuple[int, str, str]:
    """`cut<k>/<preset>` (fp32 edge stages) or `cut<k>/int8/<preset>` -> (k, preset, edge)."""
    cut, _, rest = plan.partition("/")
    edge, _, preset = rest.partition("/") if rest.startswith("int8/") else ("fp32", "", rest)
    return int(cut.removeprefix("cut")), preset, edge


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.e2e_edge")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--cloud", required=True)
    ap.add_argument("--images", required=True, type=Path)
    ap.add_argument("--labels", required=True, type=Path)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="edge %(levelname)s %(message)s")

    from edge_node.autoplan import Candidate
    from edge_node.node import EdgeNode
    from edge_node.plans import NodePlans
    from splitclip.bundle import load_bundle

    bundle = load_bundle(a.bundle)
    labels = [s.strip() for s in a.labels.read_text().splitlines() if s.strip()]
    images = sorted(a.images.glob("*.png"))
    # preload the files: a frame's cost is the device's decoding and compute, not this disk
    blobs = [p.read_bytes() for p in images]
    import io

    from PIL import Image

    def image(i: int) -> Any:
        return Image.open(io.BytesIO(blobs[i % len(blobs)]))

    t0 = time.perf_counter()
    ref_node = EdgeNode(bundle)
    reference = [ref_node.classify(image(i), labels).top_label for i in range(len(blobs))]
    ref_node.close()
    # Every fixed plan runs on ONE node with a cloud, its plan set before each frame: 30 nodes in one
    # process (each with its own heartbeat thread, channel and sessions) steal the quota from whichever
    # frame is running, and the planner's node would pay for all of them. The planner has its own node.
    shared: EdgeNode | None = None
    fixed: dict[str, NodePlans] = {}
    nodes: dict[str, EdgeNode] = {}
    say({"op": "ready", "images": len(blobs), "reference_s": time.perf_counter() - t0})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        plan = cmd["plan"]
        if op == "open":
            t1 = time.perf_counter()
            # the planner and its control get a fresh node each time; the fixed plans share one
            old = nodes.pop(plan, None) if plan in ("auto", "local*") else None
            if old is not None:
                old.close()
            if plan == "auto":
                node = EdgeNode(bundle, cloud=a.cloud, cut="auto")
                node.prompt_embeddings(labels)  # warmed once, as a node does on first use
            elif plan == "local*":  # the A/A control: full local inference on a fresh node of its own
                node = EdgeNode(bundle)
                node.prompt_embeddings(labels)
            else:
                if shared is None:  # "auto" loads the calibration every preset may need
                    shared = EdgeNode(bundle, cloud=a.cloud, cut="auto")
                    shared.prompt_embeddings(labels)
                k, preset, edge = (None, "", "fp32") if plan == "local" else parse_plan(plan)
                fixed[plan] = NodePlans(fixed=Candidate(k, preset, 0.0, 0.0, 0.0, 0.0, edge=edge))
                node = shared
            nodes[plan] = node
            say({"op": "opened", "plan": plan, "s": time.perf_counter() - t1})
        elif op == "frame":
            i = int(cmd["image"])
            if plan in fixed:
                nodes[plan].plans = fixed[plan]
            c0 = time.process_time()  # the whole process: the frame and whatever ran beside it
            r = next(iter(nodes[plan].classify_many([image(i)], labels, sources=[str(i)])))
            cpu_ms = (time.process_time() - c0) * 1e3
            t = r.timings_ms
            edge_ms = sum(t.get(k, 0.0) for k in EDGE_KEYS)
            cloud = t.get("cloud_total", 0.0)
            say(
                {
                    "op": "frame",
                    "plan": r.plan,
                    "mode": r.mode,
                    "reason": r.reason,
                    "latency_ms": r.latency_ms,
                    "bytes": r.bytes_sent,
                    "agree": r.top_label == reference[i % len(reference)],
                    "edge_ms": edge_ms if r.mode == "split" else r.latency_ms,
                    "cloud_ms": cloud,
                    "transfer_ms": max(0.0, r.latency_ms - edge_ms - cloud) if r.mode == "split" else 0.0,
                    "error": r.error,
                    "timings": t,
                    "cpu_ms": cpu_ms,
                }
            )
        else:
            raise SystemExit(f"unknown op {op!r}")
    for node in {id(n): n for n in nodes.values()}.values():
        node.close()
    return 0


def say(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())

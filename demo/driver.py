"""`make demo` with the whole system: cloud up -> split, cloud killed -> local, cloud back -> split.

The cloud (`python -m cloud_service.cli`: local Ray + Serve + embedded Valkey) runs as a child in its
own session; it is SIGKILLed for the outage and stopped cleanly at the end, and the demo checks that
none of its processes are left.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from demo.cloudproc import CloudProcess, session_members
from edge_node.cli import print_table
from edge_node.node import EdgeNode

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "models" / "samples"


def _heading(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _classify(node: EdgeNode, images: list[Path], prompts: list[str]) -> None:
    results = sorted(
        node.classify_many(images, prompts, sources=[str(p) for p in images]), key=lambda r: r.frame_id
    )
    labels = {p: p.removeprefix("a photo of a ") for p in prompts}
    for r in results:
        r.labels = [labels[x] for x in r.labels]
    print_table(results, sys.stdout)


def run_demo(bundle: Path, samples: Path = SAMPLES) -> int:
    from demo.command import demo_labels

    images = sorted(samples.glob("*.png"))
    if not images:
        print(f"no sample images in {samples}", file=sys.stderr)
        return 2
    prompts = [f"a photo of a {label}" for label in demo_labels()]
    cloud = CloudProcess(bundle)
    sids: list[int] = []  # one session per start
    try:
        _heading(
            f"starting the cloud (local Ray + Serve + embedded Valkey) on {cloud.address}; log: {cloud.log_path}"
        )
        took = cloud.start()
        sids.append(cloud.pid)
        print(f"cloud up in {took:.1f} s")
        with EdgeNode(
            bundle, cloud=cloud.address, codec="int8-zstd", probe_interval_s=0.25, probe_max_s=1.0
        ) as node:
            _heading(
                f"split mode: edge runs stages 0..{node.cut}, codec {node.preset.name}, the cloud the rest"
            )
            _classify(node, images, prompts)

            _heading("killing the cloud (SIGKILL to its whole process group): the edge answers locally")
            cloud.kill()
            _classify(node, images, prompts)
            print(f"edge mode now: {node.mode} ({node.mode_reason})")

            _heading("restarting the cloud")
            took = cloud.start()
            sids.append(cloud.pid)
            back = time.monotonic()
            while node.mode != "split" and time.monotonic() - back < 10:
                time.sleep(0.05)
            print(f"cloud up in {took:.1f} s; edge back in split mode {time.monotonic() - back:.2f} s later")
            _heading("split mode again")
            _classify(node, images, prompts)
            st = node.stats
            print(
                f"\nedge totals: {st.frames} frames, {st.split} split, {st.local} local, {st.bytes_sent} bytes sent"
            )
    finally:
        _heading("shutting down")
        cloud.stop()
    left = [pid for sid in sids for pid in session_members(sid)]
    print("cloud stopped; no stray processes" if not left else f"WARNING: stray cloud processes: {left}")
    return 0 if not left else 1

"""`splitclip bench edge`: edge footprint vs torch, per-frame edge overhead, failover time.

1. footprint: a fresh interpreter imports the edge and answers one image locally; another imports
   torch + transformers and runs the HF checkpoint on one image. Peak RSS and import time of each.
2. overhead: per frame, preprocess + encode + frame serialisation (what the edge CPU spends besides
   the model) as a fraction of the edge's own model compute (stages 0..k).
3. failover (--failover): frames stream to a real cloud (python -m cloud_service.cli); the cloud is
   SIGKILLed; time from the kill to the first locally answered frame, and from restart to split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_EDGE_PROBE = """
import time, json, resource
t0 = time.perf_counter()
from edge_node.node import EdgeNode
t1 = time.perf_counter()
import numpy as np
node = EdgeNode({bundle!r})
r = node.classify(np.zeros((224, 224, 3), np.uint8), ["a photo of a cat", "a photo of a dog"])
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "first_answer_s": t2 - t0,
                   "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

_TORCH_PROBE = """
import time, json, resource
t0 = time.perf_counter()
import torch
from transformers import CLIPImageProcessor, CLIPModel
t1 = time.perf_counter()
import numpy as np
from PIL import Image
from tokenizers import Tokenizer

HELP = "edge footprint, overhead and failover time"
model = CLIPModel.from_pretrained({model!r}).eval()
pixels = CLIPImageProcessor.from_pretrained({model!r})(Image.fromarray(np.zeros((224, 224, 3), np.uint8)),
                                                      return_tensors="pt")["pixel_values"]
ids = [e.ids for e in Tokenizer.from_file({model!r} + "/tokenizer.json").encode_batch(["a photo of a cat", "a photo of a dog"])]
n = max(map(len, ids))
ids = torch.tensor([i + [i[-1]] * (n - len(i)) for i in ids])
inputs = {{"pixel_values": pixels, "input_ids": ids}}
with torch.no_grad():
    model(**inputs)
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "first_answer_s": t2 - t0,
                   "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "demo", help="bundle directory")
    p.add_argument(
        "--model", type=Path, default=ROOT / "models" / "demo-clip", help="HF checkpoint for torch"
    )
    p.add_argument("--cut", type=int, default=None, help="cut for the overhead measurement (default: L // 2)")
    p.add_argument("--codec", default="int8-zstd")
    p.add_argument("--frames", type=int, default=50)
    p.add_argument(
        "--failover", action="store_true", help="also measure cloud death -> local (starts a cloud)"
    )
    p.add_argument("--json", type=Path, help="also write the numbers here")


def _probe(code: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def footprint(bundle: Path, model: Path) -> dict[str, object]:
    edge = _probe(_EDGE_PROBE.format(bundle=str(bundle)))
    res: dict[str, object] = {"edge": edge}
    if (model / "config.json").is_file():
        torch = _probe(_TORCH_PROBE.format(model=str(model)))
        res["torch"] = torch
        res["rss_ratio"] = torch["rss_mb"] / edge["rss_mb"]
        res["import_ratio"] = torch["import_s"] / edge["import_s"]
    return res


def overhead(bundle: Path, cut: int | None, codec_name: str, frames: int) -> dict[str, float]:
    import numpy as np

    from edge_node.node import EdgeNode
    from splitclip import codec
    from splitclip.wire import pb

    rng = np.random.default_rng(0)
    images = [(rng.random((240, 320, 3)) * 255).astype(np.uint8) for _ in range(8)]
    with EdgeNode(bundle, cut=cut, codec=codec_name) as node:
        k = node.cut
        pre, stages, enc, ser = [], [], [], []
        for i in range(frames + 3):
            p = node.engine.prepare(images[i % len(images)], k)
            t0 = time.perf_counter()
            payload = codec.encode(
                p.wire, cut=k, spec=node.spec, preset=node.preset, calibration=node.calibration
            )
            t1 = time.perf_counter()
            pb.Frame(
                frame_id=i, bundle_id=node.bundle_id, cut=k, payload=payload, prompts=["a", "b"]
            ).SerializeToString()
            t2 = time.perf_counter()
            if i >= 3:  # warm-up
                pre.append(p.timings_ms["preprocess"])
                stages.append(p.timings_ms.get("edge_stages", 0.0))
                enc.append((t1 - t0) * 1e3)
                ser.append((t2 - t1) * 1e3)
        full = []
        for i in range(frames):
            t0 = time.perf_counter()
            node.engine.finish(node.engine.prepare(images[i % len(images)], node.num_blocks))
            full.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median
    over = med(pre) + med(enc) + med(ser)
    return {
        "cut": k,
        "bytes": len(payload),
        "preprocess_ms": med(pre),
        "encode_ms": med(enc),
        "serialise_ms": med(ser),
        "edge_stages_ms": med(stages),
        "full_local_ms": med(full),
        "overhead_ms": over,
        "overhead_over_edge_stages": over / med(stages) if med(stages) > 0 else float("nan"),
    }


def failover(bundle: Path) -> dict[str, float]:
    import numpy as np

    from demo.cloudproc import CloudProcess
    from edge_node.node import EdgeNode

    img = np.zeros((224, 224, 3), np.uint8)
    with CloudProcess(bundle) as cloud:
        cloud.start()
        with EdgeNode(
            bundle, cloud=cloud.address, codec="int8-zstd", probe_interval_s=0.25, probe_max_s=1.0
        ) as node:
            stop = threading.Event()
            first_local: list[float] = []

            def frames():
                while not stop.is_set():
                    yield img

            def consume() -> None:
                for r in node.classify_many(frames(), ["a photo of a cat", "a photo of a dog"]):
                    if r.mode == "local" and not first_local:
                        first_local.append(time.monotonic())

            t = threading.Thread(target=consume, daemon=True)
            t.start()
            time.sleep(3.0)
            killed = time.monotonic()
            cloud.kill()
            while not first_local and time.monotonic() - killed < 30:
                time.sleep(0.005)
            cloud.start()
            back = time.monotonic()
            while node.mode != "split" and time.monotonic() - back < 30:
                time.sleep(0.01)
            back_s = time.monotonic() - back
            stop.set()
            t.join(30)
    return {"death_to_first_local_ms": (first_local[0] - killed) * 1e3, "restart_to_split_s": back_s}


def run(args: argparse.Namespace) -> int:
    out: dict[str, object] = {}
    print("== footprint (fresh interpreters)", flush=True)
    fp = footprint(args.bundle, args.model)
    out["footprint"] = fp
    print(json.dumps(fp, indent=2))
    print("== per-frame edge overhead", flush=True)
    ov = overhead(args.bundle, args.cut, args.codec, args.frames)
    out["overhead"] = ov
    print(json.dumps(ov, indent=2))
    if args.failover:
        print("== failover (real cloud, SIGKILL)", flush=True)
        fo = failover(args.bundle)
        out["failover"] = fo
        print(json.dumps(fo, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="splitclip bench edge")
    build_parser(_p)
    raise SystemExit(run(_p.parse_args()))

"""`splitclip demo` (what `make demo` runs): partition the bundled demo model if needed, then classify
the sample images. Once the edge node and cloud service are installed this runs the whole system."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from splitclip.bundle import BundleError, load_bundle
from splitclip.classify import classify_local
from splitclip.prompts import prompt_set, top_k
from splitclip.runtime import BundleRuntime

HELP = "the whole system on embedded defaults (what `make demo` runs)"

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "demo-clip"
SAMPLES = ROOT / "models" / "samples"
DEMO_BUNDLE = ROOT / "bundles" / "demo"


def ensure_demo_bundle(model: Path = DEMO_MODEL, out: Path = DEMO_BUNDLE) -> Path:
    """Partition the demo checkpoint unless a bundle built from the same checkpoint files is already there."""
    from splitclip.bundle import sha256_file

    source = {p.name: sha256_file(p) for p in sorted(model.iterdir()) if p.is_file()}
    stamp = out / ".source.json"
    try:
        load_bundle(out)
        if json.loads(stamp.read_text()) == source:
            return out
    except (BundleError, OSError, ValueError):
        pass
    from partitioner.export import partition

    print(f"== partitioning {model.relative_to(ROOT)} -> {out.relative_to(ROOT)}")
    partition(model, out)
    stamp.write_text(json.dumps(source))
    return out


def demo_labels() -> list[str]:
    from demo.data import label_names

    return label_names()


def local_demo(bundle: Path) -> None:
    rt = BundleRuntime(bundle)
    labels = demo_labels()
    images = sorted(SAMPLES.glob("*.png"))
    probs = classify_local(rt, images, prompt_set(labels, ["a photo of a {}"]))
    print(f"== zero-shot classification of {len(images)} sample images among {len(labels)} labels (local)")
    for path, best in zip(images, top_k(probs, 3), strict=True):
        ranked = ", ".join(f"{labels[i]} {p:.1%}" for i, p in best)
        print(f"  {path.name:<26} -> {ranked}")


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--local-only", action="store_true", help="skip the cloud; classify the samples locally")


def run(args: argparse.Namespace) -> int:
    bundle = ensure_demo_bundle()
    if not args.local_only and importlib.util.find_spec("demo.driver") is not None:
        from demo.driver import run_demo

        return int(run_demo(bundle) or 0)
    local_demo(bundle)
    return 0

"""`splitclip classify --bundle B IMAGE... --prompt TEXT...`: full local inference with ONNX Runtime."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from splitclip.errors import UsageError
from splitclip.preprocess import ImageLike, load_image
from splitclip.prompts import PromptSet, prompt_set, score, top_k
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower

HELP = "classify images locally with a bundle (full local inference)"


def classify_local(rt: BundleRuntime, images: Sequence[ImageLike], prompts: PromptSet) -> NDArray[np.float32]:
    """Full local inference: probabilities [n_images, n_labels]."""
    image_emb = Tower(rt).embed_images(images)  # [n, embed_dim]
    return score(image_emb, rt.encode_text(prompts.texts()), prompts.n_templates, rt.manifest.logit_scale)


def read_labels(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped. A missing, unreadable
    or empty file is a UsageError naming it."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UsageError(f"label file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"label file {path} cannot be read: {e}") from None
    lines = [line.strip() for line in text.splitlines()]
    labels = [line for line in lines if line and not line.startswith("#")]
    if not labels:
        raise UsageError(f"label file {path} is empty (no lines other than blanks and # comments)")
    return labels


def read_prompts(prompts: list[str] | None, labels_file: str | None) -> list[str]:
    out = list(prompts or [])
    if labels_file:
        out += read_labels(labels_file)
    if not out:
        raise UsageError("give prompts with --prompt TEXT (repeatable) or --labels FILE (one per line)")
    return out


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files (any size; RGBA and greyscale are converted)")
    p.add_argument("--bundle", required=True, help="bundle directory made by `splitclip partition`")
    p.add_argument("--prompt", action="append", help="a candidate label text (repeatable)")
    p.add_argument("--labels", help="file with one prompt per line")
    p.add_argument(
        "--template", default="{}", help='prompt template, e.g. "a photo of a {}" (default: as given)'
    )
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")


def load_images(paths: Sequence[str]) -> tuple[list[tuple[str, ImageLike]], list[tuple[str, str]]]:
    """Read every image that can be read; the others come back as (path, reason), the rest still run."""
    good: list[tuple[str, ImageLike]] = []
    bad: list[tuple[str, str]] = []
    for path in paths:
        try:
            good.append((path, load_image(path)))
        except FileNotFoundError:
            bad.append((path, "no such file"))
        except IsADirectoryError:
            bad.append((path, "is a directory"))
        except (OSError, SyntaxError, ValueError) as e:  # PIL: not an image, truncated or corrupt
            bad.append((path, f"not a readable image ({e})"))
    return good, bad


def run(args: argparse.Namespace) -> int:
    labels = read_prompts(args.prompt, args.labels)
    prompts = prompt_set(labels, [args.template])
    rt = BundleRuntime(args.bundle)
    good, bad = load_images(args.images)
    probs = (
        classify_local(rt, [im for _, im in good], prompts)
        if good
        else np.zeros((0, len(labels)), np.float32)
    )
    for (path, _), best in zip(good, top_k(probs, args.top_k), strict=True):
        if args.json:
            print(
                json.dumps({"image": path, "top": [{"label": labels[i], "probability": p} for i, p in best]})
            )
        else:
            ranked = ", ".join(f"{labels[i]} {p:.1%}" for i, p in best)
            print(f"{Path(path).name:<28} {ranked}")
    sys.stdout.flush()
    for path, reason in bad:
        print(f"error: {path}: {reason}", file=sys.stderr)
    return 1 if bad else 0

"""`splitclip bench codecs --bundle B`: what every codec preset costs and keeps, at several cuts.

For each cut and preset, over generated demo test images: bytes/image, ratio vs fp32 features, ratio vs
the image as JPEG q90 at the model's input size, top-1 agreement of the zero-shot prediction with the
unsplit fp32 model, mean cosine of the image embeddings, and the median encode+decode microseconds per
image (the median, so that other work on a shared machine does not skew it).
"""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from tqdm import tqdm

from splitclip.codec import PRESETS, Calibration, Preset, TensorSpec, decode, encode
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower

HELP = "bytes / agreement / speed of every codec preset at several cuts"

DEFAULT_DOC = Path(__file__).resolve().parent.parent / "docs" / "bench_codecs.md"


@dataclass
class Row:
    cut: int
    preset: str
    bytes_per_image: float
    vs_fp32: float  # fp32 feature bytes / bytes
    vs_jpeg: float  # JPEG q90 bytes / bytes
    agreement: float
    cosine: float
    codec_us: float


def jpeg_size(img: NDArray[np.uint8], quality: int = 90) -> int:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.tell()


def _finish_grouped(tower: Tower, hidden: list[np.ndarray], cut: int, dim: int) -> NDArray[np.float32]:
    """Finish decoded frames from `cut`, batching frames with the same shape (pruned frames differ)."""
    out = np.zeros((len(hidden), dim), np.float32)
    by_tokens: dict[int, list[int]] = {}
    for i, h in enumerate(hidden):
        by_tokens.setdefault(h.shape[0] if h.ndim else 0, []).append(i)
    for idx in by_tokens.values():
        for s in range(0, len(idx), 64):
            chunk = idx[s : s + 64]
            out[chunk] = tower.finish(np.stack([hidden[i] for i in chunk]), cut)  # [batch, embed_dim]
    return out


def _round_trips(
    xs: list[np.ndarray], cut: int, spec: TensorSpec, preset: Preset, cal: Calibration | None
) -> tuple[list[bytes], list[np.ndarray], list[float]]:
    """Encode + decode every input, timing each round trip (payloads, decoded arrays, seconds)."""
    # one untimed round trip: first-call costs (lazy imports, calibration caches) are not per image
    decode(
        encode(xs[0], cut=cut, spec=spec, preset=preset, calibration=cal), cut=cut, spec=spec, calibration=cal
    )
    payloads, decoded, seconds = [], [], []
    for x in xs:
        t0 = time.perf_counter()
        payload = encode(x, cut=cut, spec=spec, preset=preset, calibration=cal)
        decoded.append(decode(payload, cut=cut, spec=spec, calibration=cal).array)
        seconds.append(time.perf_counter() - t0)
        payloads.append(payload)
    return payloads, decoded, seconds


def bench(
    bundle: str | Path,
    *,
    n_images: int = 500,
    cuts: list[int] | None = None,
    presets: list[str] | None = None,
    seed: int = 2024,
    progress: bool = True,
) -> tuple[list[Row], dict[str, float]]:
    from demo.data import label_prompts, make_split

    rt = BundleRuntime(bundle)
    m = rt.manifest
    L = m.vision.num_blocks
    cuts = cuts or sorted({1, L // 2, L - 1})
    presets = presets or list(PRESETS)
    spec = TensorSpec.from_manifest(m)
    cal = rt.bundle.calibration()
    tower = Tower(rt)

    half = n_images // 2
    images = [im for im, _, _ in make_split(half, seed, "seen", image_size=m.vision.image_size)]
    images += [
        im for im, _, _ in make_split(n_images - half, seed, "heldout", image_size=m.vision.image_size)
    ]
    crops = tower.model_input(images)  # uint8 [n, H, W, 3]
    text = rt.encode_text(label_prompts())
    ref_emb = _finish_grouped(tower, list(crops), 0, m.embed_dim)  # [n, embed_dim]
    ref_pred = (ref_emb @ text.T).argmax(-1)
    jpeg = float(np.mean([jpeg_size(c) for c in crops]))
    fp32_bytes = m.vision.num_tokens * m.vision.width * 4

    def score(emb: NDArray[np.float32], median_s: float, total_bytes: int, cut: int, preset: str) -> Row:
        n = len(emb)
        per = total_bytes / n
        return Row(
            cut=cut,
            preset=preset,
            bytes_per_image=per,
            vs_fp32=fp32_bytes / per,
            vs_jpeg=jpeg / per,
            agreement=float(((emb @ text.T).argmax(-1) == ref_pred).mean()),
            cosine=float(np.mean(np.sum(emb * ref_emb, -1) / np.linalg.norm(emb, axis=-1))),
            codec_us=median_s * 1e6,
        )

    rows: list[Row] = []
    jobs = [(c, p) for c in [0, *cuts, L] for p in presets]
    bar = tqdm(jobs, desc="codec bench", unit="cut×preset", disable=not progress)
    for cut, name in bar:
        bar.set_postfix_str(f"cut {cut} {name}")
        preset: Preset = PRESETS[name]
        if cut == 0 and name not in ("lossless", "fp16", "int8") and preset.jpeg_quality == 90:
            continue  # every lossy preset sends the same JPEG q90 at cut 0: one row is enough
        if cut == L and name not in ("lossless", "fp16"):
            continue  # the embedding is sent as fp32 (lossless) or fp16 (everything else)
        if cut == 0:
            xs: list[np.ndarray] = list(crops)
        elif cut == L:
            xs = list(ref_emb)
        else:
            xs = list(
                np.concatenate([tower.at_cut(crops[s : s + 64], cut) for s in range(0, len(crops), 64)])
            )
        payloads, decoded, seconds = _round_trips(xs, cut, spec, preset, cal)
        emb = _finish_grouped(tower, decoded, cut, m.embed_dim)
        rows.append(score(emb, float(np.median(seconds)), sum(len(p) for p in payloads), cut, name))
    facts = {
        "images": float(n_images),
        "jpeg_q90_bytes": jpeg,
        "fp32_feature_bytes": float(fp32_bytes),
        "L": L,
    }
    return rows, facts


def to_markdown(rows: list[Row], facts: dict[str, float], bundle: str, command: str) -> str:
    lines = [
        "# Codec benchmark",
        "",
        f"Produced by `{command}` on bundle `{bundle}`: {int(facts['images'])} generated demo test images "
        f"(half seen, half held-out combos). fp32 features at an inner cut are {int(facts['fp32_feature_bytes'])} B; "
        f"the same images as JPEG q90 at the model's input size average {facts['jpeg_q90_bytes']:.0f} B. "
        f"Cut 0 sends the image, cut {int(facts['L'])} the embedding. Agreement: top-1 zero-shot prediction equals "
        "the unsplit fp32 model's; cosine: mean cosine of image embeddings to the unsplit model's.",
        "",
        "| cut | preset | bytes/image | × smaller than fp32 | × smaller than JPEG q90 | top-1 agreement | mean cosine | encode+decode µs/image (median) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.cut} | {r.preset} | {r.bytes_per_image:.0f} | {r.vs_fp32:.1f} | {r.vs_jpeg:.2f} | "
            f"{r.agreement:.2%} | {r.cosine:.5f} | {r.codec_us:.0f} |"
        )
    lines += ["", *FINDINGS]
    return "\n".join(lines) + "\n"


FINDINGS = [
    "## Findings",
    "",
    "Issue targets at cut L/2 = 2: (a) bytes/image <= JPEG q90 of the input (~1,981 B) at >= 99% top-1 "
    "agreement; (b) >= 16x smaller than fp32 (<= 2,080 B) at >= 99.5%. **Neither is met.** Transform "
    "coding (`klt-*`: every token rotated into the full calibration PCA basis, one uniform quantiser per "
    "direction with step q * (var / mean var)^(-1/4), CLS row sent as fp16) stays the best trade-off, and "
    "the `klt-*-ans` presets code its symbols with ANS (constriction) under a per-direction quantised "
    "Gaussian whose std, sqrt(var) / step, comes from the calibration the bundle already ships, instead "
    "of zigzag byte planes + zstd. Same symbols, so the same agreement, 16-19% fewer bytes: at cut 2 "
    "`klt-q10-ans` ~4.7 kB at 99.6% (7.1x fp32, vs 5.6 kB for `klt-q10-zstd`), `klt-q15-ans` ~4.1 kB at "
    "99.2% (8.1x, the cheapest >= 99% point), `klt-q20-ans` ~3.7 kB at 99.0% (9.0x, vs 4.5 kB). That "
    "leaves (a) ~1.9x and (b) ~2.2x short. The coder costs time: ~1.2 ms vs ~0.24 ms encode+decode per "
    "frame (separately: edge encode ~0.32 vs 0.16 ms, cloud decode ~0.94 vs 0.08 ms): the ~0.9 kB it "
    "saves is ~6.5 ms of transfer on 3G, about break-even on 4G (~1.2 ms) and a loss on Wi-Fi (~0.4 ms). "
    "Why a better entropy coder cannot "
    "close the gap, measured on 300 frames not used for calibration: the per-direction memoryless "
    "(empirical histogram) entropy of the cut-2 symbols is 4.34 kB at q = 0.10 and 3.36 kB at q = 0.20, "
    "and the ANS stream is within 0.5% of it (a Laplace model costs ~1% more; scaling the std by 0.9-1.1 "
    "gains nothing). Structure the model ignores is small: an oracle per-frame mean and std per "
    "direction, side information free, saves ~2%; only 6-12% of each direction's variance is "
    "between-image; the median left-neighbour correlation is 0.16 (0.57 for the top direction); "
    "dead-zone quantisation and other step exponents (var^-0.1, var^-0.4) do no better on the "
    "rate/agreement curve. Reaching ~2 kB at >= 99% needs about half the information per frame, i.e. a "
    "learned (trained) bottleneck or trained context model, not a better coder for these symbols.",
]


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default="bundles/demo", help="bundle directory (default: bundles/demo)")
    p.add_argument("--images", type=int, default=500, help="number of generated test images (default 500)")
    p.add_argument("--cuts", type=int, nargs="*", help="inner cuts to measure (default: 1, L/2, L-1)")
    p.add_argument("--presets", nargs="*", choices=sorted(PRESETS), help="presets (default: all)")
    p.add_argument("--doc", default=str(DEFAULT_DOC), help="markdown file to write the table to ('' = none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    rows, facts = bench(
        args.bundle, n_images=args.images, cuts=args.cuts, presets=args.presets, progress=not args.quiet
    )
    command = f"splitclip bench codecs --bundle {args.bundle} --images {args.images}"
    md = to_markdown(rows, facts, str(args.bundle), command)
    print(md)
    if args.doc:
        Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
        Path(args.doc).write_text(md)
        print(f"wrote {args.doc}")
    return 0

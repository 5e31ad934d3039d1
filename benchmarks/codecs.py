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
    lines += ["", *findings(rows, facts)]
    return "\n".join(lines) + "\n"


def findings(rows: list[Row], facts: dict[str, float]) -> list[str]:
    """What the rows say, computed from them: per inner cut the fewest bytes at each agreement floor,
    against the two size targets (<= JPEG q90 at >= 99 %; >= 16x smaller than fp32 at >= 99.5 %)."""
    L, jpeg = int(facts["L"]), facts["jpeg_q90_bytes"]
    out = ["## Findings (computed from the table above)", ""]
    for cut in sorted({r.cut for r in rows if 0 < r.cut < L}):
        at_cut = [r for r in rows if r.cut == cut]
        for floor, target, met in (
            (0.99, f"<= JPEG q90 ({jpeg:.0f} B)", lambda r: r.bytes_per_image <= jpeg),
            (0.995, ">= 16x smaller than fp32", lambda r: r.vs_fp32 >= 16),
        ):
            ok = [r for r in at_cut if r.agreement >= floor]
            if not ok:
                out.append(f"- cut {cut}, agreement >= {floor:.1%}: no preset reaches it.")
                continue
            best = min(ok, key=lambda r: r.bytes_per_image)
            verdict = "met" if met(best) else "not met"
            out.append(
                f"- cut {cut}, agreement >= {floor:.1%}: fewest bytes `{best.preset}` {best.bytes_per_image:.0f} B "
                f"({best.agreement:.1%}; {best.vs_fp32:.1f}x smaller than fp32, {best.bytes_per_image / jpeg:.2f}x "
                f"the JPEG q90 size). Target {target}: {verdict}."
            )
    cut0 = [r for r in rows if r.cut == 0]
    if cut0:
        best0 = max(cut0, key=lambda r: (r.agreement, -r.bytes_per_image))
        out.append(
            f"- cut 0 (image upload): best agreement `{best0.preset}` {best0.agreement:.1%} at "
            f"{best0.bytes_per_image:.0f} B."
        )
    return out


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default="bundles/demo", help="bundle directory (default: bundles/demo)")
    p.add_argument("--images", type=int, default=500, help="number of generated test images (default 500)")
    p.add_argument("--cuts", type=int, nargs="*", help="inner cuts to measure (default: 1, L/2, L-1)")
    p.add_argument("--presets", nargs="*", choices=sorted(PRESETS), help="presets (default: all)")
    p.add_argument("--out", help="also write the report to this markdown file (e.g. docs/bench_codecs.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    rows, facts = bench(
        args.bundle, n_images=args.images, cuts=args.cuts, presets=args.presets, progress=not args.quiet
    )
    command = f"splitclip bench codecs --bundle {args.bundle} --images {args.images}" + (
        f" --out {args.out}" if args.out else ""
    )
    md = to_markdown(rows, facts, str(args.bundle), command)
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
        print(f"wrote {args.out}")
    return 0

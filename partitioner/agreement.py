"""Measure the agreement table a bundle carries (agreement.json): every plan's answers vs the unsplit model.

At partition time, for every (cut, preset) that applies, the measurement images are sent through the
codec and finished by the bundle's own stages (`splitclip.tower.Tower`), and compared with the unsplit
fp32 tower on the same images:

    cut 0        `lossless` (PNG) and every image preset (JPEG 4:2:0 / 4:4:4, WebP, lossless WebP, PNG);
                 the other every-cut presets send the same bytes as `jpeg420-q90` there: no rows of their own
    0 < k < L    every every-cut preset (the PCA / KLT ones only when the bundle has a calibration)
    k = L        `lossless` (fp32) and `fp16`: every other preset sends the embedding as fp16
    int8 edge    with int8 edge stages (partitioner.quantize) every one of those plans at cut >= 1 again,
                 the edge's tensor from the int8 stages (rows with edge="int8"), finished by the fp32 ones;
                 computed one image at a time as on the edge: the dynamic quantisation's activation scale
                 is per tensor, so a batch of images would share one scale and get other numbers

What "top-1" means (AgreementTable.measure says which was used):
    labels given     zero-shot top-1 over the labels (one prompt per line, used verbatim): the split
                     prediction equals the unsplit model's
    no labels        nearest-neighbour retrieval among the measurement images: the image whose unsplit
                     embedding is closest to the split embedding (itself excluded) is the one closest to
                     the unsplit embedding
Which images: never the ones the codec calibration was fitted on. By default synthetic shapes from
another seed (half seen, half held-out demo combos: the first images `splitclip bench codecs` uses); with
--calibration-images DIR the images after the ones calibration took.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from splitclip.agreement import AGREEMENT_FILE, AgreementRow, AgreementTable
from splitclip.codec import IMAGE_PRESETS, PRESETS, TensorSpec, decode, encode
from splitclip.preprocess import ImageLike, load_image
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower

log = logging.getLogger("splitclip.partition")

DEFAULT_IMAGES = 200
SEED = 2024  # the calibration's synthetic shapes use 1234 (partitioner/calibrate.py), on the train split
BATCH = 64
LABELS_FILE = "labels.txt"  # looked for in the checkpoint directory when no --agreement-labels is given


def plans(num_blocks: int, calibrated: bool) -> list[tuple[int, str]]:
    """Every (cut, preset) the table measures, in cut order."""
    out = [(0, "lossless"), *((0, name) for name in IMAGE_PRESETS)]
    for k in range(1, num_blocks):
        out += [(k, n) for n, p in PRESETS.items() if calibrated or not p.needs_calibration]
    return [*out, (num_blocks, "lossless"), (num_blocks, "fp16")]


def int8_plans(num_blocks: int, calibrated: bool) -> list[tuple[int, str]]:
    """Every (cut, preset) measured again with int8 edge stages: those of `plans` at cut >= 1."""
    return [(k, name) for k, name in plans(num_blocks, calibrated) if k >= 1]


def synthetic_measurement_images(n: int, image_size: int, seed: int = SEED) -> list[NDArray[np.uint8]]:
    """n synthetic shapes (half seen, half held-out combos), uint8 [image_size, image_size, 3] each."""
    from partitioner.synthetic import make_scenes

    seen, _ = make_scenes(n // 2, seed, "seen", image_size)
    held, _ = make_scenes(n - n // 2, seed, "heldout", image_size)
    return [*seen, *held]


def images_after(directory: Path, skip: int, limit: int) -> list[ImageLike]:
    """Up to `limit` images of `directory` after the first `skip` (the calibration's), sorted by name."""
    from partitioner.calibrate import IMAGE_SUFFIXES, CalibrationImagesError

    paths = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    out: list[ImageLike] = []
    for path in paths[skip : skip + limit]:
        try:
            out.append(load_image(path))
        except (OSError, SyntaxError, ValueError) as e:
            raise CalibrationImagesError(f"agreement images: {path} is not a readable image ({e})") from None
    return out


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's OpenBLAS on one thread while measuring: the codec's per-frame matmuls are tiny, and on a
    loaded 2-core box a threaded OpenBLAS makes each ~40x slower (2.7 ms vs 0.07 ms for [64,128]@[128,128]).
    Best effort: a no-op where numpy's OpenBLAS cannot be found."""
    libs = sorted((Path(np.__file__).parent.parent / "numpy.libs").glob("lib*openblas*.so*"))
    lib = ctypes.CDLL(str(libs[0])) if libs else None  # already loaded by numpy: the same handle
    names = ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_")
    if lib is None or not all(hasattr(lib, n) for n in names):
        yield
        return
    get, set_ = (getattr(lib, n) for n in names)
    before = int(get())
    set_(1)
    try:
        yield
    finally:
        set_(before)


def _finish(tower: Tower, xs: Sequence[np.ndarray], cut: int, dim: int) -> NDArray[np.float32]:
    """Finish decoded tensors from `cut` in batches of equal shape (pruned frames have fewer tokens)."""
    out = np.zeros((len(xs), dim), np.float32)  # [n, embed_dim]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(xs):
        by_shape.setdefault(x.shape, []).append(i)
    for idx in by_shape.values():
        for s in range(0, len(idx), BATCH):
            chunk = idx[s : s + BATCH]
            out[chunk] = tower.finish(np.stack([xs[i] for i in chunk]), cut)  # [batch, embed_dim]
    return out


def _nearest_other(queries: NDArray[np.float32], refs: NDArray[np.float32]) -> NDArray[np.int64]:
    """Per query i, the index j != i of the most similar reference: [n]."""
    sim = queries @ refs.T  # [n, n]
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(-1)


def measure(
    bundle: str | Path,
    images: Sequence[ImageLike],
    *,
    labels: Sequence[str] | None = None,
    images_desc: str = "",
    progress: bool = True,
) -> AgreementTable:
    """The agreement table of `bundle` (a directory that loads; its agreement.json is not read) on `images`."""
    from tqdm import tqdm

    rt = BundleRuntime(bundle)
    m, tower = rt.manifest, Tower(rt)
    towers = {"fp32": tower, **({"int8": Tower(rt, edge="int8")} if rt.has_int8 else {})}
    L, dim = m.vision.num_blocks, m.embed_dim
    spec, cal = TensorSpec.from_manifest(m), rt.bundle.calibration()
    crops = tower.model_input(list(images))  # uint8 [n, H, W, 3]
    n = len(crops)
    if n < 2:
        raise ValueError(f"agreement: {n} measurement image(s), at least 2 are needed")
    ref = _finish(tower, list(crops), 0, dim)  # unsplit fp32 embeddings [n, embed_dim]
    if labels:
        text = rt.encode_text(list(labels))  # [n_labels, embed_dim]
        what = f"zero-shot top-1 over {len(labels)} labels"
        ref_answer = (ref @ text.T).argmax(-1)

        def answer(emb: NDArray[np.float32]) -> NDArray[np.int64]:
            return (emb @ text.T).argmax(-1)
    else:
        what = f"nearest-neighbour retrieval among the {n} measurement images (no labels)"
        ref_answer = _nearest_other(ref, ref)

        def answer(emb: NDArray[np.float32]) -> NDArray[np.int64]:
            return _nearest_other(emb, ref)

    rows: list[AgreementRow] = []
    jobs = [(k, name, "fp32") for k, name in plans(L, cal is not None)]
    if "int8" in towers:
        jobs += [(k, name, "int8") for k, name in int8_plans(L, cal is not None)]
    at_cut: dict[tuple[int, str], list[np.ndarray]] = {}
    bar = tqdm(jobs, desc="measuring agreement", unit="plan", disable=not progress)
    for cut, name, edge in bar:
        bar.set_postfix_str(f"cut {cut} {name}{' int8' if edge == 'int8' else ''}")
        if (cut, edge) not in at_cut:
            at_cut.clear()  # one cut's tensors at a time: jobs come in (edge, cut) order
            step = BATCH if edge == "fp32" else 1  # int8: batch 1, as the edge runs it (see above)
            at_cut[cut, edge] = [
                x for s in range(0, n, step) for x in towers[edge].at_cut(crops[s : s + step], cut)
            ]  # n tensors at cut k: uint8 [H, W, 3] / float32 [tokens, width] / float32 [embed_dim]
        payloads = [encode(x, cut=cut, spec=spec, preset=name, calibration=cal) for x in at_cut[cut, edge]]
        decoded = [decode(p, cut=cut, spec=spec, calibration=cal).array for p in payloads]
        emb = _finish(tower, decoded, cut, dim)  # [n, embed_dim], unit norm
        rows.append(
            AgreementRow(
                cut=cut,
                preset=name,
                agreement=float((answer(emb) == ref_answer).mean()),
                # rounded: the table is in the bundle id, and the last float bits of a mean cosine move
                # with the BLAS kernel and thread count (agreement and bytes are exact: counts over n)
                cosine=round(float(np.mean(np.sum(emb * ref, -1) / np.linalg.norm(emb, axis=-1))), 6),
                bytes=round(float(np.mean([len(p) for p in payloads])), 3),
                edge=edge,
            )
        )
    desc = f"; images: {images_desc}" if images_desc else ""
    return AgreementTable(measure=f"{what} against the unsplit fp32 model{desc}", images=n, rows=tuple(rows))


def write_agreement(
    bundle_dir: Path,
    *,
    n_images: int = DEFAULT_IMAGES,
    labels: Sequence[str] | None = None,
    image_dir: Path | None = None,
    skip: int = 0,
    progress: bool = True,
) -> Path:
    """Measure on `n_images` images (from `image_dir` after its first `skip`, else synthetic shapes) and
    write agreement.json into `bundle_dir` (which must load: write the manifest first, then again)."""
    image_size = BundleRuntime(bundle_dir).manifest.vision.image_size
    images: Sequence[ImageLike]
    if image_dir is not None:
        images, desc = (
            images_after(image_dir, skip, n_images),
            f"{image_dir} after the first {skip} (calibration)",
        )
        if len(images) < 2:
            log.warning(
                "agreement: %s has no images beyond the %d used for calibration; measuring on those, so the "
                "PCA/KLT rows are optimistic (give more images than --calibration-count)",
                image_dir,
                skip,
            )
            images, desc = (
                images_after(image_dir, 0, n_images),
                f"{image_dir} (the calibration images themselves)",
            )
    else:
        images = synthetic_measurement_images(n_images, image_size)
        desc = f"{n_images} synthetic shapes, seed {SEED} (not the calibration's)"
    with one_blas_thread():
        table = measure(bundle_dir, images, labels=labels, images_desc=desc, progress=progress)
    path = bundle_dir / AGREEMENT_FILE
    path.write_text(table.to_json())
    return path

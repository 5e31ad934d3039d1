"""Procedural captioned images for the bundled demo CLIP model (numpy + PIL only, no torch).

Scenes are one coloured shape of some size at some position on a textured, noisy background.
Some colour×shape combinations (``HELD_OUT``) never appear in training, so zero-shot accuracy on
them measures compositional generalisation rather than memorisation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from partitioner.synthetic import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLIT_IDS,
    Scene,
    Split,
    combos,
    make_scenes,
    render,
    render_array,
    sample_scene,
)

__all__ = [
    "BACKGROUNDS", "COLORS", "HELD_OUT", "POSITIONS", "SHAPES", "SIZES", "Scene", "Split", "caption",
    "combos", "label_index", "label_names", "label_prompts", "make_scenes", "make_split", "render",
    "render_array", "sample_scene", "vocabulary", "write_samples",
]  # fmt: skip

_POS_PHRASE: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# {s}=size, {c}=colour, {h}=shape, {p}=position phrase; weights favour the fully specified forms.
_TEMPLATES: tuple[str, ...] = (
    "a {s} {c} {h} {p}",
    "a {s} {c} {h} {p}",
    "a {c} {h} {p}",
    "a {s} {c} {h}",
    "a {c} {h}",
    "a photo of a {c} {h}",
    "a photo of a {s} {c} {h} {p}",
    "a picture of a {c} {h} {p}",
    "an image of a {s} {c} {h}",
    "there is a {c} {h} {p}",
    "a {c} {h} shape {p}",
)


def label_names() -> list[str]:
    """Every colour×shape combo, colour-major ("red circle", "red square", ...): the zero-shot classes."""
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


def label_index(color: str, shape: str) -> int:
    return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


def label_prompts(template: str = "a photo of a {}") -> list[str]:
    return [template.format(name) for name in label_names()]


def vocabulary() -> list[str]:
    """Every word a caption or label prompt can contain (sorted), for the word-level tokenizer."""
    words = {w for t in _TEMPLATES for w in t.split() if not w.startswith("{")}
    words |= {w for p in _POS_PHRASE.values() for w in p.split()}
    words |= {w for p in label_prompts() for w in p.split()}
    words |= set(COLORS) | set(SHAPES) | set(SIZES)
    return sorted(words)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    return template.format(s=scene.size, c=scene.color, h=scene.shape, p=_POS_PHRASE[scene.position])


def make_split(n: int, seed: int, split: Split, image_size: int = 64) -> list[tuple[Image.Image, str, int]]:
    """(image, caption, label index into label_names()) triples; deterministic in (seed, split)."""
    images, scenes = make_scenes(n, seed, split, image_size)
    cap_rng = np.random.default_rng([seed, SPLIT_IDS[split], 1])
    return [
        (Image.fromarray(img, "RGB"), caption(s, cap_rng), label_index(s.color, s.shape))
        for img, s in zip(images, scenes, strict=True)
    ]


def write_samples(out_dir: str | Path, n: int = 8, seed: int = 7, image_size: int = 96) -> list[Path]:
    """A few PNGs, alternating seen and held-out combos, named like ``03_red-circle.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 99])
    paths = []
    for i in range(n):
        scene = sample_scene(rng, "heldout" if i % 2 else "seen")
        path = out / f"{i:02d}_{scene.color}-{scene.shape}.png"
        render(scene, rng, image_size).save(path, optimize=True)
        paths.append(path)
    return paths

"""Synthetic calibration images: one coloured shape on a textured, noisy background (numpy + PIL only).

The partitioner fits the codec's per-cut PCA bases on these when the user gives no images of their own
(`splitclip partition --calibration-images DIR`). They are the demo model's training distribution:
right for the demo checkpoint, a stand-in (with a warning) for any other model. demo/data.py builds
the demo's captions, labels and splits on top of this generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "pink", "white", "black")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES: tuple[str, ...] = ("small", "medium", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
BACKGROUNDS: tuple[str, ...] = ("gradient", "stripes", "checker", "blobs")

# 10 of 48 combos: every colour and every shape is held out at least once and seen at least 4 times.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("green", "star"),
        ("blue", "circle"),
        ("yellow", "cross"),
        ("purple", "square"),
        ("pink", "diamond"),
        ("white", "triangle"),
        ("black", "circle"),
        ("red", "square"),
        ("blue", "star"),
    }
)

Split = Literal["train", "seen", "heldout"]
SPLIT_IDS: dict[str, int] = {"train": 0, "seen": 1, "heldout": 2}

_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (135, 50, 185),
    "pink": (250, 135, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
_SIZE_FRAC: dict[str, float] = {"small": 0.14, "medium": 0.2, "large": 0.27}  # radius / image side
_POS_FRAC: dict[str, tuple[float, float]] = {  # (x, y) centre / image side
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
    "center": (0.5, 0.5),
}


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    size: str
    position: str
    background: str = "gradient"


def combos(split: Split) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a split draws from, in label order."""
    held = split == "heldout"
    return [(c, s) for c in COLORS for s in SHAPES if ((c, s) in HELD_OUT) == held]


def sample_scene(rng: np.random.Generator, split: Split = "train") -> Scene:
    pairs = combos(split)
    color, shape = pairs[rng.integers(len(pairs))]
    return Scene(
        color=color,
        shape=shape,
        size=SIZES[rng.integers(len(SIZES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
        background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
    )


def _background(kind: str, rng: np.random.Generator, n: int) -> NDArray[np.float32]:
    """Muted, low-saturation texture in [0, 255], shape [n, n, 3]."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    base = rng.uniform(70, 170) + rng.uniform(-25, 25, size=3)  # grey with a slight tint
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        tex = rng.uniform(30, 70) * (t - t.mean())
    elif kind == "stripes":
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(3, 9)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        tex = rng.uniform(10, 25) * np.sign(np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)))
    elif kind == "checker":
        cells = rng.integers(3, 9)
        tex = rng.uniform(10, 25) * (((xx * cells).astype(int) + (yy * cells).astype(int)) % 2 * 2 - 1)
    else:  # blobs: a few soft Gaussian spots
        tex = np.zeros((n, n), np.float32)
        for _ in range(rng.integers(3, 7)):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.3)
            tex += rng.uniform(-45, 45) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    return base[None, None, :] + tex[:, :, None] * rng.uniform(0.8, 1.2, size=3)


def _distance(shape: str, x: NDArray[np.float32], y: NDArray[np.float32], r: float) -> NDArray[np.float32]:
    """Approximate signed distance (pixels, <0 inside) to a shape of radius r centred at the origin."""
    if shape == "circle":
        return np.hypot(x, y) - r
    if shape == "square":
        h = 0.82 * r  # similar area to the circle
        return np.maximum(np.abs(x), np.abs(y)) - h
    if shape == "diamond":
        return (np.abs(x) + np.abs(y) - 1.15 * r) / np.sqrt(2)
    if shape == "cross":
        arm, w = 1.05 * r, 0.36 * r
        horiz = np.maximum(np.abs(x) - arm, np.abs(y) - w)
        vert = np.maximum(np.abs(x) - w, np.abs(y) - arm)
        return np.minimum(horiz, vert)
    if shape == "triangle":  # equilateral, pointing up (y grows downwards)
        rr = 1.15 * r
        k = np.sqrt(3.0)
        d1 = (k * x - y - rr) / 2
        d2 = (-k * x - y - rr) / 2
        d3 = y - rr / 2
        return np.maximum(np.maximum(d1, d2), d3)
    if shape == "star":  # five points: radius alternates between r*1.15 and r*0.5
        theta = np.arctan2(x, -y)  # 0 at the top
        phase = np.abs(((theta * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at a tip, 0 between tips
        edge = r * (0.5 + 0.65 * phase)
        return (np.hypot(x, y) - edge) * 0.7
    raise ValueError(f"unknown shape {shape!r}")


def render_array(scene: Scene, rng: np.random.Generator, image_size: int = 64) -> NDArray[np.uint8]:
    """The scene as uint8 RGB [image_size, image_size, 3]."""
    n = image_size
    img = _background(scene.background, rng, n)
    px, py = _POS_FRAC[scene.position]
    cx = (px + rng.uniform(-0.04, 0.04)) * n
    cy = (py + rng.uniform(-0.04, 0.04)) * n
    r = _SIZE_FRAC[scene.size] * n * rng.uniform(0.9, 1.1)
    angle = rng.uniform(-0.25, 0.25)  # radians; small, so a square never turns into a diamond
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    ca, sa = np.cos(angle), np.sin(angle)
    d = _distance(scene.shape, ca * dx + sa * dy, -sa * dx + ca * dy, r)
    alpha = np.clip(0.5 - d, 0.0, 1.0)[:, :, None]  # one-pixel anti-aliased edge

    color = np.asarray(_RGB[scene.color], np.float32) + rng.uniform(-18, 18, size=3)
    shade = 1.0 + rng.uniform(-0.15, 0.15) * (dx + dy)[:, :, None] / max(r, 1.0) / 2  # soft lighting
    img = img * (1 - alpha) + color[None, None, :] * shade * alpha
    img += rng.normal(0.0, rng.uniform(3, 10), size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    return Image.fromarray(render_array(scene, rng, image_size), "RGB")


def _split_rng(seed: int, split: Split) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split]])


def make_scenes(
    n: int, seed: int, split: Split, image_size: int = 64
) -> tuple[NDArray[np.uint8], list[Scene]]:
    """n rendered scenes as one uint8 array [n, image_size, image_size, 3] plus their Scene records."""
    rng = _split_rng(seed, split)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    scenes = []
    for i in range(n):
        scene = sample_scene(rng, split)
        images[i] = render_array(scene, rng, image_size)
        scenes.append(scene)
    return images, scenes


def synthetic_images(n: int, seed: int = 1234, image_size: int = 64) -> list[Image.Image]:
    """n training-split scenes, deterministic in `seed`: the default calibration images."""
    images, _ = make_scenes(n, seed, "train", image_size)
    return [Image.fromarray(img, "RGB") for img in images]

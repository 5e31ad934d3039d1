"""The image tower cut at a block boundary: the one meaning of "the tensor at cut k" and its finish.

For a bundle with L blocks, the tensor at cut k (what the edge sends, what the cloud finishes) is:
    k = 0      the preprocessed image, uint8 [batch, H, W, 3] (the cloud normalises it)
    0 < k < L  the hidden state after embed + blocks[0:k], float32 [batch, tokens, width]
    k = L      the normalised image embedding, float32 [batch, embed_dim]
`at_cut(images, k)` computes it on one side; `finish(x, k)` turns it into the embedding on the other.
`Tower(runtime, edge="int8")` computes `at_cut` with the bundle's int8 edge stages (same shapes and
dtypes, other numbers); `finish` always runs the fp32 stages, as the cloud does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from splitclip.preprocess import ImageLike, normalize, to_model_input
from splitclip.runtime import BundleRuntime


def unit(x: np.ndarray) -> NDArray[np.float32]:
    """L2-normalised along the last axis. At cut L the tensor is already the embedding, but a lossy codec
    may have moved it off the sphere: finishing it is only this (no ONNX Runtime needed)."""
    e = np.asarray(x, np.float32)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


EDGES = ("fp32", "int8")  # which edge stages `at_cut` runs


class Tower:
    def __init__(self, runtime: BundleRuntime, edge: str = "fp32") -> None:
        if edge not in EDGES:
            raise ValueError(f"edge stages must be one of {', '.join(EDGES)}, got {edge!r}")
        if edge == "int8" and not runtime.has_int8:
            raise ValueError("this bundle has no int8 edge stages: partition it with --edge-int8")
        self.rt = runtime
        self.edge = edge
        self.cfg = runtime.preprocess_config
        self.num_blocks = runtime.num_blocks

    def check_cut(self, k: int) -> None:
        if not 0 <= k <= self.num_blocks:
            raise ValueError(f"cut must be in 0..{self.num_blocks}, got {k}")

    def model_input(self, images: Sequence[ImageLike] | ImageLike) -> NDArray[np.uint8]:
        """Resize + centre crop: uint8 [batch, H, W, 3] (the tensor at cut 0)."""
        batch: list[ImageLike] = list(images) if isinstance(images, list | tuple) else [images]  # type: ignore[list-item]
        return np.stack([to_model_input(im, self.cfg) for im in batch])

    def hidden(self, pixels: NDArray[np.uint8], k: int) -> NDArray[np.float32]:
        """uint8 [batch, H, W, 3] -> embed + blocks[0:k] (this tower's edge stages): float32 [batch, tokens, width]."""
        return self.rt.run_blocks(self.rt.embed(normalize(pixels, self.cfg), self.edge), 0, k, self.edge)

    def at_cut(self, pixels: NDArray[np.uint8], k: int) -> np.ndarray:
        """uint8 [batch, H, W, 3] -> the tensor at cut k (see the module docstring), by this tower's edge stages."""
        self.check_cut(k)
        if k == 0:
            return pixels
        hidden = self.hidden(pixels, k)  # [batch, tokens, width]
        return self.rt.head(hidden, self.edge) if k == self.num_blocks else hidden

    def finish(self, x: np.ndarray, k: int) -> NDArray[np.float32]:
        """The tensor at cut k -> normalised image embeddings [batch, embed_dim]."""
        self.check_cut(k)
        if k == self.num_blocks:
            return unit(x)
        hidden = self.rt.embed(normalize(x, self.cfg)) if k == 0 else x  # [batch, tokens, width]
        return self.rt.head(self.rt.run_blocks(hidden, k, self.num_blocks))

    def embed_images(self, images: Sequence[ImageLike] | ImageLike) -> NDArray[np.float32]:
        """Images -> normalised embeddings [batch, embed_dim], the whole tower here."""
        return self.finish(self.model_input(images), 0)

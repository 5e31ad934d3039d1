"""Edge-side compute: the first k stages for split mode, and full local inference when the cloud is away.

`prepare` runs preprocess + stages[0:k] and keeps what a local finish needs, so a frame that comes
back from a failed send is finished locally from where it stopped (same numbers as running every
stage again, since the stages are deterministic). Prompt embeddings are cached per prompt list:
filled from the cloud's EncodeText when it is reachable, else by text.onnx on the edge.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from splitclip.preprocess import ImageLike, normalize, to_model_input
from splitclip.runtime import BundleRuntime, top_k


@dataclass
class Prepared:
    """One frame after the edge stages: `wire` is what the codec encodes at `cut`."""

    cut: int
    wire: np.ndarray  # cut 0: uint8 [H, W, 3]; 0<k<L: float32 [tokens, width]; L: float32 [embed_dim]
    timings_ms: dict[str, float] = field(default_factory=dict)


class PromptCache:
    """Normalised prompt embeddings [n, embed_dim] per prompt list, in memory and optionally on disk."""

    def __init__(self, bundle_id: str, directory: Path | None = None) -> None:
        self._mem: dict[tuple[str, ...], NDArray[np.float32]] = {}
        self._dir = directory / bundle_id if directory is not None else None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _file(self, key: tuple[str, ...]) -> Path | None:
        if self._dir is None:
            return None
        digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:24]
        return self._dir / f"{digest}.npy"

    def get(self, prompts: Sequence[str]) -> NDArray[np.float32] | None:
        key = tuple(prompts)
        with self._lock:
            emb = self._mem.get(key)
            if emb is None and (f := self._file(key)) is not None and f.is_file():
                emb = np.load(f)
                self._mem[key] = emb
            if emb is None:
                self.misses += 1
            else:
                self.hits += 1
            return emb

    def put(self, prompts: Sequence[str], emb: NDArray[np.float32]) -> None:
        key = tuple(prompts)
        emb = np.ascontiguousarray(emb, dtype=np.float32)  # [n, embed_dim]
        with self._lock:
            self._mem[key] = emb
            if (f := self._file(key)) is not None:
                f.parent.mkdir(parents=True, exist_ok=True)
                tmp = f.with_suffix(".tmp.npy")
                np.save(tmp, emb)
                tmp.replace(f)


class LocalEngine:
    def __init__(self, runtime: BundleRuntime, prompt_cache: PromptCache) -> None:
        self.rt = runtime
        self.prompts = prompt_cache
        self.num_blocks = runtime.num_blocks
        runtime.warmup()  # create every ORT session now: creation is not thread-safe, runs are

    def prepare(self, image: ImageLike, cut: int) -> Prepared:
        """Preprocess and run stages[0:cut] (and the head when cut == L)."""
        self.rt.check_cut(cut)
        t0 = time.perf_counter()
        cfg = self.rt.preprocess_config
        img = to_model_input(image, cfg)  # uint8 [H, W, 3]
        t1 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3}
        if cut == 0:
            return Prepared(0, img, timings)
        pixels = normalize(img[None], cfg)  # [1, 3, H, W]
        hidden = self.rt.hidden_at(pixels, cut)  # [1, tokens, width]
        wire = self.rt.head(hidden)[0] if cut == self.num_blocks else hidden[0]
        timings["edge_stages"] = (time.perf_counter() - t1) * 1e3
        return Prepared(cut, wire, timings)

    def finish(self, p: Prepared) -> NDArray[np.float32]:
        """The rest of the image tower, locally: normalised embedding [embed_dim]."""
        if p.cut == 0:
            pixels = normalize(p.wire[None], self.rt.preprocess_config)  # [1, 3, H, W]
            return self.rt.image_features(pixels)[0]
        if p.cut == self.num_blocks:
            return p.wire
        return self.rt.finish(p.wire[None], p.cut)[0]

    def text(self, prompts: Sequence[str]) -> NDArray[np.float32]:
        emb = self.prompts.get(prompts)
        if emb is None:
            emb = self.rt.encode_text(prompts)  # [n, embed_dim]; raises PromptError on bad prompts
            self.prompts.put(prompts, emb)
        return emb

    def score(self, image_emb: NDArray[np.float32], prompts: Sequence[str]) -> NDArray[np.float32]:
        """Probabilities over prompts [n_prompts]."""
        return self.rt.scores(image_emb[None], self.text(prompts))[0]


def top_labels(probs: NDArray[np.float32], prompts: Sequence[str], k: int) -> tuple[list[str], list[float]]:
    best = top_k(probs[None], k)[0]
    return [prompts[i] for i, _ in best], [p for _, p in best]

"""Edge-side compute: the first k stages for split mode, and full local inference when the cloud is away.

`prepare` runs preprocess + stages[0:k] (fp32, or the bundle's int8 edge stages for an int8 plan; full
local inference is always fp32) and keeps what a local finish needs, so a frame that comes
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

from splitclip.preprocess import ImageLike
from splitclip.prompts import PromptSet, average_templates, zero_shot_probs
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower


@dataclass
class Prepared:
    """One frame after the edge stages: `wire` is what the codec encodes at `cut`."""

    cut: int
    wire: np.ndarray  # cut 0: uint8 [H, W, 3]; 0<k<L: float32 [tokens, width]; L: float32 [embed_dim]
    timings_ms: dict[str, float] = field(default_factory=dict)
    edge: str = "fp32"  # the edge stages that computed `wire`


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

    def clear(self) -> None:
        """Forget the in-memory entries (files on disk stay)."""
        with self._lock:
            self._mem.clear()

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
        self.tower = Tower(runtime)
        self.towers = {
            "fp32": self.tower,
            **({"int8": Tower(runtime, edge="int8")} if runtime.has_int8 else {}),
        }
        self.prompts = prompt_cache
        self.num_blocks = runtime.num_blocks
        # create every ORT session now: creation is not thread-safe, runs are
        runtime.warmup(int8=runtime.has_int8)

    def prepare(self, image: ImageLike, cut: int, edge: str = "fp32") -> Prepared:
        """Preprocess and compute the tensor at `cut` (splitclip.tower) with the `edge` stages."""
        self.tower.check_cut(cut)
        tower = self.towers.get(edge)
        if tower is None:
            raise ValueError(f"this bundle has no {edge} edge stages")
        t0 = time.perf_counter()
        img = self.tower.model_input(image)  # uint8 [1, H, W, 3]
        t1 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3}
        wire = tower.at_cut(img, cut)[0]
        if cut > 0:
            timings["edge_stages"] = (time.perf_counter() - t1) * 1e3
        return Prepared(cut, wire, timings, edge)

    def finish(self, p: Prepared) -> NDArray[np.float32]:
        """The rest of the image tower, locally: normalised embedding [embed_dim]."""
        return self.tower.finish(p.wire[None], p.cut)[0]

    def text(self, prompts: PromptSet) -> NDArray[np.float32]:
        """Label embeddings [n_labels, embed_dim] (template-averaged), cached; the cloud's EncodeText
        answers the same thing, so the cache can be warmed from either side."""
        emb = self.prompts.get(prompts.key())
        if emb is None:
            texts = self.rt.encode_text(prompts.texts())  # [n_labels * n_templates, embed_dim]
            emb = average_templates(texts, prompts.n_templates)
            self.prompts.put(prompts.key(), emb)
        return emb

    def score(self, image_emb: NDArray[np.float32], prompts: PromptSet) -> NDArray[np.float32]:
        """Probabilities over labels [n_labels]."""
        return zero_shot_probs(image_emb[None], self.text(prompts), self.rt.manifest.logit_scale)[0]

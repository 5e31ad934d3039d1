"""Scorer deployment: template averaging, logit-scale softmax and top-k (pure functions + a thin shell)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from numpy.typing import NDArray
from ray import serve

from cloud_service.metrics import Metrics
from cloud_service.settings import CloudSettings
from splitclip.bundle import load_bundle
from splitclip.prompts import average_templates, top_k, zero_shot_probs


def score(
    image_emb: NDArray[np.float32],
    text_emb: NDArray[np.float32],
    n_templates: int,
    logit_scale: float,
    k: int,
) -> tuple[NDArray[np.float32], list[tuple[int, float]]]:
    """One image [dim] against label texts [n_labels * n_templates, dim] -> (probs [n_labels], top k)."""
    labels = average_templates(text_emb, n_templates)  # [n_labels, dim]
    probs = zero_shot_probs(image_emb[None, :], labels, logit_scale)  # [1, n_labels]
    return probs[0], top_k(probs, k if k > 0 else probs.shape[-1])[0]


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
class Scorer:
    def __init__(self, settings: dict[str, Any]) -> None:
        bundle = load_bundle(CloudSettings.load(settings).bundle, verify=False)
        self.logit_scale = bundle.manifest.logit_scale
        self.metrics = Metrics()

    async def score_many(
        self,
        items: list[tuple[NDArray[np.float32], str, int, int]],
        texts: dict[str, NDArray[np.float32]],
    ) -> list[tuple[NDArray[np.float32], list[tuple[int, float]]]]:
        """items: (image_emb [dim], prompt_set_id, n_templates, k); texts: prompt_set_id ->
        [n_labels * n_templates, dim], sent once per call however many frames share it."""
        t0 = time.perf_counter()
        out = [score(img, texts[sid], n_tpl, self.logit_scale, k) for img, sid, n_tpl, k in items]
        self.metrics.stage("score", (time.perf_counter() - t0) * 1e3)
        return out

    def stats(self) -> dict[str, Any]:
        return self.metrics.snapshot()

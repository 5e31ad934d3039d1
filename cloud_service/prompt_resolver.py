"""A request's prompts -> a validated, content-addressed prompt set and its text embeddings.

Validation and templating are splitclip.prompts' (the edge scores against the same rules). A frame
names its prompts inline or by the `prompt_set_id` that EncodeText returned; embeddings come from a
local memo keyed by that id (a content address, so a hit is always right), else from the text
encoder (the TextEncoder deployment: Redis cache, then text.onnx).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cloud_service import errors
from cloud_service.cache import PromptSets
from cloud_service.metrics import Metrics
from splitclip.prompts import PromptLimits, PromptSet, normalise, prompt_set

# texts (templates applied) -> ([n_texts, embed_dim] normalised, how many came from the Redis cache)
TextFn = Callable[[list[str]], Awaitable[tuple[NDArray[np.float32], int]]]


@dataclass(frozen=True)
class Resolved:
    """A validated prompt set (labels normalised; results show a frame's labels as it gave them) and its content address."""

    prompts: PromptSet
    set_id: str

    @property
    def labels(self) -> tuple[str, ...]:
        return self.prompts.labels


class PromptResolver:
    def __init__(
        self,
        bundle_id: str,
        limits: PromptLimits,
        sets: PromptSets,
        encode: TextFn,
        metrics: Metrics,
        memo_size: int = 1024,
    ) -> None:
        self.bundle_id = bundle_id
        self.limits = limits
        self.sets = sets
        self.encode = encode
        self.metrics = metrics
        self.memo_size = memo_size
        # set_id -> (prompt set, text embeddings [n_labels * n_templates, embed_dim])
        self.memo: OrderedDict[str, tuple[Resolved, NDArray[np.float32]]] = OrderedDict()

    def check(self, labels: Sequence[str], templates: Sequence[str]) -> Resolved:
        """PromptError (-> INVALID_ARGUMENT) names the first bad prompt or template."""
        ps = prompt_set(labels, templates, self.limits)
        ps = PromptSet(tuple(normalise(p) for p in ps.labels), ps.templates)
        return Resolved(ps, ps.set_id(self.bundle_id))

    async def resolve(self, labels: Sequence[str], templates: Sequence[str], set_id: str) -> Resolved:
        """Inline prompts win; else the set EncodeText stored under `set_id` (memo, then Redis)."""
        if labels:
            return self.check(labels, templates)
        if not set_id:
            raise errors.invalid("prompts: send prompts or a prompt_set_id from EncodeText")
        hit = self.memo.get(set_id)
        if hit is not None:
            return hit[0]
        stored = await self.sets.get(set_id)
        if stored is None:
            raise errors.not_found(
                f"prompt_set_id {set_id} is unknown here (expired, or the cache is down): "
                "send the prompts, or call EncodeText again"
            )
        return Resolved(self.check(*stored).prompts, set_id)

    async def embeddings(self, r: Resolved) -> NDArray[np.float32]:
        """[n_labels * n_templates, embed_dim], from the memo or the text encoder."""
        hit = self.memo.get(r.set_id)
        if hit is not None:
            self.memo.move_to_end(r.set_id)
            self.metrics.hits(len(r.labels) * r.prompts.n_templates, "local")
            return hit[1]
        emb, _ = await self.encode(r.prompts.texts())
        self.remember(r, emb)
        return emb

    async def register(self, r: Resolved) -> tuple[NDArray[np.float32], int]:
        """EncodeText: always through the text encoder (its answer reports the Redis cache hits);
        the set is then stored so that frames can name it by id."""
        emb, hits = await self.encode(r.prompts.texts())
        self.remember(r, emb)
        await self.sets.put(r.set_id, r.labels, r.prompts.templates)
        return emb, hits

    def remember(self, r: Resolved, emb: NDArray[np.float32]) -> None:
        self.memo[r.set_id] = (r, emb)
        self.memo.move_to_end(r.set_id)
        while len(self.memo) > self.memo_size:
            self.memo.popitem(last=False)

    def clear(self) -> None:
        self.memo.clear()

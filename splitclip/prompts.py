"""Prompts on both sides: normalise, validate, apply templates, average them, zero-shot scores, top-k.

The edge (local answers) and the cloud (split answers) run this same code, so a frame answered by
either side is scored against the same prompt text. Rules:
- a label is normalised (NFC, surrounding whitespace stripped, inner runs collapsed) before encoding;
- a template contains `{}` exactly once where the label goes; any other brace is an error;
- with templates, each label's embedding is the re-normalised mean over its templated texts.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from splitclip.errors import SplitclipError


class PromptError(SplitclipError, ValueError):
    """Prompts or templates that cannot be used (empty, too many, too long, bad template)."""


@dataclass(frozen=True)
class PromptLimits:
    max_prompts: int = 256  # labels per request
    max_chars: int = 300  # characters per label and per template
    max_templates: int = 16


def normalise(text: str) -> str:
    """NFC, surrounding whitespace stripped, inner whitespace runs collapsed to one space."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def check_template(template: str, where: str = "template") -> str:
    """A template holds `{}` exactly once and no other brace; returns it normalised."""
    if not isinstance(template, str):
        raise PromptError(f"{where}: must be text")
    t = normalise(template)
    if t.count("{}") != 1:
        raise PromptError(f"{where}: {template!r} must contain {{}} exactly once (where the label goes)")
    if "{" in t.replace("{}", "") or "}" in t.replace("{}", ""):
        raise PromptError(f"{where}: {template!r} has a brace other than {{}}")
    return t


@dataclass(frozen=True)
class PromptSet:
    """Validated labels (as given, shown in results) and templates (normalised)."""

    labels: tuple[str, ...]
    templates: tuple[str, ...] = ()

    @property
    def n_templates(self) -> int:
        return max(1, len(self.templates))

    def texts(self) -> list[str]:
        """What the text tower encodes, label-major: [l0 t0, l0 t1, ..., l1 t0, ...]."""
        labels = [normalise(label) for label in self.labels]
        if not self.templates:
            return labels
        return [normalise(t.replace("{}", label)) for label in labels for t in self.templates]

    def key(self) -> tuple[str, ...]:
        """A cache key of the label embeddings: templates, a separator, normalised labels."""
        return (*self.templates, "\0", *(normalise(label) for label in self.labels))

    def set_id(self, bundle_id: str) -> str:
        """Content address: the same bundle, labels and templates give the same id everywhere."""
        body = json.dumps([bundle_id, [normalise(p) for p in self.labels], list(self.templates)])
        return "ps-" + hashlib.sha256(body.encode()).hexdigest()[:24]


def prompt_set(
    labels: Sequence[str], templates: Sequence[str] = (), limits: PromptLimits | None = None
) -> PromptSet:
    """Validate labels and templates against one set of limits; PromptError names the first bad one."""
    lim = limits or PromptLimits()
    labels = list(labels)
    if not labels:
        raise PromptError("prompts: at least one prompt is required")
    if len(labels) > lim.max_prompts:
        raise PromptError(f"prompts: {len(labels)} given, at most {lim.max_prompts} allowed")
    for i, p in enumerate(labels):
        if not isinstance(p, str) or not p.strip():
            raise PromptError(f"prompts[{i}]: must be non-empty text")
        if len(p) > lim.max_chars:
            raise PromptError(f"prompts[{i}]: {len(p)} characters, at most {lim.max_chars} allowed")
    templates = list(templates)
    if len(templates) > lim.max_templates:
        raise PromptError(f"templates: {len(templates)} given, at most {lim.max_templates} allowed")
    checked = []
    for i, t in enumerate(templates):
        if isinstance(t, str) and len(t) > lim.max_chars:
            raise PromptError(f"templates[{i}]: {len(t)} characters, at most {lim.max_chars} allowed")
        checked.append(check_template(t, f"templates[{i}]"))
    if checked == ["{}"]:  # the identity template is no template
        checked = []
    return PromptSet(tuple(labels), tuple(checked))


def average_templates(text_emb: NDArray[np.float32], n_templates: int) -> NDArray[np.float32]:
    """[n_labels * n_templates, dim] -> [n_labels, dim]: per label the re-normalised mean over templates."""
    if n_templates <= 1:
        return text_emb
    mean = text_emb.reshape(-1, n_templates, text_emb.shape[-1]).mean(axis=1)  # [n_labels, dim]
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


def zero_shot_probs(
    image_emb: NDArray[np.float32], text_emb: NDArray[np.float32], logit_scale: float
) -> NDArray[np.float32]:
    """softmax(logit_scale * img @ txt.T) over prompts: [batch, n_prompts]."""
    img = image_emb / np.linalg.norm(image_emb, axis=-1, keepdims=True)
    txt = text_emb / np.linalg.norm(text_emb, axis=-1, keepdims=True)
    logits = np.float32(logit_scale) * (img @ txt.T)
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def score(
    image_emb: NDArray[np.float32], text_emb: NDArray[np.float32], n_templates: int, logit_scale: float
) -> NDArray[np.float32]:
    """Images [batch, dim] against texts [n_labels * n_templates, dim] -> probabilities [batch, n_labels]."""
    return zero_shot_probs(image_emb, average_templates(text_emb, n_templates), logit_scale)


def top_k(probs: NDArray[np.float32], k: int) -> list[list[tuple[int, float]]]:
    """Per row, the k best (index, probability) pairs, best first (ties: lower index first); k <= 0 = all."""
    k = probs.shape[-1] if k <= 0 else max(1, min(k, probs.shape[-1]))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(int(i), float(row[i])) for i in idx] for row, idx in zip(probs, order, strict=True)]

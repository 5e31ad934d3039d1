"""The one rule for the texts stored with a frame for fleet search, kept by both sides: the node
cleans its journal entries by it and the cloud cleans frames' rows by it, so that a frame is stored
with the same source and labels whichever path it took, and nothing the store refuses is queued."""

from __future__ import annotations

from collections.abc import Sequence

from splitclip.constants import INDEX_MAX_LABELS, INDEX_MAX_TEXT_CHARS


def storable_text(text: str) -> str:
    """`text` as the store takes it: valid UTF-8 (a lone surrogate from a file name becomes "?"), no
    NUL, at most INDEX_MAX_TEXT_CHARS characters. A longer text keeps its end behind a "…": the end of
    a path (the file name) says more than its start."""
    text = text.encode("utf-8", "replace").decode("utf-8").replace("\0", "")
    if len(text) > INDEX_MAX_TEXT_CHARS:
        text = "…" + text[len(text) - INDEX_MAX_TEXT_CHARS + 1 :]
    return text


def storable_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """The best INDEX_MAX_LABELS labels (they come best first), each cleaned like a source."""
    return tuple(storable_text(x) for x in labels[:INDEX_MAX_LABELS])

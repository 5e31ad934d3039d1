"""Fixtures of the edge unit tests: the tiny bundle, a few images, and an in-process reference cloud."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.edge.refcloud import RefCloud

PROMPTS = ["a photo of a cat", "a photo of a dog", "red circle", "blue square"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("SPLITCLIP_") and k != "SPLITCLIP_ORT_THREADS":
            monkeypatch.delenv(k)


@pytest.fixture(scope="session")
def bundle(tiny_bundle_dir: Path) -> Path:
    return tiny_bundle_dir


@pytest.fixture(scope="session")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.random((40 + i, 50, 3)) * 255).astype(np.uint8) for i in range(12)]


@pytest.fixture
def cloud(bundle: Path) -> Iterator[RefCloud]:
    rc = RefCloud(bundle)
    rc.start()
    yield rc
    rc.stop()

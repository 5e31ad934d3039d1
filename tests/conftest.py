"""Session fixtures: checkpoints and bundles built once per test session (no downloads)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cloud_service.search.embedded_pg import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "demo-clip"
SAMPLES = ROOT / "models" / "samples"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a loaded CI box can start Serve's proxy slower than Serve's 5 s readiness check allows
# (cloud_service.launch sets the same for its own local Ray; subprocesses inherit this)
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random CLIP (image 32, patch 8 -> 17 tokens, 3 blocks of width 64)."""
    from partitioner.random_clip import save_random_clip

    out = tmp_path_factory.mktemp("tiny-clip")
    return save_random_clip(
        out, image_size=32, patch_size=8, width=64, layers=3, heads=4,
        text_width=64, text_layers=2, text_heads=4, projection_dim=32, context=16,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from partitioner.export import partition

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    partition(tiny_clip_dir, out, calibration_images=16, agreement_images=64, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_int8_bundle_dir(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with int8 edge stages (`--edge-int8`) and their agreement rows."""
    from partitioner.export import partition

    out = tmp_path_factory.mktemp("bundles") / "tiny-int8"
    partition(tiny_clip_dir, out, calibration_images=16, agreement_images=64, edge_int8=True, progress=False)
    return out


@pytest.fixture(scope="session")
def demo_clip_dir() -> Path:
    if not (DEMO_MODEL / "config.json").exists():
        pytest.fail(f"the demo checkpoint is missing from {DEMO_MODEL}: run `splitclip train-demo`")
    return DEMO_MODEL


@pytest.fixture(scope="session")
def demo_bundle_dir(demo_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from partitioner.agreement import DEFAULT_IMAGES
    from partitioner.export import partition

    out = tmp_path_factory.mktemp("bundles") / "demo"
    partition(demo_clip_dir, out, agreement_images=DEFAULT_IMAGES, progress=False)  # as `splitclip partition`
    return out


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    paths = sorted(SAMPLES.glob("*.png"))
    assert paths, f"no sample images in {SAMPLES}"
    return paths


def pg_base_dir(prefix: str) -> Path:
    """A fresh directory for an embedded PostgreSQL's data dir: mkdtemp makes it 0700, and as root the
    server runs as user pgserver (cloud_service/search/embedded_pg.py), which must traverse it."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    return base


@pytest.fixture(scope="module")
def pg() -> Iterator[EmbeddedPostgres]:
    """A real embedded PostgreSQL with pgvector (pgserver), one per test module."""
    from cloud_service.search.embedded_pg import EmbeddedPostgres

    base = pg_base_dir("splitclip-pg-")
    server = EmbeddedPostgres(base / "data").start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)

"""partitioner.export: every cut of the ONNX stage chain equals transformers' unsplit model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from splitclip.bundle import load_bundle
from splitclip.preprocess import normalize
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a photo of a red circle",
    "a large green square on the left",
    "blue",
    "a small triangle on the right",
    "a photo of a dog",
    "cat",
    "a red red red red red red red red red red red red red red red red red circle",  # truncated
]


def _hf(model_dir: Path):
    return transformers.CLIPModel.from_pretrained(model_dir, dtype=torch.float32).eval()


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def check_every_cut(model_dir: Path, bundle_dir: Path, batch: int = 2) -> None:
    model = _hf(model_dir)
    rt = BundleRuntime(bundle_dir)
    size = rt.manifest.vision.image_size
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    pixels = normalize(images, rt.preprocess_config)  # [batch, 3, size, size]
    tower = Tower(rt)
    with torch.no_grad():
        ref = _normalised(
            model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
        )
    for k in range(rt.num_blocks + 1):
        hidden = rt.run_blocks(rt.embed(pixels), 0, k)  # [batch, tokens, width]
        assert hidden.shape == (batch, rt.manifest.vision.num_tokens, rt.manifest.vision.width)
        out = rt.head(rt.run_blocks(hidden, k, rt.num_blocks))
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0, err_msg=f"stages, cut {k}")
        out = tower.finish(tower.at_cut(images, k), k)
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0, err_msg=f"cut {k}")


def check_text(model_dir: Path, bundle_dir: Path) -> None:
    model = _hf(model_dir)
    rt = BundleRuntime(bundle_dir)
    ids = rt.tokenizer(PROMPTS)  # [7, context] int32
    assert ids.dtype == np.int32
    with torch.no_grad():
        ref = _normalised(
            model.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output.numpy()
        )
    batch7 = rt.encode_text(PROMPTS)
    np.testing.assert_allclose(batch7, ref, atol=1e-4, rtol=0)
    batch1 = np.concatenate([rt.encode_text([p]) for p in PROMPTS])
    np.testing.assert_allclose(batch1, batch7, atol=1e-5, rtol=0)


def test_tiny_every_cut(tiny_clip_dir: Path, tiny_bundle_dir: Path) -> None:
    check_every_cut(tiny_clip_dir, tiny_bundle_dir, batch=3)


def test_tiny_text(tiny_clip_dir: Path, tiny_bundle_dir: Path) -> None:
    check_text(tiny_clip_dir, tiny_bundle_dir)


def test_demo_every_cut(demo_clip_dir: Path, demo_bundle_dir: Path) -> None:
    check_every_cut(demo_clip_dir, demo_bundle_dir)


def test_demo_text(demo_clip_dir: Path, demo_bundle_dir: Path) -> None:
    check_text(demo_clip_dir, demo_bundle_dir)


@pytest.fixture(scope="module")
def vitb32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """ViT-B/32 architecture (image 224, patch 32, width 768, 12 layers) with random weights."""
    from partitioner.export import partition
    from partitioner.random_clip import save_random_clip

    model_dir = save_random_clip(
        tmp_path_factory.mktemp("vitb32-clip"), image_size=224, patch_size=32, width=768, layers=12, heads=12
    )
    bundle_dir = tmp_path_factory.mktemp("vitb32-bundle") / "bundle"
    partition(model_dir, bundle_dir, calibration_images=0, progress=False)
    return model_dir, bundle_dir


def test_vitb32_every_cut(vitb32: tuple[Path, Path]) -> None:
    model_dir, bundle_dir = vitb32
    m = load_bundle(bundle_dir).manifest
    assert (m.vision.num_blocks, m.vision.width, m.vision.num_tokens, m.embed_dim) == (12, 768, 50, 512)
    check_every_cut(model_dir, bundle_dir)


def test_vitb32_text(vitb32: tuple[Path, Path]) -> None:
    check_text(*vitb32)


def test_dynamic_token_axis(tiny_bundle_dir: Path) -> None:
    """Blocks accept fewer tokens (pruned frames) and any batch size."""
    rt = BundleRuntime(tiny_bundle_dir)
    width = rt.manifest.vision.width
    for batch, tokens in [(1, 5), (4, 17), (2, 9)]:
        hidden = np.random.default_rng(batch).standard_normal((batch, tokens, width)).astype(np.float32)
        assert rt.run_blocks(hidden, 0, rt.num_blocks).shape == (batch, tokens, width)
        assert Tower(rt).finish(hidden, 1).shape == (batch, rt.manifest.embed_dim)


def test_manifest_facts(tiny_bundle_dir: Path) -> None:
    m = load_bundle(tiny_bundle_dir).manifest
    assert m.vision.num_blocks == 3 and m.vision.num_tokens == 17 and m.embed_dim == 32
    assert m.text.eos_token_id == 49407 and m.text.context_length == 16
    assert m.logit_scale == pytest.approx(np.exp(2.6592), rel=1e-4)
    assert "calibration.npz" in m.files
    assert set(m.stage_files()) <= set(m.files)


def test_partition_creates_missing_parent(tiny_clip_dir: Path, tmp_path: Path) -> None:
    from partitioner.export import partition

    out = tmp_path / "a" / "b" / "bundle"
    m = partition(tiny_clip_dir, out, calibration_images=0, progress=False)
    assert load_bundle(out).id == m.bundle_id
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".partition-")]

"""Local mode: full inference on the edge, same numbers as the bundle runtime, prompt cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_node.local import LocalEngine, PromptCache
from edge_node.node import EdgeNode
from splitclip.bundle import BundleError
from splitclip.classify import classify_local
from splitclip.prompts import PromptError, prompt_set
from splitclip.runtime import BundleRuntime
from splitclip.tower import Tower
from tests.edge.conftest import PROMPTS


def test_local_only_node_matches_the_runtime(bundle: Path, images: list[np.ndarray]) -> None:
    expected = classify_local(BundleRuntime(bundle), images, prompt_set(PROMPTS))  # [n, prompts]
    with EdgeNode(bundle) as node:
        assert node.mode == "local" and node.mode_reason == "no_cloud"
        results = sorted(node.classify_many(images, PROMPTS), key=lambda r: r.frame_id)
    assert len(results) == len(images)
    for r, want in zip(results, expected, strict=True):
        assert (r.mode, r.reason, r.bytes_sent) == ("local", "no_cloud", 0)
        np.testing.assert_allclose(r.probabilities, want, atol=1e-6)
        assert r.labels[0] == PROMPTS[int(np.argmax(want))]
        assert r.top_probs == sorted(r.top_probs, reverse=True)


@pytest.mark.parametrize("cut_frac", [0.0, 0.5, 1.0])
def test_finishing_locally_from_any_cut_gives_the_full_result(
    bundle: Path, images: list[np.ndarray], cut_frac: float
) -> None:
    rt = BundleRuntime(bundle)
    engine = LocalEngine(rt, PromptCache(rt.manifest.bundle_id))
    cut = round(cut_frac * rt.num_blocks)
    p = engine.prepare(images[0], cut)
    emb = engine.finish(p)  # [embed_dim]
    np.testing.assert_allclose(emb, Tower(rt).embed_images(images[0])[0], atol=1e-5)


def test_prompt_cache_memory_and_disk(bundle: Path, tmp_path: Path) -> None:
    rt = BundleRuntime(bundle)
    cache = PromptCache(rt.manifest.bundle_id, tmp_path)
    engine = LocalEngine(rt, cache)
    prompts = prompt_set(PROMPTS)
    first = engine.text(prompts)
    assert cache.misses == 1
    assert engine.text(prompts) is first and cache.hits == 1
    reloaded = PromptCache(rt.manifest.bundle_id, tmp_path)  # a restarted node finds it on disk
    np.testing.assert_array_equal(reloaded.get(prompts.key()), first)
    assert reloaded.get(["something else"]) is None


def test_paths_and_pil_images(bundle: Path, images: list[np.ndarray], tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(images[0]).save(path)
    with EdgeNode(bundle) as node:
        a = node.classify(path, PROMPTS)
        b = node.classify(Image.fromarray(images[0]), PROMPTS)
    assert a.source == str(path)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)


def test_unreadable_image_gets_an_error_result_not_an_exception(
    bundle: Path, images: list[np.ndarray], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with EdgeNode(bundle) as node:
        results = list(node.classify_many([images[0], bad, images[1]], PROMPTS))
    assert len(results) == 3
    errors = [r for r in results if not r.ok]
    assert len(errors) == 1 and errors[0].reason == "error" and errors[0].source == str(bad)


def test_bad_prompts_raise(bundle: Path, images: list[np.ndarray]) -> None:
    with EdgeNode(bundle) as node, pytest.raises(PromptError):
        node.classify(images[0], [])


def test_tampered_bundle_is_refused(bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    with (copy / "vision" / "head.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="tampered"):
        EdgeNode(copy)


def test_a_node_that_may_not_send_pixels_never_runs_cut_0_against_a_cloud(bundle: Path) -> None:
    from splitclip.settings import SettingsError

    with pytest.raises(SettingsError, match="SPLITCLIP_ALLOW_IMAGE_UPLOAD=0 forbids"):
        EdgeNode(bundle, cloud="127.0.0.1:1", cut=0, allow_image_upload=False)
    with EdgeNode(bundle, cloud="127.0.0.1:1", cut=1, allow_image_upload=False) as node:
        assert node.cut == 1
    with EdgeNode(bundle, cut=0, allow_image_upload=False) as node:  # no cloud: nothing leaves the node
        assert node.cut == 0

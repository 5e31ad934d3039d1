"""Prompts on both sides against the real cloud: labels with odd whitespace and case, with templates,
score the same in split mode (the cloud's text) and in local mode (the edge's), whether the local
prompt cache was warmed from the cloud's EncodeText or filled by the edge's own text tower."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from demo.cloudproc import CloudProcess
from edge_node.node import EdgeNode
from edge_node.results import EdgeResult
from splitclip.bundle import load_bundle
from splitclip.prompts import prompt_set
from tests.e2e.test_edge_cloud import FAST, TOKEN, wait_answering

LABELS = ["  Red   circle ", "a BLUE\tsquare", "green Triangle", "a photo of a cat"]
TEMPLATES = ["a photo of a {}", "a drawing of a {}"]
# the breaker, once opened by the test, stays open: local answers from a node that knows the cloud
STAY_OPEN = {**FAST, "probe_interval_s": 600.0, "probe_max_s": 600.0}


@pytest.fixture(scope="module")
def cloud(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudProcess]:
    log = tmp_path_factory.mktemp("cloud") / "cloud.log"
    c = CloudProcess(tiny_bundle_dir, log_path=log, env={"SPLITCLIP_NODE_TOKEN": TOKEN})
    c.start()
    wait_answering(c, load_bundle(tiny_bundle_dir).manifest.bundle_id)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [(rng.random((36 + i, 44, 3)) * 255).astype(np.uint8) for i in range(6)]


def by_id(results) -> list[EdgeResult]:
    return sorted(results, key=lambda r: r.frame_id)


def probs(results: list[EdgeResult]) -> np.ndarray:
    return np.array([r.probabilities for r in results])  # [n_images, n_labels]


def no_local_text(node: EdgeNode) -> None:
    def refuse(texts):
        raise AssertionError(f"the edge's text tower ran for {texts!r}: the cache was not warmed")

    node.engine.rt.encode_text = refuse  # type: ignore[method-assign]


@pytest.mark.parametrize("templates", [(), TEMPLATES], ids=["no-templates", "templates"])
def test_split_and_local_agree_with_the_cache_warmed_from_the_cloud(
    tiny_bundle_dir, cloud, images, templates
) -> None:
    with EdgeNode(tiny_bundle_dir, cloud=cloud.address, cut=1, **{**STAY_OPEN, "codec": "lossless"}) as node:
        assert node.mode == "split", node.mode_reason
        no_local_text(node)  # every local answer below must use the cloud's EncodeText embeddings
        split = by_id(node.classify_many(images, LABELS, templates=templates))
        unary = node.classify(images[0], LABELS, templates=templates)
        assert node.engine.prompts.get(prompt_set(LABELS, templates).key()) is not None
        node.breaker.trip("test: answer locally")
        local = by_id(node.classify_many(images, LABELS, templates=templates))
    assert {(r.mode, r.reason) for r in [*split, unary]} == {("split", "cloud")}
    assert {r.mode for r in local} == {"local"}
    assert [r.labels for r in split] == [r.labels for r in local]
    assert split[0].labels[0] in LABELS  # results name the labels as given
    np.testing.assert_allclose(probs(split), probs(local), atol=1e-4)
    np.testing.assert_allclose(unary.probabilities, split[0].probabilities, atol=1e-4)


@pytest.mark.parametrize("templates", [(), TEMPLATES], ids=["no-templates", "templates"])
def test_split_and_local_agree_with_the_text_computed_on_the_edge(
    tiny_bundle_dir, cloud, images, templates
) -> None:
    with EdgeNode(tiny_bundle_dir) as alone:  # no cloud: the edge's own text tower fills the cache
        local = by_id(alone.classify_many(images, LABELS, templates=templates))
        edge_text = alone.prompt_embeddings(LABELS, templates)
    with EdgeNode(tiny_bundle_dir, cloud=cloud.address, cut=1, **{**STAY_OPEN, "codec": "lossless"}) as node:
        split = by_id(node.classify_many(images, LABELS, templates=templates))
        cloud_text = node.engine.prompts.get(prompt_set(LABELS, templates).key())
        node.engine.prompts.clear()  # cache cleared: local answers compute the text here
        node.breaker.trip("test: answer locally")
        local_cleared = by_id(node.classify_many(images, LABELS, templates=templates))
    assert {r.mode for r in split} == {"split"} and {r.mode for r in [*local, *local_cleared]} == {"local"}
    assert cloud_text is not None
    np.testing.assert_allclose(cloud_text, edge_text, atol=1e-5)  # the same text on both sides
    np.testing.assert_allclose(probs(split), probs(local), atol=1e-4)
    np.testing.assert_allclose(probs(split), probs(local_cleared), atol=1e-4)


def test_normalised_labels_score_like_their_clean_spelling(tiny_bundle_dir, cloud, images) -> None:
    clean = [" ".join(label.split()) for label in LABELS]
    with EdgeNode(tiny_bundle_dir, cloud=cloud.address, cut=1, **{**FAST, "codec": "lossless"}) as node:
        odd = by_id(node.classify_many(images[:2], LABELS, templates=TEMPLATES))
        tidy = by_id(node.classify_many(images[:2], clean, templates=TEMPLATES))
    assert {r.mode for r in [*odd, *tidy]} == {"split"}
    np.testing.assert_allclose(probs(odd), probs(tidy), atol=1e-5)

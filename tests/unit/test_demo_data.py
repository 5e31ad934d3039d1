"""Tests for partitioner/demo_data.py and the committed demo checkpoint (models/demo-clip)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from demo import data as dd

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "demo-clip"


def _pixels(split: list) -> list[bytes]:
    return [im.tobytes() for im, _, _ in split]


def test_same_seed_same_images_and_captions():
    a = dd.make_split(12, seed=3, split="train")
    b = dd.make_split(12, seed=3, split="train")
    assert _pixels(a) == _pixels(b)
    assert [(c, lab) for _, c, lab in a] == [(c, lab) for _, c, lab in b]


def test_different_seeds_or_splits_differ():
    base = _pixels(dd.make_split(8, seed=3, split="train"))
    assert base != _pixels(dd.make_split(8, seed=4, split="train"))
    assert base != _pixels(dd.make_split(8, seed=3, split="seen"))


def test_held_out_combos_cover_every_colour_and_shape_but_not_all_their_combos():
    assert all(c in dd.COLORS and s in dd.SHAPES for c, s in dd.HELD_OUT)
    held_colours = {c for c, _ in dd.HELD_OUT}
    held_shapes = {s for _, s in dd.HELD_OUT}
    assert held_colours == set(dd.COLORS)
    assert held_shapes == set(dd.SHAPES)
    seen = dd.combos("seen")
    assert {c for c, _ in seen} == set(dd.COLORS)
    assert {s for _, s in seen} == set(dd.SHAPES)
    assert len(seen) + len(dd.combos("heldout")) == len(dd.label_names())


@pytest.mark.parametrize("split", ["train", "seen", "heldout"])
def test_splits_respect_held_out(split):
    names = dd.label_names()
    held = {dd.label_index(c, s) for c, s in dd.HELD_OUT}
    data = dd.make_split(200, seed=11, split=split)
    for _, cap, label in data:
        color, shape = names[label].split()
        assert color in cap.split() and shape in cap.split()
        assert (label in held) == (split == "heldout")


def test_labels_and_prompts_consistent():
    names = dd.label_names()
    assert len(names) == len(set(names)) == len(dd.COLORS) * len(dd.SHAPES)
    for c in dd.COLORS:
        for s in dd.SHAPES:
            assert names[dd.label_index(c, s)] == f"{c} {s}"
    assert dd.label_prompts()[0] == f"a photo of a {names[0]}"


def test_captions_use_only_vocabulary_words():
    vocab = set(dd.vocabulary())
    rng = np.random.default_rng(0)
    for _ in range(500):
        scene = dd.sample_scene(rng, "train")
        assert set(dd.caption(scene, rng).split()) <= vocab
    for prompt in dd.label_prompts():
        assert set(prompt.split()) <= vocab


def test_render_is_rgb_of_requested_size():
    scene = dd.Scene("red", "star", "large", "left", "stripes")
    im = dd.render(scene, np.random.default_rng(0), image_size=96)
    assert im.mode == "RGB" and im.size == (96, 96)


def test_write_samples_names_carry_labels(tmp_path):
    paths = dd.write_samples(tmp_path, n=4, seed=1)
    assert len(paths) == 4
    names = set(dd.label_names())
    for p in paths:
        assert p.stem.split("_", 1)[1].replace("-", " ") in names


def test_checkpoint_files_present():
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "training.json",
    ):
        assert (CHECKPOINT / name).is_file(), name
    size = sum(p.stat().st_size for p in CHECKPOINT.iterdir())
    assert size <= 20 * 2**20


def test_checkpoint_tokenizer_matches_config():
    from tokenizers import Tokenizer

    text_cfg = json.loads((CHECKPOINT / "config.json").read_text())["text_config"]
    assert text_cfg["eos_token_id"] != 2  # CLIPTextModel's legacy argmax pooling otherwise
    tok = Tokenizer.from_file(str(CHECKPOINT / "tokenizer.json"))
    ids = tok.encode(dd.label_prompts()[0]).ids
    ids = [i for i in ids if i != text_cfg["pad_token_id"]]
    assert ids[0] == text_cfg["bos_token_id"]
    assert ids[-1] == text_cfg["eos_token_id"]
    assert tok.token_to_id("<unk>") not in ids
    assert len(ids) <= text_cfg["max_position_embeddings"]
    vocab = tok.get_vocab()
    assert all(w in vocab for w in dd.vocabulary())


def test_committed_label_file_matches_the_label_prompts() -> None:
    path = Path(__file__).resolve().parents[2] / "models" / "demo-labels.txt"
    assert path.read_text().splitlines() == dd.label_prompts()

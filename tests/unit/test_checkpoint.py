"""partitioner.checkpoint: a directory that is not a CLIP model gets an error naming what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from partitioner.checkpoint import CheckpointError, load_clip, resolve, validate


@pytest.fixture
def ckpt(tiny_clip_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_clip_dir, dst)
    return dst


def test_valid(ckpt: Path) -> None:
    assert validate(ckpt)["model_type"] == "clip"


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "preprocessor_config.json"])
def test_missing_file_is_named(ckpt: Path, name: str) -> None:
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match=f"missing {name}"):
        validate(ckpt)


def test_missing_weights(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors"):
        validate(ckpt)


def test_not_clip(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "bert"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'bert' model, not a CLIP model"):
        validate(ckpt)


def test_missing_tower(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["text_config"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no text_config"):
        validate(ckpt)


def test_corrupt_weights(ckpt: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="could not load the CLIP weights"):
        load_clip(ckpt)


def test_bad_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        validate(ckpt)


def test_nonexistent_and_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(tmp_path / "missing")
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve(f)

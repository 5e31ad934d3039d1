"""demo.train: a short run is deterministic with a seed and writes a loadable HF checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from partitioner.checkpoint import validate
from splitclip.cli import main

pytest.importorskip("torch")


def _train(out: Path, seed: int) -> str:
    args = ["train-demo", "--out", str(out), "--seed", str(seed), "--steps", "4", "--batch-size", "16",
            "--pool", "256", "--eval-n", "16", "--threads", "2"]  # fmt: skip
    assert main(args) == 0
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = _train(tmp_path / "a", seed=3)
    b = _train(tmp_path / "b", seed=3)
    c = _train(tmp_path / "c", seed=4)
    assert a == b
    assert a != c
    cfg = validate(tmp_path / "a")
    assert cfg["text_config"]["eos_token_id"] == 3

"""Find, validate and load a Hugging Face CLIP checkpoint (a local directory, or a hub id when online)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from splitclip.errors import SplitclipError

if TYPE_CHECKING:
    from transformers import CLIPModel

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
REQUIRED = ("config.json", "tokenizer.json", "preprocessor_config.json")


class CheckpointError(SplitclipError, ValueError):
    """The checkpoint is missing, incomplete, or not a CLIP model."""


def resolve(source: str | Path) -> Path:
    """A local directory as is; otherwise treat `source` as a hub id and download it (needs network)."""
    p = Path(source)
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(
                f"{p} is a file; a CLIP checkpoint is a directory (config.json, weights, tokenizer.json, ...)"
            )
        return p
    if str(source).count("/") != 1 or str(source).startswith((".", "/")):
        raise CheckpointError(f"checkpoint directory {source} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:  # offline, unknown id, auth...
        raise CheckpointError(
            f"{source} is not a local directory and could not be fetched from the hub: {e}"
        ) from e


def validate(path: Path) -> dict:
    """Check the directory holds a CLIP model; return its config.json. Errors name what is missing or wrong."""
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        missing.append("model.safetensors (or pytorch_model.bin)")
    if missing:
        raise CheckpointError(f"{path} is not a complete CLIP checkpoint: missing {', '.join(missing)}")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    model_type = config.get("model_type")
    if model_type != "clip":
        raise CheckpointError(
            f"{path} holds a {model_type!r} model, not a CLIP model (config.json model_type must be 'clip')"
        )
    for part in ("vision_config", "text_config"):
        if not isinstance(config.get(part), dict):
            raise CheckpointError(
                f"{path / 'config.json'} has no {part}: a CLIP checkpoint needs both towers"
            )
    return config


def load_clip(source: str | Path) -> tuple[CLIPModel, Path]:
    """Load the model in float32 with eager attention (what the exporter traces)."""
    import torch
    from transformers import CLIPModel

    path = resolve(source)
    validate(path)
    try:
        model = CLIPModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    except Exception as e:
        raise CheckpointError(f"could not load the CLIP weights in {path}: {e}") from e
    return model.eval(), path

"""`splitclip partition MODEL --out BUNDLE`: split a CLIP checkpoint into per-stage ONNX graphs.

The vision tower becomes embed.onnx, one graph per encoder block and head.onnx, so any cut k in 0..L
runs without re-export; the text tower becomes text.onnx (int32 ids, explicit EOS pooling).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from partitioner.agreement import DEFAULT_IMAGES, LABELS_FILE, write_agreement
from partitioner.calibrate import images_in, write_calibration
from splitclip.bundle import Manifest, block_file, load_bundle, write_manifest
from splitclip.errors import SplitclipError
from splitclip.preprocess import PreprocessConfig

HELP = "split a CLIP checkpoint into an ONNX bundle (any cut 0..L)"
log = logging.getLogger("splitclip.partition")

if TYPE_CHECKING:
    import torch
    from transformers import CLIPModel

OPSET = 18


def _stage_modules(model: CLIPModel, eos_id: int) -> dict[str, torch.nn.Module]:
    import torch
    from torch import nn

    vision = model.vision_model

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = vision.embeddings
            self.pre_layrnorm = vision.pre_layrnorm

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.pre_layrnorm(self.embeddings(pixels))  # [batch, tokens, width]

    class Block(nn.Module):
        def __init__(self, layer: nn.Module) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            out = self.layer(hidden, None)
            return out[0] if isinstance(out, tuple) else out  # [batch, tokens, width]

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.post_layernorm = vision.post_layernorm
            self.proj = model.visual_projection

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            emb = self.proj(self.post_layernorm(hidden[:, 0, :]))  # [batch, embed_dim]
            return emb / emb.norm(dim=-1, keepdim=True)

    text = model.text_model

    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text = text
            self.proj = model.text_projection

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            hidden = self.text(input_ids=ids.to(torch.int64)).last_hidden_state  # [batch, context, width]
            # First EOS position; int32 because ORT has no ArgMax over int64/bool.
            pos = (ids == eos_id).to(torch.int32).argmax(dim=-1)
            pooled = hidden[torch.arange(hidden.shape[0]), pos]  # [batch, width]
            emb = self.proj(pooled)
            return emb / emb.norm(dim=-1, keepdim=True)  # [batch, embed_dim]

    stages: dict[str, nn.Module] = {"vision/embed.onnx": Embed()}
    for i, layer in enumerate(vision.encoder.layers):
        stages[block_file(i)] = Block(layer)
    stages["vision/head.onnx"] = Head()
    stages["text.onnx"] = Text()
    return stages


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, dyn_tokens: bool) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    axes: dict[str, dict[int, str]] = {"input": {0: "batch"}, "output": {0: "batch"}}
    if dyn_tokens:
        axes["input"] = {0: "batch", 1: "tokens"}
        if path.name != "head.onnx":
            axes["output"] = {0: "batch", 1: "tokens"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def text_eos_id(model: CLIPModel, tokenizer_path: Path) -> int:
    """The id that ends a prompt. Old CLIP configs say eos_token_id=2 and pool with argmax(ids) instead,
    which picks the highest id: the tokenizer's end-of-text token."""
    eos = int(model.config.text_config.eos_token_id)
    if eos != 2:
        return eos
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    for name in ("<|endoftext|>", "</s>", "<eos>"):
        tid = tok.token_to_id(name)
        if tid is not None:
            return int(tid)
    return int(model.config.text_config.vocab_size) - 1


def partition(
    source: str | Path,
    out: str | Path,
    *,
    calibration_images: int = 64,
    calibration_dir: str | Path | None = None,
    agreement_images: int = 0,
    agreement_labels: str | Path | None = None,
    edge_int8: bool = False,
    progress: bool = True,
) -> Manifest:
    """Export the bundle into `out` (replaced atomically); return its manifest. The codec calibration is
    fitted on up to `calibration_images` images from `calibration_dir`, else on that many synthetic
    shapes (0 = no calibration.npz). The agreement table (agreement.json, see partitioner.agreement) is
    measured on `agreement_images` other images (0, the default here = none;
    `splitclip partition` measures DEFAULT_IMAGES), zero-shot over `agreement_labels` (default:
    labels.txt in the checkpoint directory when there is one), else by retrieval. `edge_int8`: also write
    int8 versions of the blocks (vision/int8/, partitioner.quantize), measured in the table too."""
    import torch
    from tqdm import tqdm

    from partitioner.checkpoint import load_clip
    from splitclip.classify import read_labels

    out = Path(out)
    _check_out(out)
    cal_images = images_in(Path(calibration_dir), calibration_images) if calibration_dir else None
    torch.manual_seed(0)
    model, path = load_clip(source)
    labels_path = Path(agreement_labels) if agreement_labels else path / LABELS_FILE
    labels = (
        read_labels(labels_path)
        if agreement_images > 0 and (agreement_labels or labels_path.is_file())
        else None
    )
    vc, tc = model.config.vision_config, model.config.text_config
    if calibration_images > 0 and cal_images is None and not (path / "training.json").is_file():
        log.warning(
            "no --calibration-images given: the lossy codec presets of this bundle are calibrated on "
            "synthetic shapes, not on images like yours; pass --calibration-images DIR for a real model"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a reader never sees a half-written bundle.
    tmp = Path(tempfile.mkdtemp(prefix=".partition-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        eos_id = text_eos_id(model, path / "tokenizer.json")
        stages = _stage_modules(model, eos_id)
        tokens = (vc.image_size // vc.patch_size) ** 2 + 1
        pixels = torch.randn(2, 3, vc.image_size, vc.image_size)
        hidden = torch.randn(2, tokens, vc.hidden_size)
        ids = torch.full((2, tc.max_position_embeddings), eos_id, dtype=torch.int32)
        ids[:, 0] = 0
        bar = tqdm(stages.items(), desc="exporting stages", unit="graph", disable=not progress)
        for name, module in bar:
            bar.set_postfix_str(name)
            if name == "vision/embed.onnx":
                _export(module, pixels, tmp / name, dyn_tokens=False)
            elif name == "text.onnx":
                _export(module, ids, tmp / name, dyn_tokens=False)
            else:
                _export(module, hidden, tmp / name, dyn_tokens=True)
        if edge_int8:
            from partitioner.quantize import write_int8_stages

            write_int8_stages(tmp, int(vc.num_hidden_layers))
        shutil.copy(path / "tokenizer.json", tmp / "tokenizer.json")
        hf_pre = json.loads((path / "preprocessor_config.json").read_text())
        (tmp / "preprocess.json").write_text(PreprocessConfig.from_hf(hf_pre).to_json())
        if calibration_images > 0:
            write_calibration(tmp, images=cal_images, n_images=calibration_images, progress=progress)
        fields: dict[str, Any] = {
            "model_name": path.resolve().name,
            "embed_dim": int(model.config.projection_dim),
            "logit_scale": float(model.logit_scale.exp().item()),
            "vision": {
                "image_size": int(vc.image_size),
                "patch_size": int(vc.patch_size),
                "num_blocks": int(vc.num_hidden_layers),
                "width": int(vc.hidden_size),
                "num_tokens": int(tokens),
            },
            "text": {
                "context_length": int(tc.max_position_embeddings),
                "vocab_size": int(tc.vocab_size),
                "width": int(tc.hidden_size),
                "eos_token_id": eos_id,
                "pad_token_id": int(tc.pad_token_id if tc.pad_token_id is not None else eos_id),
            },
            "extra": {"source": str(source), "opset": OPSET},
        }
        if agreement_images > 0:  # measured on the bundle itself, so it needs a manifest; then re-sealed
            write_manifest(tmp, fields)
            write_agreement(
                tmp,
                n_images=agreement_images,
                labels=labels,
                image_dir=Path(calibration_dir) if calibration_dir else None,
                skip=len(cal_images) if cal_images is not None else 0,
                progress=progress,
            )
        manifest = write_manifest(tmp, fields)  # covers agreement.json: its sha256 is in the bundle id
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class OutputError(SplitclipError, ValueError):
    """--out cannot be written (it, or a parent, is a file)."""


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a bundle directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"--out {out}: {parent} is a file, not a directory")
            break


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face CLIP checkpoint: a local directory (or a hub id when online)")
    p.add_argument("--out", required=True, help="bundle directory to write (replaced if it exists)")
    p.add_argument(
        "--calibration-images",
        metavar="DIR",
        help="a directory of images like the ones the nodes will see: the codec's per-cut PCA bases are "
        "fitted on them (default: synthetic shapes, right only for the demo model)",
    )
    p.add_argument(
        "--calibration-count",
        type=int,
        default=64,
        metavar="N",
        help="how many calibration images to use (default 64; 0 = no calibration.npz, no lossy presets)",
    )
    p.add_argument(
        "--agreement-images",
        type=int,
        default=DEFAULT_IMAGES,
        metavar="N",
        help=f"measure every (cut, preset) against the unsplit model on N images not used for calibration "
        f"and store the table as agreement.json (default {DEFAULT_IMAGES}; 0 = no table)",
    )
    p.add_argument(
        "--agreement-labels",
        metavar="FILE",
        help=f"labels (one prompt per line) whose zero-shot top-1 the table measures (default: {LABELS_FILE} "
        "in the checkpoint directory when present, else nearest-neighbour retrieval among the images)",
    )
    p.add_argument(
        "--edge-int8",
        action="store_true",
        help="also write int8 versions of the encoder blocks (vision/int8/, onnxruntime dynamic quantisation) "
        "for the edge, and measure their agreement; the cloud always runs fp32",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    m = partition(
        args.model,
        args.out,
        calibration_images=args.calibration_count,
        calibration_dir=args.calibration_images,
        agreement_images=args.agreement_images,
        agreement_labels=args.agreement_labels,
        edge_int8=args.edge_int8,
        progress=not args.quiet,
    )
    load_bundle(args.out)  # verify what we wrote
    v = m.vision
    print(
        f"bundle {m.bundle_id} -> {args.out}: {v.num_blocks} blocks, width {v.width}, {v.num_tokens} tokens, "
        f"embed {m.embed_dim}, cuts 0..{v.num_blocks}{', int8 edge blocks' if m.has_int8 else ''} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="splitclip partition", description=__doc__)
    build_parser(parser)
    raise SystemExit(run(parser.parse_args()))

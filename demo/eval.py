"""`splitclip eval-demo`: zero-shot top-1 accuracy of the demo checkpoint on seen and held-out combos."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from demo import data as demo_data
from splitclip.preprocess import PreprocessConfig, preprocess

HELP = "zero-shot accuracy of a demo checkpoint on seen / held-out combos"


def evaluate(model_dir: str | Path, n: int = 1000, seed: int = 1234, threads: int = 2) -> dict[str, Any]:
    """Top-1 over all colour×shape prompts (label_prompts()) for n "seen" and n "heldout" images."""
    import torch
    from tokenizers import Tokenizer
    from transformers import CLIPModel

    torch.set_num_threads(threads)
    model_dir = Path(model_dir)
    model = CLIPModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = PreprocessConfig.from_hf(json.loads((model_dir / "preprocessor_config.json").read_text()))
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    context = model.config.text_config.max_position_embeddings
    tok.enable_padding(pad_id=model.config.text_config.pad_token_id, length=context)
    tok.enable_truncation(max_length=context)

    enc = tok.encode_batch(demo_data.label_prompts())
    ids = torch.tensor([e.ids for e in enc])  # [labels, context]
    mask = torch.tensor([e.attention_mask for e in enc])
    result: dict[str, Any] = {"n": n, "seed": seed, "labels": len(enc)}
    with torch.inference_mode():
        txt = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        txt = torch.nn.functional.normalize(txt, dim=-1)  # [labels, embed]
        for split in ("seen", "heldout"):
            data = demo_data.make_split(n, seed, split)
            labels = np.array([label for _, _, label in data])
            correct = 0
            for start in range(0, n, 250):
                pixels = torch.from_numpy(preprocess([im for im, _, _ in data[start : start + 250]], config))
                img = model.get_image_features(pixel_values=pixels).pooler_output
                img = torch.nn.functional.normalize(img, dim=-1)  # [batch, embed]
                pred = (img @ txt.T).argmax(dim=-1).numpy()
                correct += int((pred == labels[start : start + 250]).sum())
            result[split] = round(correct / n, 4)
    return result


def format_table(result: dict[str, Any]) -> str:
    rows = [
        "| split    | combos | images | top-1  |",
        "|----------|--------|--------|--------|",
    ]
    for split in ("seen", "heldout"):
        combos = len(demo_data.combos(split))  # type: ignore[arg-type]
        rows.append(f"| {split:<8} | {combos:>6} | {result['n']:>6} | {100 * result[split]:5.1f}% |")
    rows.append(f"(zero-shot over all {result['labels']} colour×shape prompts, seed {result['seed']})")
    return "\n".join(rows)


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="models/demo-clip", help="checkpoint directory")
    p.add_argument("--n", type=int, default=1000, help="test images per split")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    print(format_table(evaluate(args.model, n=args.n, seed=args.seed, threads=args.threads)))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    build_parser(parser)
    raise SystemExit(run(parser.parse_args()))

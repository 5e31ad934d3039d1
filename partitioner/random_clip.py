"""`splitclip random-clip --arch vit-b-32 --out DIR`: a CLIP checkpoint with random weights, saved as a
Hugging Face directory (config, safetensors, a word-level tokenizer.json, preprocessor config).

For tests and benchmarks that need a real architecture without a download: the numbers it gives are
about speed and exactness of the split, never about accuracy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from splitclip.constants import CLIP_MEAN, CLIP_STD

HELP = "save a random-weight CLIP checkpoint (tests, benchmarks)"

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "red",
    "green",
    "blue",
    "circle",
    "square",
    "triangle",
    "cat",
    "dog",
    "on",
    "left",
    "right",
    "large",
    "small",
]


def write_word_tokenizer(path: Path, vocab_ids: dict[str, int], bos: str, eos: str) -> None:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel(vocab_ids, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab_ids[bos]), (eos, vocab_ids[eos])]
    )
    tok.save(str(path))


def save_random_clip(
    out: Path,
    *,
    image_size: int,
    patch_size: int,
    width: int,
    layers: int,
    heads: int,
    text_width: int = 512,
    text_layers: int = 12,
    text_heads: int = 8,
    projection_dim: int = 512,
    context: int = 77,
    seed: int = 0,
) -> Path:
    """A CLIPModel with random weights; the text side uses a word-level tokenizer whose eos id is the
    config's (like real CLIP: bos 49406, eos 49407, pad 1 when the vocab is the default size)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vocab_size = 49408
    config = CLIPConfig(
        text_config={
            "hidden_size": text_width,
            "intermediate_size": 4 * text_width,
            "num_hidden_layers": text_layers,
            "num_attention_heads": text_heads,
            "max_position_embeddings": context,
            "vocab_size": vocab_size,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": width,
            "intermediate_size": 4 * width,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        projection_dim=projection_dim,
    )
    model = CLIPModel(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    vocab = {"<pad>": 1, "<unk>": 0, "<bos>": 49406, "<eos>": 49407}
    vocab.update({w: 100 + i for i, w in enumerate(WORDS)})
    write_word_tokenizer(out / "tokenizer.json", vocab, "<bos>", "<eos>")
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": image_size},
                "do_center_crop": True,
                "crop_size": {"height": image_size, "width": image_size},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": list(CLIP_MEAN),
                "image_std": list(CLIP_STD),
                "resample": 3,
                "do_convert_rgb": True,
            }
        )
    )
    return out


ARCHS: dict[str, dict[str, int]] = {
    # image 224, patch 32, width 768, 12 blocks: the vision tower of OpenAI's ViT-B/32
    "vit-b-32": {"image_size": 224, "patch_size": 32, "width": 768, "layers": 12, "heads": 12},
    "vit-b-16": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12},
    "tiny": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "heads": 4, "text_width": 64,
             "text_layers": 2, "text_heads": 4, "projection_dim": 32, "context": 16},
}  # fmt: skip


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--arch", choices=sorted(ARCHS), default="vit-b-32", help="architecture (default vit-b-32)"
    )
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    save_random_clip(args.out, seed=args.seed, **ARCHS[args.arch])
    print(f"random-weight {args.arch} CLIP checkpoint -> {args.out}")
    return 0

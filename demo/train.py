"""`splitclip train-demo`: train the small bundled CLIP model on procedural shapes (see demo_data).

torch and transformers are imported inside functions so that `splitclip --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from demo import data as demo_data
from splitclip.constants import CLIP_MEAN, CLIP_STD

HELP = "train the small demo CLIP model on generated shapes"

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import CLIPModel

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
# eos must not be id 2: CLIPTextModel falls back to legacy argmax pooling when eos_token_id == 2.
SPECIAL_IDS = {PAD: 0, UNK: 1, BOS: 2, EOS: 3}


@dataclass(frozen=True)
class DemoArch:
    image_size: int = 64  # input side in pixels
    patch_size: int = 8  # 8×8 patches -> 64 patches + class token = 65 tokens
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 16  # max text tokens incl. bos/eos
    embed_dim: int = 128  # shared projection size


def build_tokenizer(context_length: int) -> Tokenizer:
    """Word-level tokenizer over demo_data.vocabulary(), adding <bos> … <eos> and padding to context_length."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = dict(SPECIAL_IDS)
    for word in demo_data.vocabulary():
        vocab[word] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, SPECIAL_IDS[BOS]), (EOS, SPECIAL_IDS[EOS])],
    )
    tok.add_special_tokens([PAD, UNK, BOS, EOS])
    tok.enable_padding(pad_id=SPECIAL_IDS[PAD], pad_token=PAD, length=context_length)
    tok.enable_truncation(max_length=context_length)
    return tok


def build_model(arch: DemoArch, vocab_size: int) -> CLIPModel:
    import torch
    from transformers import CLIPConfig, CLIPModel

    text = {
        "vocab_size": vocab_size,
        "hidden_size": arch.text_width,
        "intermediate_size": 4 * arch.text_width,
        "num_hidden_layers": arch.text_layers,
        "num_attention_heads": arch.text_heads,
        "max_position_embeddings": arch.context_length,
        "projection_dim": arch.embed_dim,
        "pad_token_id": SPECIAL_IDS[PAD],
        "bos_token_id": SPECIAL_IDS[BOS],
        "eos_token_id": SPECIAL_IDS[EOS],
    }
    vision = {
        "hidden_size": arch.vision_width,
        "intermediate_size": 4 * arch.vision_width,
        "num_hidden_layers": arch.vision_layers,
        "num_attention_heads": arch.vision_heads,
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
        "projection_dim": arch.embed_dim,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch.embed_dim)
    model = CLIPModel(config)
    # HF initialises position embeddings with std 0.02, ~10× weaker than the patch projections here;
    # stronger ones let the tiny ViT pick up spatial layout (hence shape) sooner.
    torch.nn.init.normal_(model.vision_model.embeddings.position_embedding.weight, std=0.2)
    return model


def preprocessor_config(arch: DemoArch) -> dict[str, Any]:
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": arch.image_size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": arch.image_size, "width": arch.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }


def normalize_uint8(images: np.ndarray) -> np.ndarray:
    """[n, h, w, 3] uint8 -> [n, 3, h, w] float32, CLIP-normalised (the images are already 64×64)."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch; embeddings are unnormalised [batch, embed_dim]."""
    import torch
    import torch.nn.functional as F

    img = F.normalize(image_emb, dim=-1)
    txt = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.T  # [batch, batch]
    target = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batch_indices(
    rng: np.random.Generator, by_color: list[np.ndarray], pool: int, batch: int, grouped: float
) -> np.ndarray:
    """Pool indices for one batch; a `grouped` fraction of batches hold only two colours.

    Colour alone separates most pairs in a random batch, so the loss sits on a colour-only plateau
    for a long time; two-colour batches make shape, size and position the only way down.
    """
    if rng.random() >= grouped:
        return rng.integers(0, pool, size=batch)
    pair = rng.choice(len(by_color), size=2, replace=False)
    members = np.concatenate([by_color[c] for c in pair])
    return rng.choice(members, size=batch, replace=False)


def save_checkpoint(model: CLIPModel, tok: Tokenizer, arch: DemoArch, out: Path) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)
    tok.save(str(out / "tokenizer.json"))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(arch), indent=2) + "\n")


def train(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    arch = DemoArch(vision_width=args.vision_width, vision_layers=args.vision_layers)
    tok = build_tokenizer(arch.context_length)
    model = build_model(arch, tok.get_vocab_size())

    t0 = time.perf_counter()
    pool, scenes = demo_data.make_scenes(args.pool, args.seed, "train", arch.image_size)
    pixels = torch.from_numpy(normalize_uint8(pool))  # [pool, 3, 64, 64]
    del pool
    gen_s = time.perf_counter() - t0
    print(f"generated {args.pool} training images in {gen_s:.1f} s")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    rng = np.random.default_rng([args.seed, 7])
    colors = np.array([demo_data.COLORS.index(sc.color) for sc in scenes])
    by_color = [np.flatnonzero(colors == c) for c in range(len(demo_data.COLORS))]
    warmup = max(1, args.steps // 20)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(args.steps), desc="train-demo", unit="step")
    for step in bar:
        idx = _batch_indices(rng, by_color, args.pool, args.batch_size, args.grouped)
        caps = [demo_data.caption(scenes[i], rng) for i in idx]
        enc = tok.encode_batch(caps)
        ids = torch.tensor([e.ids for e in enc])  # [batch, context]
        mask = torch.tensor([e.attention_mask for e in enc])
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, args.steps, args.lr, warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            img = model.get_image_features(pixel_values=pixels[idx]).pooler_output  # [batch, embed]
            txt = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        loss = clip_loss(img.float(), txt.float(), model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(
                loss=f"{np.mean(losses[-50:]):.3f}", scale=f"{model.logit_scale.exp().item():.1f}"
            )
    train_s = time.perf_counter() - t0
    model.eval()
    save_checkpoint(model, tok, arch, Path(args.out))
    return {
        "arch": asdict(arch),
        "final_loss": float(np.mean(losses[-50:])),
        "generate_seconds": round(gen_s, 1),
        "train_seconds": round(train_s, 1),
    }


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="models/demo-clip", help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warm-up then cosine)")
    p.add_argument(
        "--pool", type=int, default=16384, help="pre-rendered training images (fresh captions per step)"
    )
    p.add_argument("--grouped", type=float, default=0.5, help="fraction of two-colour batches")
    p.add_argument("--vision-width", type=int, default=DemoArch.vision_width)
    p.add_argument("--vision-layers", type=int, default=DemoArch.vision_layers)
    p.add_argument("--threads", type=int, default=2, help="torch threads; fixed for determinism")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast (2× faster here)",
    )
    p.add_argument("--eval-n", type=int, default=1000, help="test images per split for training.json")
    p.add_argument("--eval-seed", type=int, default=1234)


def run(args: argparse.Namespace) -> int:
    from demo.eval import evaluate, format_table

    t0 = time.perf_counter()
    info = train(args)
    result = evaluate(args.out, n=args.eval_n, seed=args.eval_seed, threads=args.threads)
    info |= {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "pool": args.pool,
        "grouped": args.grouped,
        "threads": args.threads,
        "bf16": args.bf16,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "eval": result,
    }
    (Path(args.out) / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(format_table(result))
    print(f"wrote {args.out} in {info['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    build_parser(parser)
    raise SystemExit(run(parser.parse_args()))

"""Train the ShapeWorld tiny CLIP: transformers ``CLIPModel`` (32 px ViT + word-level text tower) trained
contrastively on rendered (image, caption) pairs, saved as a standard CLIP directory (model, tokenizer,
``preprocessor_config.json``) that ``rewards/clipscore.py`` loads like any CLIP.

Captions in a batch are distinct after dropping the prefix ("a photo of" / "an image of" / ...), since equal
captions would be false negatives of the contrastive loss.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from rtdmd_ray.shapes.prompts import MAX_TEXT_TOKENS, PREFIXES, sample_training_prompt, test_prompts
from rtdmd_ray.shapes.render import RESOLUTION_PX, render_batch
from rtdmd_ray.shapes.text import build_tokenizer, tokenize

CLIP_MEAN = (0.5, 0.5, 0.5)
CLIP_STD = (0.5, 0.5, 0.5)


@dataclass
class ClipTrainConfig:
    out: str
    minutes: float = 8.0
    steps: int | None = None  # fixed step count (deterministic); else the cosine is keyed to wall time
    seed: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    threads: int = 1


def caption_body(prompt: str) -> str:
    """The caption without its prefix ("a photo of a red circle" -> "a red circle")."""
    for p in sorted(PREFIXES, key=len, reverse=True):
        if prompt.startswith(p + " "):
            return prompt[len(p) + 1:]
    return prompt


def build_clip(tokenizer) -> CLIPModel:
    """~0.5M-parameter CLIP: ViT 32 px / patch 4 (64 tokens), width 96, 3 layers; text width 64, 2 layers."""
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TEXT_TOKENS,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(image_size=RESOLUTION_PX, patch_size=4, hidden_size=96, intermediate_size=384,
                              num_hidden_layers=3, num_attention_heads=4)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64)
    return CLIPModel(cfg)


def image_processor() -> CLIPImageProcessor:
    """32 px, no resize/crop change, mean/std 0.5 (what ``clipscore`` reads from preprocessor_config.json)."""
    return CLIPImageProcessor(size={"shortest_edge": RESOLUTION_PX},
                              crop_size={"height": RESOLUTION_PX, "width": RESOLUTION_PX},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def distinct_batch(rng: np.random.Generator, batch_size: int) -> list[dict[str, Any]]:
    """``batch_size`` training captions with pairwise-distinct bodies."""
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    while len(out) < batch_size:
        m = sample_training_prompt(rng)
        body = caption_body(m["prompt"])
        if body not in seen:
            seen.add(body)
            out.append(m)
    return out


def clip_loss(model: CLIPModel, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, pixel_values=normalize(images), return_loss=True)
    return out.loss


@torch.no_grad()
def retrieval_accuracy(model: CLIPModel, tokenizer, *, n_batches: int = 10, batch_size: int = 64,
                       seed: int = 1234) -> dict[str, float]:
    """Top-1 image->text and text->image accuracy within batches of ``batch_size`` test captions with distinct
    bodies (chance = 1 / batch_size), on fresh renders."""
    model.eval()
    rng = np.random.default_rng(seed)
    pool = test_prompts(0)
    i2t, t2i = [], []
    for _ in range(n_batches):
        seen: set[str] = set()
        metas: list[dict[str, Any]] = []
        for j in rng.permutation(len(pool)):
            body = caption_body(pool[int(j)]["prompt"])
            if body not in seen:
                seen.add(body)
                metas.append(pool[int(j)])
            if len(metas) == batch_size:
                break
        images = render_batch(metas, rng)
        ids = tokenize(tokenizer, [m["prompt"] for m in metas])
        out = model(input_ids=ids, pixel_values=normalize(images))
        target = torch.arange(len(metas))
        i2t.append((out.logits_per_image.argmax(1) == target).float().mean().item())
        t2i.append((out.logits_per_text.argmax(1) == target).float().mean().item())
    return {"image_to_text_top1": float(np.mean(i2t)), "text_to_image_top1": float(np.mean(t2i)),
            "chance": 1.0 / batch_size, "batch_size": batch_size, "n_batches": n_batches}


def save_clip_dir(path: Path, model: CLIPModel, tokenizer, meta: dict[str, Any]) -> None:
    """Atomically write a standard CLIP directory (model + tokenizer + preprocessor_config.json + meta)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    image_processor().save_pretrained(tmp)
    (tmp / "shapes_clip_meta.json").write_text(json.dumps(meta, indent=2))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def train_clip(cfg: ClipTrainConfig) -> Path:
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # see train_teacher: denormals slow CPU matmuls several-fold
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    model = build_clip(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    budget_s = cfg.minutes * 60
    t0 = time.time()
    step, losses = 0, []
    bar = tqdm(total=cfg.steps, desc="tiny-clip", mininterval=20, ncols=110)
    while True:
        elapsed = time.time() - t0
        progress = step / cfg.steps if cfg.steps else elapsed / budget_s
        if progress >= 1.0:
            break
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng([cfg.seed, step])
        metas = distinct_batch(rng, cfg.batch_size)
        loss = clip_loss(model, render_batch(metas, rng), tokenize(tokenizer, [m["prompt"] for m in metas]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", lr=f"{lr:.1e}")
    bar.close()
    acc = retrieval_accuracy(model, tokenizer)
    meta = {"config": asdict(cfg), "steps": step, "elapsed_s": round(time.time() - t0, 1),
            "final_loss": float(np.mean(losses[-50:])) if losses else None, "retrieval": acc}
    print(json.dumps(meta, indent=2), flush=True)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_clip_dir(out, model, tokenizer, meta)
    return out

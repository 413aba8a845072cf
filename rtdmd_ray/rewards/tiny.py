"""Tiny random-weight models of the real reward classes, for CPU tests and benchmarks (no downloads).

Each builder creates the real transformers class from a small config and saves it with ``save_pretrained``
(plus tokenizer / image-processor files), so the scorers load it through their normal loading code.
The weights are random: these models exercise code paths, shapes and gradients, not reward quality.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (the byte-level BPE alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def tiny_clip_tokenizer() -> Any:
    """A character-level ``CLIPTokenizer`` (514 tokens: every byte with and without ``</w>``, SOT, EOT)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip_config(
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int = 16,
    max_text_len: int = 24,
    hidden_act: str = "quick_gelu",
) -> Any:
    """A ``CLIPConfig`` with small vision/text towers matching ``tiny_clip_tokenizer``."""
    from transformers import CLIPConfig

    tok = tiny_clip_tokenizer()
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        hidden_act=hidden_act,
    )
    text = dict(
        common,
        vocab_size=len(tok),
        max_position_embeddings=max_text_len,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(common, image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_tiny_clip(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
    dtype: torch.dtype = torch.float32,
    **config_kwargs: Any,
) -> Path:
    """Save a random tiny ``CLIPModel`` + tokenizer + ``preprocessor_config.json`` into ``path``."""
    from transformers import CLIPImageProcessorPil, CLIPModel

    path = Path(path)
    torch.manual_seed(seed)
    config = tiny_clip_config(**config_kwargs)
    model = CLIPModel(config).to(dtype)
    model.save_pretrained(path)
    tiny_clip_tokenizer().save_pretrained(path)
    size = config.vision_config.image_size
    kwargs: dict[str, Any] = {}
    if image_mean is not None:
        kwargs["image_mean"] = list(image_mean)
    if image_std is not None:
        kwargs["image_std"] = list(image_std)
    CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **kwargs
    ).save_pretrained(path)
    return path


def save_aesthetic_head(path: str | os.PathLike[str], embed_dim: int, *, seed: int = 0) -> Path:
    """Save a random LAION aesthetic MLP state dict (keys ``layers.{0,2,4,6,7}``) as a ``.pth`` file."""
    from rtdmd_ray.rewards.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    path = Path(path)
    torch.save(AestheticMLP(embed_dim).state_dict(), path)
    return path


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    path = Path(path)
    path.write_text(json.dumps(obj))
    return path


def save_tiny_mask2former(
    path: str | os.PathLike[str], *, num_labels: int = 80, image_px: int = 64, seed: int = 0
) -> Path:
    """Save a random tiny ``Mask2FormerForUniversalSegmentation`` (Swin backbone) + PIL image processor."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessorPil,
        SwinConfig,
    )

    path = Path(path)
    torch.manual_seed(seed)
    swin = SwinConfig(
        image_size=image_px,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=swin,
        num_labels=num_labels,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        num_queries=12,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=64,
        encoder_feedforward_dim=64,
        common_stride=4,
    )
    Mask2FormerForUniversalSegmentation(config).save_pretrained(path)
    Mask2FormerImageProcessorPil(
        size={"shortest_edge": image_px, "longest_edge": 2 * image_px}, size_divisor=32
    ).save_pretrained(path)
    return path

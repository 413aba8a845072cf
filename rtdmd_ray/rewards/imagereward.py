"""ImageReward v1.0 (spec rewards-inference.md §1.6, §1.10) on transformers BLIP classes.

The PyPI ``image-reward`` package does not import with transformers 5, so its model is rebuilt from maintained
classes and loads the original ``ImageReward.pt``: the BLIP ViT-L/16 image tower becomes a ``BlipVisionModel``
(timm names mapped: ``blocks.N.attn.qkv`` -> ``encoder.layers.N.self_attn.qkv`` ...), the BERT text encoder
with cross-attention a ``BlipTextModel`` (same parameter names), and the MLP head is the package's
``768 -> 1024 -> 128 -> 64 -> 16 -> 1`` linear stack (no activations).

Score per (image, prompt): the text encoder over the prompt (BERT tokens, padded/truncated to 35)
cross-attends to the image embeddings; the [CLS] feature goes through the MLP and becomes
``(r - 0.16717362830052426) / 1.0333394966054072`` (typically -2..2). The reference's N x N broadcast over the
prompt list gives exactly these per-pair values; here each image is scored with its own prompt directly.

Scoring preprocessing: 8-bit PIL image, bicubic shorter side to 224, centre crop 224, OpenAI CLIP
normalisation. ``score_differentiable`` (the reference's BP fallback): the float tensor, bicubic resize and
crop with torch ops, same normalisation.

Weights: ``<ckpt root>/ImageReward/ImageReward.pt`` (+ ``med_config.json`` for the text dims), tokenizer
``bert-base-uncased`` plus the ``[DEC]``/``[ENC]`` tokens BLIP adds.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from rtdmd_ray.rewards._common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    as_scores,
    center_crop,
    check_images,
    clip_preprocess,
    find_file,
    find_pretrained,
    load_or_missing,
    load_state_dict_file,
    load_strict,
    no_init,
    normalize,
    resolve_device,
    reward_ckpt_root,
    to_pil,
    upcast,
)
from rtdmd_ray.rewards.aesthetic import AestheticMLP

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35
TOKENIZER_HUB_ID = "google-bert/bert-base-uncased"
# ImageReward's med_config.json (BERT-base with cross-attention; vocab has BLIP's [DEC] and [ENC] added)
MED_CONFIG_DEFAULT = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 512, "vocab_size": 30524, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
}


def blip_vision_to_hf(
    sd: dict[str, torch.Tensor], prefix: str = "blip.visual_encoder."
) -> dict[str, torch.Tensor]:
    """BLIP/timm ViT keys (under ``prefix``) -> transformers ``BlipVisionModel`` keys."""
    rules = [
        (r"^cls_token$", "embeddings.class_embedding"),
        (r"^pos_embed$", "embeddings.position_embedding"),
        (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
        (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
        (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
        (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
        (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
        (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
        (r"^norm\.", "post_layernorm."),
    ]
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        name = k[len(prefix) :]
        for pat, rep in rules:
            name, n = re.subn(pat, rep, name)
            if n:
                break
        out[name] = v
    return out


def blip_text_to_hf(
    sd: dict[str, torch.Tensor], prefix: str = "blip.text_encoder."
) -> dict[str, torch.Tensor]:
    """BLIP med-BERT keys -> ``BlipTextModel`` keys (identical names; buffers and pooler dropped)."""
    return {
        k[len(prefix) :]: v
        for k, v in sd.items()
        if k.startswith(prefix) and not k.endswith("position_ids") and ".pooler." not in k
    }


def vision_config_from(sd: dict[str, torch.Tensor], heads: int) -> dict[str, Any]:
    """``BlipVisionConfig`` kwargs read from the mapped vision state dict shapes (heads must be given)."""
    width = int(sd["embeddings.class_embedding"].shape[-1])
    patch = int(sd["embeddings.patch_embedding.weight"].shape[-1])
    grid = math.isqrt(int(sd["embeddings.position_embedding"].shape[1]) - 1)
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    return {
        "hidden_size": width, "intermediate_size": int(sd["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": layers, "num_attention_heads": heads, "patch_size": patch,
        "image_size": grid * patch, "layer_norm_eps": 1e-6, "hidden_act": "gelu",
    }


def load_blip_tokenizer(source: str, scorer: str) -> Any:
    """BERT tokenizer with BLIP's ``[DEC]`` (bos) and ``[ENC]`` tokens (vocab 30522 -> 30524)."""
    from transformers import AutoTokenizer

    tok = load_or_missing(scorer, source, lambda s: AutoTokenizer.from_pretrained(s), option="tokenizer")
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardScorer:
    """ImageReward on transformers BLIP.

    Args:
        ckpt_dir: reward checkpoint root holding ``ImageReward/ImageReward.pt`` (and ``med_config.json``).
        device: torch device.
        checkpoint: explicit checkpoint path.
        tokenizer: BERT tokenizer dir or hub id (default
            ``<root>/ImageReward/bert-base-uncased``, then the hub).
        vision_heads: attention heads of the image tower (ViT-L: 16).
        image_size: preprocessing size (224).
    """

    name = "imagereward"
    differentiable = True

    def __init__(
        self,
        *,
        ckpt_dir: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        checkpoint: str | None = None,
        tokenizer: str | None = None,
        vision_heads: int = 16,
        image_size: int = 224,
    ) -> None:
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.device = resolve_device(device)
        self.image_size = int(image_size)
        ckpt = find_file(self.name, ckpt_dir, ["ImageReward/ImageReward.pt", "ImageReward.pt"],
                         explicit=checkpoint, option="checkpoint")
        tok_src = find_pretrained(
            ckpt_dir,
            ["ImageReward/bert-base-uncased", "bert-base-uncased"],
            TOKENIZER_HUB_ID,
            explicit=tokenizer,
        )
        self.tokenizer = load_blip_tokenizer(tok_src, self.name)
        sd = load_state_dict_file(ckpt)
        vis_sd, txt_sd = blip_vision_to_hf(sd), blip_text_to_hf(sd)
        mlp_sd = {k[len("mlp.") :]: v for k, v in sd.items() if k.startswith("mlp.")}
        med = dict(MED_CONFIG_DEFAULT)
        root = reward_ckpt_root(ckpt_dir)
        for cand in (
            ckpt.parent / "med_config.json",
            (root / "ImageReward" / "med_config.json") if root else None,
        ):
            if cand is not None and Path(cand).is_file():
                med.update(
                    {k: v for k, v in json.loads(Path(cand).read_text()).items() if k in MED_CONFIG_DEFAULT}
                )
                break
        vis_cfg = vision_config_from(vis_sd, vision_heads)
        tok = self.tokenizer
        txt_cfg = BlipTextConfig(
            **med, encoder_hidden_size=vis_cfg["hidden_size"], pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id,
        )
        with no_init():
            self.vision = BlipVisionModel(BlipVisionConfig(**vis_cfg))
            self.text = BlipTextModel(txt_cfg, add_pooling_layer=False)
        self.mlp = AestheticMLP(int(med["hidden_size"]))
        load_strict(self.vision, vis_sd, self.name, ckpt)
        load_strict(self.text, txt_sd, self.name, ckpt)
        load_strict(self.mlp, mlp_sd, self.name, ckpt)
        for m in (self.vision, self.text, self.mlp):
            m.float().eval().requires_grad_(False).to(self.device)

    def _score(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        dtype = self.vision.embeddings.patch_embedding.weight.dtype
        image_embeds = self.vision(pixel_values=pixel_values.to(self.device, dtype)).last_hidden_state
        enc = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH,
                             return_tensors="pt").to(self.device)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        reward = self.mlp(upcast(out.last_hidden_state[:, 0, :])).squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD

    def preprocess_pil(self, pil_images: list[Any]) -> torch.Tensor:
        """The package's transform: PIL bicubic shorter side, centre crop, ToTensor, CLIP normalise."""
        import numpy as np
        from PIL import Image

        out = []
        n = self.image_size
        for im in pil_images:
            w, h = im.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(n * long / short)
            im = im.resize((n, new_long) if w <= h else (new_long, n), Image.BICUBIC)
            t = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255.0
            out.append(center_crop(t, n))
        return normalize(torch.stack(out), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def score_differentiable(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B, 3, H, W]`` float in [0, 1] -> ``[B]`` with a gradient path (bicubic tensor resize)."""
        check_images(images, prompts, self.name)
        pixels = clip_preprocess(images.to(self.device), size=self.image_size, mode="bicubic")
        return self._score(pixels, prompts)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        check_images(images, prompts, self.name)
        return {self.name: as_scores(self._score(self.preprocess_pil(to_pil(images)), prompts))}

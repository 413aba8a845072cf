"""HPSv2.1 (spec rewards-inference.md §1.2, §1.10): cosine of the HPS-tuned OpenCLIP ViT-H-14 features.

The PyPI ``hpsv2`` package breaks our stack (it downgrades protobuf and lacks a vocab file), so the OpenCLIP
checkpoint is mapped onto a transformers ``CLIPModel`` (``openclip_to_hf``). The model is identical: same
pre-norm blocks, exact GELU, ``ln_pre``/``ln_post``, EOT pooling under a causal mask.

Weights, under the reward checkpoint root: ``HPS_v2.1_compressed.pt`` (key ``state_dict``, required), loaded
on top of ``open_clip_pytorch_model.bin`` when present, as the reference does. A directory already converted
to HF format can be given with ``model=``.

Preprocessing works on the float tensor (differentiable): longer side to 224 (bicubic, antialiased), centred
zero padding to 224x224, OpenAI CLIP normalisation. Score: ``image_features · text_features`` of the
L2-normalised features, i.e. the cosine (about 0.25-0.36); no logit scale. Text: 77 tokens.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch

from rtdmd_ray.rewards._clip import ClipTower
from rtdmd_ray.rewards._common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    as_scores,
    check_images,
    find_file,
    find_pretrained,
    load_or_missing,
    load_state_dict_file,
    load_strict,
    no_init,
    normalize,
    quantized_float,
    resize_max_side_and_pad,
    reward_ckpt_root,
)

HPS_FILE = "HPS_v2.1_compressed.pt"
BASE_FILE = "open_clip_pytorch_model.bin"
TOKENIZER_HUB_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# OpenCLIP ViT-H-14: head width 80 in the vision tower (1280 / 80 = 16 heads), 16 text heads.
VIT_H_14_HEADS = {"vision_heads": 16, "text_heads": 16}


def _count_layers(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max(int(m.group(1)) for k in sd if (m := pat.match(k)))


def openclip_to_hf(
    sd: dict[str, torch.Tensor], *, vision_heads: int, text_heads: int, hidden_act: str = "gelu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Map an OpenCLIP ViT ``state_dict`` to transformers ``CLIPModel`` keys and infer its ``CLIPConfig``.

    Fused ``in_proj`` attention weights are split into q/k/v; ``proj`` / ``text_projection`` matrices are
    transposed into the bias-free projection layers. Head counts cannot be read from shapes, so they are
    arguments (ViT-H-14: 16 and 16).

    Returns:
        ``(hf_state_dict, config_kwargs)`` where ``CLIPConfig(**config_kwargs)`` builds the matching model.
    """
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}

    def blocks(src: str, dst: str, n: int) -> None:
        for i in range(n):
            s, d = f"{src}{i}.", f"{dst}{i}."
            q, k, v = sd[s + "attn.in_proj_weight"].chunk(3, dim=0)
            qb, kb, vb = sd[s + "attn.in_proj_bias"].chunk(3, dim=0)
            for name, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
                out[d + f"self_attn.{name}_proj.weight"] = w
                out[d + f"self_attn.{name}_proj.bias"] = b
            pairs = {
                "attn.out_proj": "self_attn.out_proj",
                "ln_1": "layer_norm1",
                "ln_2": "layer_norm2",
                "mlp.c_fc": "mlp.fc1",
                "mlp.c_proj": "mlp.fc2",
            }
            for a, b_ in pairs.items():
                out[d + b_ + ".weight"] = sd[s + a + ".weight"]
                out[d + b_ + ".bias"] = sd[s + a + ".bias"]

    n_vis = _count_layers(sd, "visual.transformer.resblocks.")
    n_txt = _count_layers(sd, "transformer.resblocks.")
    blocks("visual.transformer.resblocks.", "vision_model.encoder.layers.", n_vis)
    blocks("transformer.resblocks.", "text_model.encoder.layers.", n_txt)
    out["vision_model.embeddings.class_embedding"] = sd["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    for a, b in (
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
        ("ln_final", "text_model.final_layer_norm"),
    ):
        out[b + ".weight"], out[b + ".bias"] = sd[a + ".weight"], sd[a + ".bias"]
    out["visual_projection.weight"] = sd["visual.proj"].t().contiguous()
    out["text_projection.weight"] = sd["text_projection"].t().contiguous()
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    out["logit_scale"] = sd["logit_scale"].reshape(())

    vis_width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = int(math.isqrt(sd["visual.positional_embedding"].shape[0] - 1))
    vocab, txt_width = sd["token_embedding.weight"].shape
    config = {
        "projection_dim": int(sd["visual.proj"].shape[1]),
        "vision_config": {
            "hidden_size": int(vis_width),
            "num_hidden_layers": n_vis,
            "num_attention_heads": vision_heads,
            "intermediate_size": int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "patch_size": int(patch),
            "image_size": int(grid * patch),
            "hidden_act": hidden_act,
            "layer_norm_eps": 1e-5,
        },
        "text_config": {
            "hidden_size": int(txt_width),
            "num_hidden_layers": n_txt,
            "num_attention_heads": text_heads,
            "intermediate_size": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "vocab_size": int(vocab),
            "max_position_embeddings": int(sd["positional_embedding"].shape[0]),
            "hidden_act": hidden_act,
            "layer_norm_eps": 1e-5,
        },
    }
    return out, config


def load_openclip_as_hf(
    files: list[os.PathLike[str] | str], *, vision_heads: int, text_heads: int, eos_token_id: int, scorer: str
) -> Any:
    """Build a ``CLIPModel`` from OpenCLIP checkpoint files (later files override earlier keys), strictly."""
    from pathlib import Path

    from transformers import CLIPConfig, CLIPModel

    merged: dict[str, torch.Tensor] = {}
    for f in files:
        merged.update(load_state_dict_file(Path(f)))
    hf_sd, cfg = openclip_to_hf(merged, vision_heads=vision_heads, text_heads=text_heads)
    # EOT pooling: transformers pools at the first eos token; OpenCLIP at argmax(id), the same position
    cfg["text_config"]["eos_token_id"] = eos_token_id
    with no_init():
        model = CLIPModel(CLIPConfig(**cfg))
    hf_sd = {k: v.float() for k, v in hf_sd.items()}
    load_strict(model, hf_sd, scorer, Path(files[-1]))
    return model


class HPSv2Scorer:
    """HPSv2.1 on a transformers ``CLIPModel`` mapped from the OpenCLIP checkpoint.

    Args:
        ckpt_dir: reward checkpoint root with ``HPS_v2.1_compressed.pt`` (+ ``open_clip_pytorch_model.bin``).
        device: torch device.
        model: an HF-format CLIP directory to use instead of the OpenCLIP files.
        checkpoint: explicit path of the HPS checkpoint.
        tokenizer: directory or hub id of the ViT-H-14 CLIP tokenizer (the OpenAI BPE).
        vision_heads, text_heads: head counts for the OpenCLIP mapping (ViT-H-14: 16, 16).
        image_size: output side of the resize-and-pad step (224).
    """

    name = "hpsv2"
    differentiable = True

    def __init__(
        self,
        *,
        ckpt_dir: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        model: str | None = None,
        checkpoint: str | None = None,
        tokenizer: str | None = None,
        vision_heads: int = VIT_H_14_HEADS["vision_heads"],
        text_heads: int = VIT_H_14_HEADS["text_heads"],
        image_size: int = 224,
    ) -> None:
        from transformers import AutoTokenizer

        self.image_size = int(image_size)
        tok_src = find_pretrained(
            ckpt_dir,
            ["CLIP-ViT-H-14-laion2B-s32B-b79K", TOKENIZER_HUB_ID],
            TOKENIZER_HUB_ID,
            explicit=tokenizer or model,
        )
        if model is not None:
            from transformers import CLIPModel

            clip = load_or_missing(self.name, model, lambda s: CLIPModel.from_pretrained(s), option="model")
            tok = load_or_missing(
                self.name, tok_src, lambda s: AutoTokenizer.from_pretrained(s), option="tokenizer"
            )
        else:
            hps = find_file(self.name, ckpt_dir, [HPS_FILE], explicit=checkpoint, option="checkpoint")
            tok = load_or_missing(
                self.name, tok_src, lambda s: AutoTokenizer.from_pretrained(s), option="tokenizer"
            )
            root = reward_ckpt_root(ckpt_dir)
            base = root / BASE_FILE if root is not None and (root / BASE_FILE).is_file() else None
            clip = load_openclip_as_hf(
                [base, hps] if base is not None else [hps],
                vision_heads=vision_heads,
                text_heads=text_heads,
                eos_token_id=tok.eos_token_id,
                scorer=self.name,
            )
        settings = {
            "size": self.image_size,
            "crop_size": self.image_size,
            "mean": OPENAI_CLIP_MEAN,
            "std": OPENAI_CLIP_STD,
        }
        self.tower = ClipTower(clip, tok, settings, device=device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, 224, 224]``: longer side 224, zero pad, normalise."""
        return normalize(
            resize_max_side_and_pad(images, self.image_size, fill=0.0), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        )

    def score_differentiable(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B]`` cosine with a gradient path to ``images``."""
        check_images(images, prompts, self.name)
        img = self.tower.image_embeds(self.preprocess(images.to(self.tower.device)))
        txt = self.tower.text_embeds(prompts, padding="max_length", max_length=77)
        return (img * txt).sum(-1)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        return {self.name: as_scores(self.score_differentiable(quantized_float(images), prompts))}

"""CLIPScore (spec rewards-inference.md §1.4, §1.10): ``logits_per_image.diagonal() / 100``.

For OpenAI CLIP ViT-L/14 the logit scale is exactly 100, so the score is the text-image cosine
(about 0.27-0.33).
The image path is the reference's torchvision pipeline rebuilt with torch ops: shorter side to the processor's
size (bilinear, antialiased), centre crop, normalise; no rescale since inputs are already in [0, 1]. Text is
padded to 77 tokens. Scoring quantises to 8 bits first; ``score_differentiable`` does not.

Any saved CLIP directory loads here (size, crop, mean/std from its ``preprocessor_config.json``), which is how
the ShapeWorld tiny CLIP is scored.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from rtdmd_ray.rewards._clip import ClipTower
from rtdmd_ray.rewards._common import as_scores, check_images, find_pretrained, quantized_float

HUB_ID = "openai/clip-vit-large-patch14"


class CLIPScoreScorer:
    """CLIPScore on a transformers ``CLIPModel``.

    Args:
        ckpt_dir: reward checkpoint root; ``<root>/clip-vit-large-patch14`` is used when present.
        device: torch device.
        model: a CLIP directory or hub id overriding the default (e.g. the ShapeWorld tiny CLIP).
        logit_divisor: the reference divides the logits by 100 (the CLIP-L logit scale).
        text_max_length: tokens per prompt (padding to max length, truncated).
    """

    name = "clipscore"
    differentiable = True

    def __init__(
        self,
        *,
        ckpt_dir: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        model: str | None = None,
        logit_divisor: float = 100.0,
        text_max_length: int = 77,
    ) -> None:
        source = find_pretrained(ckpt_dir, ["clip-vit-large-patch14", HUB_ID], HUB_ID, explicit=model)
        self.tower = ClipTower.from_pretrained(self.name, source, device=device)
        self.logit_divisor = float(logit_divisor)
        self.text_max_length = int(text_max_length)

    def score_differentiable(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B, 3, H, W]`` float in [0, 1] -> ``[B]`` with a gradient path to ``images``."""
        check_images(images, prompts, self.name)
        img = self.tower.image_embeds(
            self.tower.preprocess_tensor(images.to(self.tower.device), mode="bilinear")
        )
        txt = self.tower.text_embeds(prompts, padding="max_length", max_length=self.text_max_length)
        return self.tower.logit_scale * (img * txt).sum(-1) / self.logit_divisor

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        return {self.name: as_scores(self.score_differentiable(quantized_float(images), prompts))}

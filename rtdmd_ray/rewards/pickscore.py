"""PickScore (spec rewards-inference.md §1.1, §1.10): ``exp(logit_scale) · cos(text, image) / 26``.

Model ``yuvalkirstain/PickScore_v1`` (a CLIP ViT-H/14) with the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Scoring follows the reference exactly: 8-bit PIL images through the
HF CLIP image processor (bicubic shortest edge 224, crop 224, rescale, normalise), text padded to the longest
prompt and truncated at 77 tokens. The result is divided by 26, so typical values are 0.85-0.92; the paper's
tables report the raw value (x 26, about 22-24).

``score_differentiable`` is the reference's BP path: the same tower on the float tensor with a bilinear
antialiased resize (torch ops), no quantisation.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from rtdmd_ray.rewards._clip import ClipTower
from rtdmd_ray.rewards._common import as_scores, check_images, find_pretrained, to_pil

MODEL_HUB_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_HUB_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE_DIVISOR = 26.0


class PickScoreScorer:
    """PickScore on a transformers ``CLIPModel``.

    Args:
        ckpt_dir: reward checkpoint root; ``<root>/PickScore_v1`` and
            ``<root>/CLIP-ViT-H-14-laion2B-s32B-b79K``
            are used when present.
        device: torch device.
        model: directory or hub id of the PickScore CLIP model.
        processor: directory or hub id of the tokenizer + image processor.
        divisor: the reference divides by 26; set 1.0 to report the raw paper-scale value.
    """

    name = "pickscore"
    differentiable = True

    def __init__(
        self,
        *,
        ckpt_dir: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        model: str | None = None,
        processor: str | None = None,
        divisor: float = PICKSCORE_DIVISOR,
    ) -> None:
        model_src = find_pretrained(ckpt_dir, ["PickScore_v1", MODEL_HUB_ID], MODEL_HUB_ID, explicit=model)
        proc_src = find_pretrained(
            ckpt_dir,
            ["CLIP-ViT-H-14-laion2B-s32B-b79K", PROCESSOR_HUB_ID],
            PROCESSOR_HUB_ID,
            explicit=processor,
        )
        self.tower = ClipTower.from_pretrained(self.name, model_src, processor_source=proc_src, device=device)
        self.divisor = float(divisor)

    def _score(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = self.tower.image_embeds(pixel_values)
        txt = self.tower.text_embeds(prompts, padding=True, max_length=77)
        return self.tower.logit_scale * (img * txt).sum(-1) / self.divisor

    def score_differentiable(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B, 3, H, W]`` float in [0, 1] -> ``[B]`` with a gradient path (bilinear tensor resize)."""
        check_images(images, prompts, self.name)
        pixels = self.tower.preprocess_tensor(images.to(self.tower.device), mode="bilinear")
        return self._score(pixels, prompts)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        check_images(images, prompts, self.name)
        pixels = self.tower.preprocess_pil(to_pil(images))
        return {self.name: as_scores(self._score(pixels, prompts))}

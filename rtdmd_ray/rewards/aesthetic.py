"""LAION aesthetic predictor (spec rewards-inference.md §1.5): a linear MLP on the L2-normalised CLIP-L image
embedding, weights ``sac+logos+ava1-l14-linearMSE.pth``. Raw MLP output, about 5-6 for these models.

The image path is the HF CLIP processor on the 8-bit image (bicubic shortest edge 224, crop, rescale,
normalise). The MLP has no activations (768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts), exactly as the
published head. Never differentiable.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from rtdmd_ray.rewards._clip import ClipTower
from rtdmd_ray.rewards._common import (
    as_scores,
    check_images,
    find_file,
    find_pretrained,
    load_state_dict_file,
    load_strict,
    to_pil,
)

CLIP_HUB_ID = "openai/clip-vit-large-patch14"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head: ``[B, D] -> [B, 1]``, purely linear (no activations)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed)


class AestheticScorer:
    """Aesthetic score = MLP(normalised CLIP image embedding).

    Args:
        ckpt_dir: reward checkpoint root holding ``sac+logos+ava1-l14-linearMSE.pth`` (and optionally
            ``clip-vit-large-patch14/``).
        device: torch device.
        clip_model: CLIP directory or hub id (default ``openai/clip-vit-large-patch14``).
        head_path: explicit path of the MLP weights.
    """

    name = "aesthetic"
    differentiable = False

    def __init__(
        self,
        *,
        ckpt_dir: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        clip_model: str | None = None,
        head_path: str | None = None,
    ) -> None:
        # the head file is checked first: it is the piece that must be downloaded by hand
        head_file = find_file(self.name, ckpt_dir, [HEAD_FILE], explicit=head_path, option="head_path")
        source = find_pretrained(
            ckpt_dir, ["clip-vit-large-patch14", CLIP_HUB_ID], CLIP_HUB_ID, explicit=clip_model
        )
        self.tower = ClipTower.from_pretrained(self.name, source, device=device, option="clip_model")
        embed_dim = int(self.tower.model.config.projection_dim)
        self.mlp = AestheticMLP(embed_dim)
        load_strict(self.mlp, load_state_dict_file(head_file), self.name, head_file)
        self.mlp = self.mlp.eval().requires_grad_(False).to(self.tower.device)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        check_images(images, prompts, self.name)
        embed = self.tower.image_embeds(self.tower.preprocess_pil(to_pil(images)))
        return {self.name: as_scores(self.mlp(embed).squeeze(-1))}

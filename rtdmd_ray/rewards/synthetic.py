"""Synthetic scorers for tests and benchmarks of the RL system (no weights, deterministic).

- ``brightness``: mean pixel value, differentiable; a CPU RL run should visibly push it up.
- ``latency``: a fixed service time per call (``seconds_per_batch``) and a deterministic score, to measure how
  the reward pool overlaps scoring with sampling.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from rtdmd_ray.rewards._common import as_scores, check_images


class BrightnessScorer:
    """Score = mean pixel value of the (float, un-quantised) image, in [0, 1]. Differentiable."""

    name = "brightness"
    differentiable = True

    def __init__(self, *, ckpt_dir: str | os.PathLike[str] | None = None, device: str = "cpu") -> None:
        del ckpt_dir  # no weights
        self.device = torch.device(device)

    def score_differentiable(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B]`` mean over channels and pixels, with a gradient path to ``images``."""
        check_images(images, prompts, self.name)
        return images.mean(dim=(1, 2, 3))

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {self.name: as_scores(self.score_differentiable(images, prompts))}


class LatencyScorer:
    """Sleeps ``seconds_per_batch`` per call, then scores ``mean(R) - mean(B)`` of each image (in [-1, 1]).

    The sleep models a remote/heavy reward's service time; the score is a deterministic function of the image
    so tests can check that the right score reaches the right sample.
    """

    name = "latency"
    differentiable = False

    def __init__(
        self,
        *,
        ckpt_dir: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        seconds_per_batch: float = 0.05,
    ) -> None:
        del ckpt_dir
        if seconds_per_batch < 0:
            raise ValueError(f"latency: seconds_per_batch must be >= 0, got {seconds_per_batch}")
        self.device = torch.device(device)
        self.seconds_per_batch = float(seconds_per_batch)
        self.calls = 0

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        check_images(images, prompts, self.name)
        time.sleep(self.seconds_per_batch)
        self.calls += 1
        with torch.no_grad():
            score = images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))
        return {self.name: as_scores(score)}

"""The scorer interface the reward pool hosts (spec rewards-inference.md §1.0, §2).

A scorer maps a batch of images (float ``[B, 3, H, W]`` in [0, 1]) plus prompts and per-prompt metadata to
named per-sample scores. The main key equals the scorer's ``name``; scorers may add extra keys (GenEval adds
``strict_accuracy`` and per-tag keys). Differentiable scorers also implement ``score_differentiable``, used by
the final-step reward back-propagation.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


class RewardWeightsMissing(RuntimeError):
    """Raised at pool start when a scorer's weights are absent. The message is one line naming the file or
    repo id and how to provide it (``RTDMD_REWARD_CKPT_PATH`` or the config key)."""


@runtime_checkable
class Scorer(Protocol):
    name: str
    differentiable: bool

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Scores under no-grad: ``{name: Tensor[B], ...extra keys...}`` (float32, CPU)."""
        ...


@runtime_checkable
class DifferentiableScorer(Scorer, Protocol):
    def score_differentiable(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``Tensor[B]`` with a gradient path from ``images`` (float, in [0, 1], requires grad)."""
        ...

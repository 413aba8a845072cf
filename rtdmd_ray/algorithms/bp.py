"""Reward back-propagation hinge on the deterministic final step (spec §3.7, ``L_BP``)."""

from __future__ import annotations

import torch


def hinge_reward_loss(reward: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """``scale * mean_B relu(margin - R)``: pushes each differentiable reward ``R [B]`` up until it reaches
    ``margin``. Shipped: ``1e-4 * mean relu(3.0 - R)``; with ``R`` far below the margin the hinge is always
    active and the gradient per sample is ``-scale / B``.

    Returns:
        Scalar float32 loss.
    """
    if reward.ndim != 1:
        raise ValueError(
            f"reward must be [B] (one differentiable total per image), got {tuple(reward.shape)}"
        )
    return scale * torch.relu(margin - reward.float()).mean()

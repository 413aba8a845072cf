"""The normalised distribution-matching loss shared by every DMD-type update (spec §2.7)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class DMDLoss(NamedTuple):
    """``loss``: scalar float32 with ``dL/dx = g / numel(x)``; ``grad_norm``: detached ``||g||_2``
    (logged)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor


def dmd_loss(x: torch.Tensor, y_fake: torch.Tensor, y_real: torch.Tensor, normalize: bool = True) -> DMDLoss:
    """DMD loss ``L = 1/2 * mean( x - stopgrad(x - g) )^2 = 1/2 * mean(g^2)``, computed in float64.

    ``g = y_fake - y_real`` (the fake-minus-teacher difference, no grad); with ``normalize`` each sample's
    ``g`` is divided by ``mean_CHW |x - y_real|``. Gradient descent then moves ``x`` along ``y_real -
    y_fake``: toward the teacher, away from the fake score. Non-finite ``g`` (e.g. ``x == y_real`` exactly,
    0/0) is mapped to 0, so a degenerate sample contributes no gradient.

    Args:
        x: generator-side sample ``[B, ...]`` (with grad).
        y_fake, y_real: fake-score and teacher projections of the same shape (no grad needed).
        normalize: ``dmd.gradient_normalization``.

    Returns:
        ``DMDLoss(loss, grad_norm)``.
    """
    if not (x.shape == y_fake.shape == y_real.shape):
        raise ValueError(
            f"dmd_loss shapes differ: x {tuple(x.shape)}, y_fake {tuple(y_fake.shape)}, "
            f"y_real {tuple(y_real.shape)}"
        )
    with torch.no_grad():
        x64 = x.detach().double()
        g = y_fake.detach().double() - y_real.detach().double()
        if normalize:
            dims = tuple(range(1, x.ndim))
            g = g / (x64 - y_real.detach().double()).abs().mean(dim=dims, keepdim=True)
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        grad_norm = torch.linalg.vector_norm(g).float()
    x_d = x.double()
    loss = 0.5 * torch.mean((x_d - (x_d - g).detach()) ** 2)
    return DMDLoss(loss=loss.float(), grad_norm=grad_norm)

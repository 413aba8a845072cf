"""The normalised distribution-matching loss shared by every DMD-type update (spec §2.7)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class DMDLoss(NamedTuple):
    """``loss``: scalar float32 with ``dL/dx = g / numel(x)``; ``grad_norm``: detached ``||g||_2``
    (logged)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor


def dmd_loss(
    x: torch.Tensor,
    y_fake: torch.Tensor,
    y_real: torch.Tensor,
    normalize: bool = True,
    norm_diff: torch.Tensor | None = None,
) -> DMDLoss:
    """DMD loss ``L = 1/2 * mean( x - stopgrad(x - g) )^2 = 1/2 * mean(g^2)``, computed in float64.

    ``g = y_fake - y_real`` (the fake-minus-teacher difference, no grad); with ``normalize`` each sample's
    ``g`` is divided by ``mean_CHW |x - y_real|`` (the reference), or by ``mean_CHW |norm_diff|`` when
    ``norm_diff`` is given (``clean_normaliser`` builds the noise-free one). Gradient descent then moves
    ``x`` along ``y_real - y_fake``: toward the teacher, away from the fake score. Non-finite ``g`` (e.g.
    ``x == y_real`` exactly, 0/0) is mapped to 0, so a degenerate sample contributes no gradient.

    Args:
        x: generator-side sample ``[B, ...]`` (with grad).
        y_fake, y_real: fake-score and teacher projections of the same shape (no grad needed).
        normalize: ``dmd.gradient_normalization``.
        norm_diff: optional ``[B, ...]`` difference whose per-sample mean magnitude is the normaliser.

    Returns:
        ``DMDLoss(loss, grad_norm)``.
    """
    bad_norm = norm_diff is not None and norm_diff.shape != x.shape
    if not (x.shape == y_fake.shape == y_real.shape) or bad_norm:
        raise ValueError(
            f"dmd_loss shapes differ: x {tuple(x.shape)}, y_fake {tuple(y_fake.shape)}, "
            f"y_real {tuple(y_real.shape)}"
            + (f", norm_diff {tuple(norm_diff.shape)}" if norm_diff is not None else "")
        )
    with torch.no_grad():
        x64 = x.detach().double()
        g = y_fake.detach().double() - y_real.detach().double()
        if normalize:
            dims = tuple(range(1, x.ndim))
            diff = x64 - y_real.detach().double() if norm_diff is None else norm_diff.detach().double()
            g = g / diff.abs().mean(dim=dims, keepdim=True)
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        grad_norm = torch.linalg.vector_norm(g).float()
    x_d = x.double()
    loss = 0.5 * torch.mean((x_d - (x_d - g).detach()) ** 2)
    return DMDLoss(loss=loss.float(), grad_norm=grad_norm)


def clean_normaliser(
    x0_gen: torch.Tensor, x0_real: torch.Tensor, sigma_s: torch.Tensor | float
) -> torch.Tensor:
    """The noise-free ``norm_diff`` of ``dmd.normalization: clean``: ``(1 - sigma_s) (x0_gen - x0_real)``.

    ``x0_gen`` is the generator's clean prediction of its last executed step and ``x0_real`` the teacher's at
    the renoised ``(x_e, sigma_e)``. At a clean boundary (``sigma_s = 0``) ``x = x0_gen`` and ``y_real =
    x0_real``, so this equals the reference's ``x - y_real``. Above it, the reference's ``x - y_real``
    carries two independent CPS noises (about ``sqrt(2) sigma_s`` per element), which shrinks the gradient
    of the early steps by one to two orders of magnitude (docs/design.md, 7.1.12); this keeps only the
    signal part, in the units of ``x_s`` (whose clean component is ``(1 - sigma_s) x0``).

    Returns:
        ``[B, ...]`` float32, no grad.
    """
    s = torch.as_tensor(sigma_s, dtype=torch.float32, device=x0_gen.device)
    s = s.reshape(-1, *([1] * (x0_gen.ndim - 1))) if s.ndim else s
    return (1.0 - s) * (x0_gen.detach().float() - x0_real.detach().float())

"""Sampler steps with log-probabilities: CPS (coefficients-preserving sampling), Euler and Flow-GRPO SDE
(§1.3-1.4).

From a velocity ``v ~ eps - x0`` at ``(x, sigma)``: ``x0_hat = x - sigma * v``, ``eps_hat = x + (1 - sigma) *
v``. A CPS step ``sigma -> sigma'`` with ``theta = eta * pi / 2`` is

    x' = (1 - sigma') * x0_hat + sigma' * cos(theta) * eps_hat + sigma' * sin(theta) * xi,   xi ~ N(0, I)

so the total noise coefficient stays ``sigma'``. Everything is computed in float32; samples come back in
``v``'s dtype. ``sigma``/``sigma_next`` may be python floats or ``[B]`` tensors (per-sample levels).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class CPSStep(NamedTuple):
    """One transition.

    Attributes:
        sample: ``x' [B, C, H, W]`` in ``v``'s dtype.
        mean: ``mu [B, C, H, W]`` float32 (carries grad through ``v``).
        std: ``rho = sigma' * sin(theta)``, float32 ``[B, 1, 1, 1]`` (0 on a deterministic step).
        log_prob: ``[B]`` float32; for CPS the reference's unnormalised ``-mean_CHW (x' - mu)^2`` (or the true
            Gaussian log-density per element with ``log_prob="gaussian"``).
    """

    sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float or ``[B]``/``[1]`` tensor as float32 ``[B or 1, 1, ..., 1]`` broadcastable against ``like``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1 or t.shape[0] not in (1, like.shape[0]):
        raise ValueError(
            f"a noise level must be a float or a [B] tensor with B={like.shape[0]}, got {tuple(t.shape)}"
        )
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def randn_like_on(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 standard normal noise shaped like ``x`` on ``x``'s device, drawn on the generator's device.

    A CPU generator therefore works for CUDA latents (the draw happens on the CPU, then moves), which also
    makes seeded draws device-independent; without a generator the global RNG of ``x``'s device is used.
    """
    if generator is None:
        return torch.randn(x.shape, dtype=torch.float32, device=x.device)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=generator.device)
    return noise.to(x.device)


def _mean_chw(t: torch.Tensor) -> torch.Tensor:
    """Average over every non-batch dim: ``[B, ...] -> [B]``."""
    return t.mean(dim=tuple(range(1, t.ndim)))


def predict_x0(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Clean-sample prediction ``x - sigma * v`` (float32 ``[B, C, H, W]``)."""
    return x.float() - _per_sample(sigma, x) * v.float()


def predict_eps(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Noise prediction ``x + (1 - sigma) * v`` (float32 ``[B, C, H, W]``)."""
    return x.float() + (1.0 - _per_sample(sigma, x)) * v.float()


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor
) -> torch.Tensor:
    """Deterministic flow step ``x + (sigma' - sigma) * v`` in float32, returned in ``v``'s dtype."""
    x32, v32 = x.float(), v.float()
    return (x32 + (_per_sample(sigma_next, x32) - _per_sample(sigma, x32)) * v32).to(v.dtype)


def cps_log_prob(
    sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | None = None, kind: str = "reference"
) -> torch.Tensor:
    """Log-probability of ``sample`` under the CPS transition with ``mean``; ``[B]`` float32.

    Args:
        sample: the realised next latent ``[B, C, H, W]`` (treated as data: detached).
        mean: the transition mean ``[B, C, H, W]`` (gradient flows through it).
        std: ``rho [B, 1, 1, 1]``; needed only for ``kind="gaussian"``.
        kind: ``"reference"``: ``-mean_CHW (x' - mu)^2``, the reference's unnormalised form (no
            ``1/(2 rho^2)``, no constants; equals ``2 rho^2 / D * (log N + const)``). ``"gaussian"``: the
            per-element mean of the true log-density ``-(x'-mu)^2/(2 rho^2) - log rho - log sqrt(2 pi)``;
            deterministic samples (``rho == 0``) get 0.
    """
    diff_sq = (sample.detach().float() - mean.float()) ** 2
    if kind == "reference":
        return -_mean_chw(diff_sq)
    if kind == "gaussian":
        if std is None:
            raise ValueError("cps_log_prob(kind='gaussian') needs std (rho)")
        rho = std.float().expand(mean.shape[0], *std.shape[1:])
        safe = torch.where(rho > 0, rho, torch.ones_like(rho))
        elem = -diff_sq / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
        return torch.where(rho.reshape(-1) > 0, _mean_chw(elem), torch.zeros_like(_mean_chw(elem)))
    raise ValueError(
        f"log_prob kind must be 'reference' or 'gaussian' (config key grpo.log_prob), got {kind!r}"
    )


def cps_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    eta: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    prev_sample: torch.Tensor | None = None,
    log_prob: str = "reference",
) -> CPSStep:
    """One CPS transition ``sigma -> sigma_next`` with its log-probability (spec §1.3-1.4).

    Args:
        x: current latents ``[B, C, H, W]``.
        v: predicted velocity at ``(x, sigma)``, same shape; its dtype is the output dtype.
        sigma, sigma_next: python floats or ``[B]`` tensors.
        eta: stochasticity in [0, 1]; 0 is the deterministic Euler step, 0.9 in every shipped config.
        noise: the fresh-noise term ``xi`` (e.g. SubGRPO's shared noise), shape of ``x``; drawn with
            ``generator`` when None (float32, on ``x``'s device).
        generator: RNG for the fresh noise.
        prev_sample: recompute mode (PPO): use this stored ``x'`` instead of sampling; no noise is drawn.
        log_prob: ``"reference"`` or ``"gaussian"``, see ``cps_log_prob``.

    Returns:
        ``CPSStep``. Deterministic samples (``sigma_next == 0`` or ``eta == 0``) take the Euler form
        ``x + (sigma' - sigma) * v``, which at ``sigma' = 0`` is exactly ``x0_hat``; their ``std`` is 0 and
        their log-prob is exactly 0 for any parameters (no policy gradient: hence the aux losses on the
        final step). No noise is drawn when every sample is deterministic.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(
            f"CPS eta must be in [0, 1] (config keys sampling.eta / ac_dmd.transition_eta), got {eta}"
        )
    if x.shape != v.shape:
        raise ValueError(f"x {tuple(x.shape)} and v {tuple(v.shape)} must have the same shape")
    x32, v32 = x.float(), v.float()
    s, s_next = _per_sample(sigma, x32), _per_sample(sigma_next, x32)
    theta = eta * math.pi / 2.0
    rho = s_next * math.sin(theta)
    eps_coeff = s_next * math.cos(theta)
    x0 = x32 - s * v32
    eps = x32 + (1.0 - s) * v32
    stochastic_mean = (1.0 - s_next) * x0 + eps_coeff * eps
    deterministic = (s_next == 0) | (eta == 0.0)  # [B or 1, 1, 1, 1]
    euler = x32 + (s_next - s) * v32
    mean = torch.where(deterministic, euler, stochastic_mean)
    rho = torch.where(deterministic, torch.zeros_like(rho), rho)
    rho = rho.expand(x32.shape[0], *rho.shape[1:])

    if prev_sample is not None:
        if prev_sample.shape != x.shape:
            raise ValueError(
                f"prev_sample {tuple(prev_sample.shape)} must have the shape of x {tuple(x.shape)}"
            )
        sample32 = prev_sample.detach().float()
    elif bool(deterministic.all()):
        sample32 = mean
    else:
        if noise is None:
            noise = randn_like_on(x32, generator)
        elif noise.shape != x.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must have the shape of x {tuple(x.shape)}")
        sample32 = mean + rho * noise.to(device=x32.device, dtype=torch.float32)
    # the log-prob is of the sample actually returned (after the cast to v's dtype), so recomputing it
    # later from the stored latent reproduces it bit-exactly; deterministic steps are exactly 0.
    sample = sample32.to(v.dtype)
    logp = cps_log_prob(sample, mean, rho, kind=log_prob)
    logp = torch.where(deterministic.reshape(-1), torch.zeros_like(logp), logp)
    return CPSStep(sample=sample, mean=mean, std=rho, log_prob=logp)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    eta: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    prev_sample: torch.Tensor | None = None,
    sigma_max: float | None = None,
) -> CPSStep:
    """Flow-GRPO's SDE step (``sde_type="sde"``, §1.4), with the true Gaussian log-prob (per-element mean).

    ``std = eta * sqrt(sigma / (1 - sigma~))`` with ``sigma~ = sigma`` except ``sigma = 1`` is replaced by
    ``sigma_max`` (the schedule's ``sigmas[1]``) in the denominator;
    ``mu = x (1 + std^2 dt / (2 sigma)) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt``, ``dt = sigma' - sigma <
    0``; ``x' = mu + std sqrt(-dt) xi``. Not used by the shipped configs; ``eta = 0`` divides by zero (as in
    the reference), so it is rejected here.

    Returns:
        ``CPSStep`` whose ``std`` is the per-step noise scale ``std * sqrt(-dt)`` ``[B, 1, 1, 1]``.
    """
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"the 'sde' step needs eta in (0, 1] (eta = 0 divides by zero); got {eta}")
    x32, v32 = x.float(), v.float()
    s, s_next = _per_sample(sigma, x32), _per_sample(sigma_next, x32)
    if sigma_max is None:
        raise ValueError(
            "sde_step needs sigma_max (the schedule's sigmas[1]) to avoid the sigma = 1 singularity"
        )
    dt = s_next - s
    denom_sigma = torch.where(s == 1, torch.full_like(s, float(sigma_max)), s)
    std_t = torch.sqrt(s / (1.0 - denom_sigma)) * eta
    mean = x32 * (1 + std_t**2 / (2 * s) * dt) + v32 * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    scale = (std_t * torch.sqrt(-dt)).expand(x32.shape[0], *s.shape[1:])
    if prev_sample is not None:
        sample32 = prev_sample.detach().float()
    else:
        if noise is None:
            noise = randn_like_on(x32, generator)
        sample32 = mean + scale * noise.float()
    elem = (
        -((sample32.detach() - mean) ** 2) / (2 * scale**2) - torch.log(scale) - 0.5 * math.log(2 * math.pi)
    )
    return CPSStep(sample=sample32.to(v.dtype), mean=mean, std=scale, log_prob=_mean_chw(elem))

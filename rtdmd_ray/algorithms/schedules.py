"""Noise-level schedules, the 1000-entry training table, timestep-index samplers and the LR warm-up (spec
§1.1-1.2).

Conventions: noise level ``sigma`` in [0, 1]; a raw denoising step ``t`` in (0, 1000] maps to ``r = t /
1000``, which each backbone shifts. A few-step schedule has ``len(step_list) + 1`` values, the last one
exactly 0.0; step ``i`` moves ``sigma[i] -> sigma[i + 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BACKBONES = ("sd3", "flux1", "flux2")

# FLUX.2-klein's empirical mu fit (reference `compute_empirical_mu`): mu(L, n) for n = 10 and n = 200 steps.
_FLUX2_A1, _FLUX2_B1 = 8.73809524e-05, 1.89833333
_FLUX2_A2, _FLUX2_B2 = 0.00016927, 0.45666666
_FLUX2_LONG_SEQ = 4300


def _check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise ValueError(
            f"unknown backbone family {backbone!r}: expected one of {BACKBONES} "
            "(derived from config key model.backbone)"
        )


def static_shift(r: float, shift: float) -> float:
    """SD3-style static shift ``s*r / (1 + (s-1)*r)`` of a raw noise level ``r`` in [0, 1]."""
    return shift * r / (1.0 + (shift - 1.0) * r)


def time_shift(mu: float, r: float, time_shift_type: str = "exponential") -> float:
    """Dynamic (FLUX) time shift of ``r`` in (0, 1]: ``e^mu / (e^mu + 1/r - 1)`` or ``mu / (mu + 1/r - 1)``.

    ``r = 1`` maps to exactly 1.0 because ``1/r - 1 = 0``.
    """
    if time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1.0 / r - 1.0))
    if time_shift_type == "linear":
        return mu / (mu + (1.0 / r - 1.0))
    raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")


def flux1_mu(
    image_seq_len: int,
    *,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
) -> float:
    """FLUX.1 ``mu``: linear in the packed token count ``L = (H_lat/2) * (W_lat/2)`` (1024 at 512 px)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux2_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2-klein empirical ``mu``: depends on the token count ``L = H_lat * W_lat`` AND the step count.

    Above 4300 tokens it is the 200-step fit; otherwise the line through ``(10, m10)`` and ``(200, m200)``
    evaluated at ``num_steps`` (so a truncated step list gets a different schedule).
    """
    m10 = _FLUX2_A1 * image_seq_len + _FLUX2_B1
    m200 = _FLUX2_A2 * image_seq_len + _FLUX2_B2
    if image_seq_len > _FLUX2_LONG_SEQ:
        return m200
    return m200 + (num_steps - 200) * (m200 - m10) / 190.0


def image_seq_len_for(backbone: str, height_px: int, width_px: int | None = None) -> int | None:
    """Token count used by the dynamic shift: FLUX.1 ``(H/16)*(W/16)``, FLUX.2 ``(H/16)*(W/16)``; SD3 None.

    FLUX.1 latents are ``H/8`` and packed 2x2 inside the transformer; FLUX.2 latents are already ``H/16``.
    """
    _check_backbone(backbone)
    width_px = height_px if width_px is None else width_px
    if backbone == "sd3":
        return None
    if height_px % 16 or width_px % 16:
        raise ValueError(f"{backbone} needs an image size divisible by 16, got {height_px}x{width_px}")
    return (height_px // 16) * (width_px // 16)


def sigma_schedule(
    backbone: str,
    step_list: Sequence[int] = (1000, 750, 500, 250),
    image_seq_len: int | None = None,
    *,
    shift: float = 3.0,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    time_shift_type: str = "exponential",
    shift_terminal: float | None = None,
    use_dynamic_shifting: bool = True,
    num_train_timesteps: int = 1000,
) -> list[float]:
    """The shifted few-step schedule ``[sigma_0, ..., sigma_{n-1}, 0.0]`` (spec §1.1).

    Args:
        backbone: ``"sd3"`` (static shift, rounded to 6 decimals like the reference), ``"flux1"`` or
            ``"flux2"`` (dynamic shift, not rounded).
        step_list: raw denoising steps, strictly decreasing, in (0, num_train_timesteps].
        image_seq_len: token count for the dynamic shift (see ``image_seq_len_for``); required for FLUX.
        shift: static shift (SD3, and FLUX.1 with ``use_dynamic_shifting=False``).
        base_shift, max_shift, base_seq_len, max_seq_len: FLUX.1 ``mu`` line (scheduler-config fields).
        time_shift_type: ``"exponential"`` or ``"linear"``.
        shift_terminal: FLUX.2 only: stretch so the last non-zero sigma becomes ``shift_terminal``.
        use_dynamic_shifting: FLUX.1 only: False falls back to the static formula.

    Returns:
        ``len(step_list) + 1`` python floats; the first is 1.0 for a list starting at 1000, the last is 0.0.
    """
    _check_backbone(backbone)
    steps = [float(t) for t in step_list]
    if not steps:
        raise ValueError("step_list is empty (config key sampling.denoising_step_list)")
    in_range = all(0.0 < t <= num_train_timesteps for t in steps)
    decreasing = all(a > b for a, b in zip(steps, steps[1:], strict=False))
    if not (in_range and decreasing):
        raise ValueError(
            f"step_list must be strictly decreasing values in (0, {num_train_timesteps}], "
            f"got {list(step_list)} (config key sampling.denoising_step_list)"
        )
    if shift_terminal and backbone != "flux2":
        raise ValueError(
            f"shift_terminal={shift_terminal} is only applied to flux2 schedules, not {backbone!r}"
        )
    raw = [t / num_train_timesteps for t in steps]

    if backbone == "sd3" or (backbone == "flux1" and not use_dynamic_shifting):
        sigmas = [static_shift(r, shift) for r in raw]
        if backbone == "sd3":
            sigmas = [round(s, 6) for s in sigmas]
    else:
        if image_seq_len is None:
            raise ValueError(
                f"{backbone} schedules depend on the image token count: pass image_seq_len "
                "(schedules.image_seq_len_for(backbone, resolution_px))"
            )
        if backbone == "flux1":
            mu = flux1_mu(
                image_seq_len,
                base_shift=base_shift,
                max_shift=max_shift,
                base_seq_len=base_seq_len,
                max_seq_len=max_seq_len,
            )
        else:
            mu = flux2_mu(image_seq_len, len(raw))
        sigmas = [time_shift(mu, r, time_shift_type) for r in raw]
        if backbone == "flux2" and shift_terminal:
            stretch = (1.0 - sigmas[-1]) / (1.0 - shift_terminal)
            sigmas = [1.0 - (1.0 - s) / stretch for s in sigmas]
    return sigmas + [0.0]


def schedule_timesteps(sigmas: Sequence[float], num_train_timesteps: int = 1000) -> list[float]:
    """Scheduler timesteps ``N * sigma_i`` for every step of a schedule (the terminal 0.0 excluded)."""
    return [num_train_timesteps * s for s in sigmas[:-1]]


def training_sigmas(
    backbone: str,
    shift: float = 3.0,
    *,
    num_train_timesteps: int = 1000,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ascending 1000-entry training table ``Sigma_train[i] = shift((i+1)/N)`` (spec §1.2).

    SD3 applies the static shift; FLUX (dynamic-shift schedulers) leaves the table unshifted,
    ``Sigma_train[i] = (i+1)/N``. Used by vanilla-DMD renoising and vanilla fake-score flow matching;
    AC-DMD renoising does not use it.

    Returns:
        ``[N]`` tensor of ``dtype`` (float32 like the diffusers scheduler by default).
    """
    _check_backbone(backbone)
    r = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    if backbone == "sd3":
        r = shift * r / (1.0 + (shift - 1.0) * r)
    return r.to(dtype)


def sample_timestep_indices(
    batch_size: int,
    *,
    scheme: str = "uniform",
    min_step: int = 0,
    max_step: int = 999,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Integer indices into the training table (spec §1.2 ``_sample_timesteps``), on the generator's device
    (the CPU without one).

    ``uniform``: integer uniform on ``[min_step, min(max_step, N-1)]``.
    ``logit_normal``: ``u = sigmoid(N(mean, std))``, ``idx = min_step + clamp(floor(u * R), 0, R-1)`` with
    ``R = max_step - min_step + 1`` (``max_step`` also capped at ``N-1`` so indices stay in the table).
    The flow-matching loss weight of both schemes is 1 (diffusers' ``compute_loss_weighting_for_sd3``).

    Returns:
        ``[batch_size]`` int64 tensor.
    """
    hi = min(int(max_step), num_train_timesteps - 1)
    lo = int(min_step)
    if lo < 0 or lo > hi:
        raise ValueError(f"need 0 <= min_step <= max_step, got min_step={min_step}, max_step={max_step}")
    device = generator.device if generator is not None else None
    if scheme == "uniform":
        return torch.randint(lo, hi + 1, (batch_size,), generator=generator, dtype=torch.int64, device=device)
    if scheme == "logit_normal":
        span = hi - lo + 1
        normal = torch.randn(batch_size, generator=generator, dtype=torch.float64, device=device)
        u = torch.sigmoid(normal * logit_std + logit_mean)
        return lo + torch.clamp(torch.floor(u * span).to(torch.int64), 0, span - 1)
    raise ValueError(f"timestep sampling scheme must be 'uniform' or 'logit_normal', got {scheme!r}")


def warmup_constant_lr(step: int, warmup_steps: int) -> float:
    """LR multiplier: linear warm-up ``step / max(warmup, 1)`` for ``step < warmup``, then 1.0."""
    if step < warmup_steps:
        return step / max(warmup_steps, 1)
    return 1.0

"""AC-DMD: the sub-interval renoising, the fake-score loss and the consistency regulariser (spec §2.3-2.5).

Notation: ``s = sigma_s`` is the boundary noise level of the generator's sample ``x_s`` (0 for a clean
sample), ``e = sigma_e > s`` the renoise level. Forward noising from ``s`` to ``e``:
``a = (1-e)/(1-s)``, ``sigma_se = sqrt(max(e^2 - a^2 s^2, 1e-12))``, ``x_e = a x_s + sigma_se xi``. If
``x_s = (1-s) x0 + s eps``, then ``x_e`` has exactly the marginal ``(1-e) x0 + e eps'`` of the flow at ``e``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rtdmd_ray.algorithms.cps import cps_step, predict_x0, randn_like_on
from rtdmd_ray.algorithms.dmd import DMDLoss, clean_normaliser, dmd_loss

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``velocity_fn(x [B, C, H, W], sigma [B]) -> v [B, C, H, W]``: the fake score, conditioning bound."""

TransitionFn = Callable[..., torch.Tensor]
"""``transition(x, v, sigma [B], sigma_next [B], noise) -> x_next``; default: a CPS step with ``eta``."""


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` (or scalar) -> ``[B, 1, ..., 1]`` in ``like``'s dtype and device."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.reshape(1)
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def sample_renoise_sigma(
    sigma_s: torch.Tensor,
    *,
    offset: float = 10.0,
    end_timestep: float = 1000.0,
    min_step: int = 20,
    max_step: int = 980,
    generator: torch.Generator | None = None,
    num_train_timesteps: int = 1000,
    clamp_mode: str = "above_start",
) -> torch.Tensor:
    """Renoise levels ``sigma_e [B]`` float32 for boundary levels ``sigma_s [B]`` (spec §2.3 step 2).

    Returned on ``sigma_s``'s device; the uniform draw happens on ``generator``'s device (a CPU generator is
    fine for CUDA levels). Broadcast the result from one rank, or draw it with a generator seeded identically
    on every rank, to reproduce the cold start, where all ranks share the times.

    ``t_start = N*sigma_s + offset``, ``t_end = end_timestep`` (or ``t_start + 1`` if that is not larger),
    ``t_r ~ Uniform(t_start, t_end)`` continuous, clamped to ``[max(0, min_step), min(max_step, N-1)]``;
    ``sigma_e = t_r / N`` (uniform in sigma-space, no shift). Callers pass ``min_step = max(ac_min_step,
    dmd.min_step)`` and ``max_step = min(ac_max_step, dmd.max_step)``.

    The clamp creates point masses: with ``sigma_s = 0.9`` the interval is [910, 1000] and
    ``P(sigma_e = 0.98) = 20/90``; with ``sigma_s = 0``, ``P(sigma_e = 0.02) = 10/990``.
    ``clamp_mode="reference"`` keeps the reference's clamp, where ``sigma_s > 0.97`` can give
    ``sigma_e < sigma_s`` (then ``e^2 - a^2 s^2 < 0`` and the target explodes, see §7.1 quirk 6).
    ``clamp_mode="above_start"`` (default, ``ac_dmd.renoise_clamp``) raises the upper clamp per sample to
    ``min(t_start, N-1)``, so ``sigma_e >= min(sigma_s + offset/N, (N-1)/N)``; both modes are identical
    whenever ``N*sigma_s + offset <= max_step`` (every shipped schedule).
    """
    s = torch.as_tensor(sigma_s, dtype=torch.float64)
    n = float(num_train_timesteps)
    t_start = n * s.clamp(0.0, 1.0) + offset
    t_end = torch.full_like(t_start, float(end_timestep))
    t_end = torch.where(t_end <= t_start, t_start + 1.0, t_end)
    rng_device = generator.device if generator is not None else t_start.device
    u = torch.rand(t_start.shape, generator=generator, dtype=torch.float64, device=rng_device)
    u = u.to(t_start.device)
    t_r = t_start + u * (t_end - t_start)
    lo = float(max(0, min_step))
    hi = torch.full_like(t_start, float(min(max_step, num_train_timesteps - 1)))
    if clamp_mode == "above_start":
        hi = torch.maximum(hi, torch.clamp(t_start, max=n - 1))
    elif clamp_mode != "reference":
        raise ValueError(
            f"renoise clamp mode must be 'reference' or 'above_start' (config key ac_dmd.renoise_clamp), "
            f"got {clamp_mode!r}"
        )
    t_r = torch.minimum(torch.clamp(t_r, min=lo), hi)
    return (t_r / n).to(torch.float32)


def renoise(
    x_s: torch.Tensor,
    sigma_s: torch.Tensor | float,
    sigma_e: torch.Tensor | float,
    noise: torch.Tensor,
    *,
    move_scale_out: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward-noise ``x_s`` from ``s`` to ``e`` and build the fake-score target (``flow_forward*_v2``, §2.3).

    Args:
        x_s: boundary sample ``[B, C, H, W]`` (may carry grad: the generator update backpropagates
            through it).
        sigma_s, sigma_e: ``[B]`` tensors or floats, ``0 <= s < 1``, normally ``e > s``.
        noise: the fresh ``xi`` ``[B, C, H, W]``.
        move_scale_out: True (shipped): return ``target' = sigma_se * target`` and ``scale = sigma_se``;
            False: the unscaled target ``-x_s/(1-s) + B xi`` with ``B = (e + (1-e) s^2/(1-s)^2)/sigma_se``
            and ``scale = 1``.

    Returns:
        ``(x_e, target, scale)``: ``x_e`` and ``target`` ``[B, C, H, W]``, ``scale`` ``[B, 1, 1, 1]``, in
        float32 (float64 for float64 inputs). The unscaled target is the ``tau``-derivative at ``tau = e``
        of the conditional path ``a(tau) x_s + sigma_se(tau) xi``; at ``s = 0`` it is ordinary flow
        matching, ``xi - x_s``.
    """
    # float32 at least (bf16 latents are up-cast); float64 inputs stay float64 for exact checks
    compute_dtype = torch.promote_types(x_s.dtype, torch.float32)
    x32, xi = x_s.to(compute_dtype), noise.to(compute_dtype)
    s, e = _bcast(sigma_s, x32), _bcast(sigma_e, x32)
    a = (1.0 - e) / (1.0 - s)
    sigma_se = torch.sqrt(torch.clamp(e**2 - a**2 * s**2, min=1e-12))
    x_e = a * x32 + sigma_se * xi
    noise_coeff = e + (1.0 - e) * s**2 / (1.0 - s) ** 2  # d sigma_se^2 / (2 d tau) at tau = e
    if move_scale_out:
        target = (-sigma_se / (1.0 - s)) * x32 + noise_coeff * xi
        scale = sigma_se
    else:
        target = (-1.0 / (1.0 - s)) * x32 + (noise_coeff / sigma_se) * xi
        scale = torch.ones_like(sigma_se)
    batch = x32.shape[0]
    return x_e, target, scale.expand(batch, *scale.shape[1:])


def x0_target(
    x_e: torch.Tensor,
    x0: torch.Tensor,
    sigma_e: torch.Tensor | float,
    scale: torch.Tensor,
    *,
    move_scale_out: bool = True,
) -> torch.Tensor:
    """Low-variance fake-score target ``eps - x0``, ``eps = (x_e - (1 - e) x0) / e`` (``ac_dmd.fake_target``).

    ``x0`` is the generator's clean prediction at its last executed step, so ``x_s = (1-s) x0 + s eps_1`` with
    ``eps_1`` the CPS noise of that step and ``x_e = (1-e) x0 + e eps``: ordinary flow matching on ``x0``
    renoised through ``x_s``. Its conditional mean given ``x_e`` is the path target's (``renoise``) when
    ``eps_1`` is independent of ``x0``, which the CPS step makes true up to its ``cos(eta pi/2)`` share of
    predicted noise (0.16 at eta 0.9); its variance does not grow like ``(s/(1-s))^2`` near the boundary (the
    path target's squared error is ~140 at ``s = 0.9`` on ShapeWorld, ~0.1 at ``s = 0``). At ``s = 0`` both
    targets are ``xi - x0`` exactly.

    Args:
        x_e: renoised sample ``[B, C, H, W]`` from ``renoise``; ``x0``: same shape; ``sigma_e``: ``[B]``.
        scale: ``renoise``'s scale, multiplied in when ``move_scale_out`` (the shipped target form).

    Returns:
        ``[B, C, H, W]`` target in the form ``fake_score_loss`` expects.
    """
    compute_dtype = torch.promote_types(x_e.dtype, torch.float32)
    xe, x0c = x_e.to(compute_dtype), x0.detach().to(compute_dtype)
    e = _bcast(sigma_e, xe)
    target = (xe - (1.0 - e) * x0c) / e - x0c
    return scale.to(compute_dtype) * target if move_scale_out else target


def generator_dmd_loss(
    x_s: torch.Tensor,
    x0_gen: torch.Tensor,
    sigma_s: float,
    sigma_e: torch.Tensor,
    xi: torch.Tensor,
    zeta: torch.Tensor,
    teacher_v: Callable[[torch.Tensor], torch.Tensor],
    fake_v: Callable[[torch.Tensor], torch.Tensor],
    *,
    eta: float,
    move_scale_out: bool = True,
    normalize: bool = True,
    normalization: str = "reference",
) -> DMDLoss:
    """The AC-DMD generator loss (spec §2.6 steps 3-5; the RL aux loss uses it too).

    Renoise ``x_s`` to ``x_e`` with ``xi``, project back to ``sigma_s`` with the teacher's and the fake
    score's velocities at ``(x_e, sigma_e)`` (CPS, ``eta``, the one transition noise ``zeta`` shared), then
    ``dmd_loss(x_s, x_fake, x_real)``. ``normalization="clean"`` divides by ``clean_normaliser(x0_gen,
    x0_teacher, sigma_s)`` instead of the reference's ``mean|x_s - y_real|`` (docs/design.md, 7.1.12).

    Args:
        x_s: the generator's boundary sample ``[B, C, H, W]`` (with grad).
        x0_gen: the x0-prediction of the step that produced ``x_s`` (read by "clean" only).
        teacher_v, fake_v: ``x_e -> v`` at ``sigma_e``, conditioning (and the teacher's CFG) bound.
    """
    with torch.no_grad():
        x_e, _, _ = renoise(x_s.detach(), sigma_s, sigma_e, xi, move_scale_out=move_scale_out)
        v_real = teacher_v(x_e)
        x_real = cps_step(x_e, v_real, sigma_e, sigma_s, eta, noise=zeta).sample
        x_fake = cps_step(x_e, fake_v(x_e), sigma_e, sigma_s, eta, noise=zeta).sample
        norm_diff = None
        if normalization == "clean":
            norm_diff = clean_normaliser(x0_gen, predict_x0(x_e, v_real, sigma_e), sigma_s)
    return dmd_loss(x_s, x_fake, x_real, normalize=normalize, norm_diff=norm_diff)


def fake_score_weight(scale: torch.Tensor, w_min: float = 0.0, w_max: float = 10.0) -> torch.Tensor:
    """Per-sample loss weight ``clamp(1 / max(scale^2, 1e-12), w_min, w_max)``, NaN/inf mapped into range."""
    w = 1.0 / torch.clamp(scale.float() ** 2, min=1e-12)
    w = torch.clamp(w, min=w_min, max=w_max)
    return torch.nan_to_num(w, nan=0.0, posinf=w_max, neginf=w_min)


def fake_score_loss(
    v: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor,
    w_min: float = 0.0,
    w_max: float = 10.0,
    move_scale_out: bool = True,
) -> torch.Tensor:
    """AC-DMD fake-score loss ``mean_{B,C,H,W}[ w * (scale * v - target)^2 ]`` in float32 (spec §2.4).

    With ``move_scale_out`` this is ``min(1, w_max * sigma_se^2) * (v - target_unscaled)^2``: plain velocity
    matching, down-weighted where ``sigma_se`` is small (the unscaled target explodes there). Without it,
    ``scale = 1`` and the weight is 1. NaN/inf in the result are zeroed like the reference.

    Args:
        v: fake-score velocity at ``(x_e, sigma_e)`` ``[B, C, H, W]`` (with grad).
        target, scale: from ``renoise`` with the same ``move_scale_out``.

    Returns:
        Scalar float32 loss.
    """
    scale32 = scale.float()
    w = fake_score_weight(scale32, w_min, w_max) if move_scale_out else torch.ones_like(scale32)
    loss = (w * (scale32 * v.float() - target.float()) ** 2).mean()
    return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)


def draw_jump_steps(
    batch_size: int,
    num_steps: int,
    epsilon_timestep: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Backward-jump sizes ``delta ~ UniformInt{1..Delta}``, ``Delta = max(1, round(epsilon_timestep))``.

    Returns:
        ``[num_steps, batch_size]`` int64 (draw it on one rank and broadcast it to reproduce the cold start).
    """
    delta_max = max(1, round(epsilon_timestep))
    device = generator.device if generator is not None else None
    shape = (num_steps, batch_size)
    return torch.randint(1, delta_max + 1, shape, generator=generator, dtype=torch.int64, device=device)


def consistency_loss(
    velocity_fn: VelocityFn,
    x_e: torch.Tensor,
    sigma_e: torch.Tensor,
    v_e: torch.Tensor,
    *,
    eta: float,
    epsilon_timestep: float = 200.0,
    num_steps: int = 1,
    two_sample: bool = True,
    stopgrad_transitions: bool = True,
    jump_steps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    transition: TransitionFn | None = None,
    batch_paths: bool = True,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Martingale regulariser on the fake score's x0-prediction ``h(x, tau) = x - sigma_tau * v_fake(x,
    tau)``.

    Anchor ``h_A = x_e - sigma_e * v_e`` (with grad). Then ``num_steps`` backward jumps ``t' = max(t - delta,
    0)`` (``t = N * sigma``, ``delta`` shared by both paths) with a transition (CPS, ``eta``) along the fake
    score's own reverse process; the first jump reuses ``v_e``, later ones call ``velocity_fn``. Two-sample
    unbiased estimator (shipped): two paths from the same ``x_e`` with independent transition noise,

        L = mean_B mean_CHW[ (h(x'_1, t') - h_A) * (h(x'_2, t') - h_A) ],

    an unbiased estimate of ``|| E[h(x', t') | x_e] - h(x_e, t) ||^2`` (it can be negative per batch).
    One-sample: ``mean (h(x'_1, t') - h_A)^2``, which adds the variance of ``h(x')``. With ``eta = 0`` the
    paths coincide and both estimators are the one-sample MSE.

    Args:
        velocity_fn: ``v_fake(x [B, C, H, W], sigma [B])`` with the conditioning bound; called on each path
            (with grad for the end evaluations, under no-grad for transitions if ``stopgrad_transitions``).
        x_e: renoised sample ``[B, C, H, W]``; ``sigma_e``: ``[B]``; ``v_e``: the fake velocity at
            ``(x_e, sigma_e)``, the same prediction used in the AC loss (with grad).
        eta: transition stochasticity (``ac_dmd.transition_eta``; the reference's ``dmd.cps_eta``).
        epsilon_timestep: ``Delta`` of the jump sizes, in timestep units (200 = 0.2 in sigma).
        jump_steps: optional precomputed ``[num_steps, B]`` jumps (``draw_jump_steps``), e.g. broadcast
            from rank 0.
        stopgrad_transitions: build the paths under no-grad (shipped); gradient then flows only through
            ``h_A`` and the two end evaluations.
        transition: override of the transition ``(x, v, sigma, sigma_next, noise) -> x_next``.
        batch_paths: evaluate both paths' ends in one ``velocity_fn`` call on the concatenated ``[2B]``
            batch (one forward with grad instead of two; per-sample models give the same values).

    Returns:
        Scalar float32 loss; NaN/inf are zeroed.
    """
    if num_steps < 1:
        raise ValueError(
            f"consistency num_steps must be >= 1 (config key ac_dmd.consistency_num_steps), got {num_steps}"
        )
    batch = x_e.shape[0]
    n = float(num_train_timesteps)
    if jump_steps is None:
        jump_steps = draw_jump_steps(batch, num_steps, epsilon_timestep, generator)
    if tuple(jump_steps.shape) != (num_steps, batch):
        raise ValueError(
            f"jump_steps must be [num_steps={num_steps}, B={batch}], got {tuple(jump_steps.shape)}"
        )

    def _default_transition(x, v, sig, sig_next, noise):
        return cps_step(x, v, sig, sig_next, eta, noise=noise).sample

    step_fn = transition or _default_transition
    sig0 = torch.as_tensor(sigma_e, dtype=torch.float32, device=x_e.device).reshape(batch)
    h_anchor = x_e.float() - _bcast(sig0, x_e.float()) * v_e.float()

    # The t' sequence is shared by both paths; timesteps stay continuous like the reference.
    t_seq = [n * sig0]
    for k in range(num_steps):
        t_seq.append(
            torch.clamp(t_seq[-1] - jump_steps[k].to(device=x_e.device, dtype=torch.float32), min=0.0)
        )
    sig_seq = [sig0] + [t / n for t in t_seq[1:]]

    num_paths = 2 if two_sample else 1
    paths = []
    grad_ctx = torch.no_grad if stopgrad_transitions else torch.enable_grad
    for _ in range(num_paths):
        x = x_e.detach() if stopgrad_transitions else x_e
        v = v_e.detach() if stopgrad_transitions else v_e
        with grad_ctx():
            for k in range(num_steps):
                if k > 0:
                    v = velocity_fn(x, sig_seq[k])
                noise = randn_like_on(x, generator)
                x = step_fn(x, v, sig_seq[k], sig_seq[k + 1], noise)
        paths.append(x)

    def h(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        return x.float() - _bcast(sig, x.float()) * velocity_fn(x, sig).float()

    sig_end = sig_seq[-1]
    if num_paths == 2 and batch_paths:
        ends = list(h(torch.cat(paths), torch.cat([sig_end, sig_end])).chunk(2))
    else:
        ends = [h(x, sig_end) for x in paths]

    if two_sample:
        per_elem = (ends[0] - h_anchor) * (ends[1] - h_anchor)
    else:
        per_elem = (ends[0] - h_anchor) ** 2
    return torch.nan_to_num(per_elem.mean(), nan=0.0, posinf=0.0, neginf=0.0)

"""Spec algorithms.md §6 invariants 12-16 (AC-DMD sub-interval), renoise-time sampling, fake-score loss,
and the consistency regulariser (unbiasedness by Monte Carlo on an affine fake score)."""

from __future__ import annotations

import math

import pytest
import torch

from rtdmd_ray.algorithms import acdmd, cps, schedules

torch.set_num_threads(1)

ONE, ZERO = torch.ones(1, 1, 2, 2, dtype=torch.float64), torch.zeros(1, 1, 2, 2, dtype=torch.float64)


def _coefficients(s: float, e: float, move_scale_out: bool):
    """(x_e coefficients on x_s and xi, target coefficients on x_s and xi, scale) read off by probing."""
    xe_x, tgt_x, scale = acdmd.renoise(ONE, s, e, ZERO, move_scale_out=move_scale_out)
    xe_n, tgt_n, _ = acdmd.renoise(ZERO, s, e, ONE, move_scale_out=move_scale_out)
    return (
        xe_x.flatten()[0].item(),
        xe_n.flatten()[0].item(),
        tgt_x.flatten()[0].item(),
        tgt_n.flatten()[0].item(),
        scale.flatten()[0].item(),
    )


def test_inv12_subinterval_s05_e075():
    a, sig_se, tx, tn, scale = _coefficients(0.5, 0.75, move_scale_out=False)
    assert a == pytest.approx(0.5) and sig_se == pytest.approx(0.707107, abs=1e-6)
    assert tx == pytest.approx(-2.0) and tn == pytest.approx(1.414214, abs=1e-6) and scale == 1.0
    _, _, tx, tn, scale = _coefficients(0.5, 0.75, move_scale_out=True)
    assert scale == pytest.approx(0.707107, abs=1e-6)
    assert tx == pytest.approx(-1.414214, abs=1e-6) and tn == pytest.approx(1.0, abs=1e-12)
    assert acdmd.fake_score_weight(torch.tensor(scale)).item() == pytest.approx(2.0, rel=1e-6)


def test_inv13_subinterval_from_clean_sample_is_flow_matching():
    a, sig_se, tx, tn, _ = _coefficients(0.0, 0.6, move_scale_out=False)
    assert (a, sig_se, tx, tn) == pytest.approx((0.4, 0.6, -1.0, 1.0))
    _, _, tx, tn, scale = _coefficients(0.0, 0.6, move_scale_out=True)
    assert (tx, tn, scale) == pytest.approx((-0.6, 0.6, 0.6))
    assert acdmd.fake_score_weight(torch.tensor(0.6)).item() == pytest.approx(2.7778, abs=1e-4)
    # effective weight on (v - unscaled target)^2 is min(1, 10 * 0.36) = 1: plain flow matching
    g = torch.Generator().manual_seed(0)
    x_s, xi, v = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    _, target, scale = acdmd.renoise(x_s, torch.zeros(3), torch.full((3,), 0.6), xi)
    loss = acdmd.fake_score_loss(v, target, scale)
    assert loss.item() == pytest.approx(((v - (xi - x_s)) ** 2).mean().item(), rel=1e-5)


def test_inv14_subinterval_near_boundary_blows_up_unscaled():
    _, sig_se, _, tn, _ = _coefficients(0.9, 0.91, move_scale_out=False)
    assert sig_se == pytest.approx(0.414729, abs=1e-6)
    assert tn == pytest.approx(19.772, abs=1e-3)
    _, _, _, _, scale = _coefficients(0.9, 0.91, move_scale_out=True)
    assert acdmd.fake_score_weight(torch.tensor(scale)).item() == pytest.approx(5.8140, abs=1e-4)


@pytest.mark.parametrize(("s", "e"), [(0.5, 0.75), (0.0, 0.6), (0.9, 0.91), (0.25, 0.9)])
def test_inv15_target_is_the_time_derivative_of_the_conditional_path(s, e):
    h = 1e-6
    g = torch.Generator().manual_seed(1)
    x_s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    xi = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    plus, _, _ = acdmd.renoise(x_s, s, e + h, xi)
    minus, _, _ = acdmd.renoise(x_s, s, e - h, xi)
    fd = (plus - minus) / (2 * h)
    _, target, _ = acdmd.renoise(x_s, s, e, xi, move_scale_out=False)
    assert target.dtype == torch.float64
    assert torch.allclose(target, fd, atol=1e-8 * max(1.0, fd.abs().max().item()))
    if (s, e) == (0.5, 0.75):  # d sigma_se / d tau = 1.414214
        n_plus = acdmd.renoise(ZERO, s, e + h, ONE)[0]  # x_s = 0, xi = 1: x_e = sigma_se
        n_minus = acdmd.renoise(ZERO, s, e - h, ONE)[0]
        assert ((n_plus - n_minus) / (2 * h)).flatten()[0].item() == pytest.approx(1.414214, abs=1e-6)
    # moved-out target = sigma_se * unscaled target
    _, moved, scale = acdmd.renoise(x_s, s, e, xi, move_scale_out=True)
    assert torch.allclose(moved, scale * target, atol=1e-10)


@pytest.mark.parametrize(("s", "e"), [(0.5, 0.75), (0.9, 0.95), (0.0, 0.3)])
def test_inv16_renoised_marginal_has_variance_e_squared(s, e):
    g = torch.Generator().manual_seed(2)
    x0, eps1, xi = (torch.randn(4, 4, 64, 64, generator=g) for _ in range(3))
    x_s = (1 - s) * x0 + s * eps1
    x_e, _, _ = acdmd.renoise(x_s, s, e, xi)
    residual = x_e - (1 - e) * x0
    assert residual.var().item() == pytest.approx(e**2, rel=0.01)
    assert residual.mean().item() == pytest.approx(0.0, abs=0.01)


def test_renoise_keeps_the_generator_gradient_and_bf16_is_upcast():
    x_s = torch.randn(2, 2, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    x_e, target, scale = acdmd.renoise(
        x_s, torch.tensor([0.5, 0.0]), torch.tensor([0.75, 0.6]), torch.randn(2, 2, 3, 3)
    )
    assert x_e.dtype == torch.float32 and scale.shape == (2, 1, 1, 1)
    x_e.sum().backward()
    a = torch.tensor([0.5, 0.4]).view(2, 1, 1, 1).expand(2, 2, 3, 3)
    assert torch.allclose(x_s.grad.float(), a, rtol=1e-2)  # grads come back in bf16


def test_renoise_sigma_point_masses_and_range():
    n = 200_000
    g = torch.Generator().manual_seed(3)
    e = acdmd.sample_renoise_sigma(torch.full((n,), 0.9), generator=g)
    assert e.dtype == torch.float32
    assert e.min().item() >= 0.91 - 1e-6 and e.max().item() == pytest.approx(0.98)
    assert (e == e.max()).double().mean().item() == pytest.approx(20 / 90, abs=0.005)
    e0 = acdmd.sample_renoise_sigma(torch.zeros(n), generator=g)
    assert e0.min().item() == pytest.approx(0.02) and e0.max().item() == pytest.approx(0.98)
    assert (e0 == e0.min()).double().mean().item() == pytest.approx(10 / 990, abs=0.0015)
    assert (e0 == e0.max()).double().mean().item() == pytest.approx(20 / 990, abs=0.002)
    # continuous in between: uniform on [0.02, 0.98] apart from the masses
    inner = e0[(e0 > 0.021) & (e0 < 0.979)]
    assert inner.mean().item() == pytest.approx(0.5, abs=0.005)


def test_renoise_sigma_quirk6_reference_clamp_vs_above_start():
    g = torch.Generator().manual_seed(4)
    s = torch.full((1000,), 0.985)
    ref = acdmd.sample_renoise_sigma(s, generator=g, clamp_mode="reference")
    assert torch.all(ref < s)  # the reference clamp puts sigma_e BELOW sigma_s here
    fixed = acdmd.sample_renoise_sigma(s, generator=g)  # default: above_start
    assert torch.all(fixed > s) and torch.allclose(fixed, torch.full_like(fixed, 0.995))
    # both modes agree wherever the interval is below max_step
    low = torch.rand(1000, generator=torch.Generator().manual_seed(5)) * 0.9
    a = acdmd.sample_renoise_sigma(low, generator=torch.Generator().manual_seed(6), clamp_mode="reference")
    b = acdmd.sample_renoise_sigma(low, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    # every boundary of every shipped schedule (training and inference resolutions) is unaffected
    boundaries = []
    for backbone in ("sd3", "flux1", "flux2"):
        for px in (512, 1024):
            seq = schedules.image_seq_len_for(backbone, px)
            boundaries += schedules.sigma_schedule(backbone, image_seq_len=seq)[1:]
    bnd = torch.tensor(boundaries).repeat(50)
    a = acdmd.sample_renoise_sigma(bnd, generator=torch.Generator().manual_seed(7), clamp_mode="reference")
    b = acdmd.sample_renoise_sigma(bnd, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.all(a > bnd)
    with pytest.raises(ValueError, match="renoise_clamp"):
        acdmd.sample_renoise_sigma(low, clamp_mode="none")


def test_fake_score_loss_weights_and_nan_handling():
    g = torch.Generator().manual_seed(7)
    v, target = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    scale = torch.tensor([0.2, 0.5]).view(2, 1, 1, 1)
    w = torch.tensor([10.0, 4.0]).view(2, 1, 1, 1)  # clamp(1/0.04) = 10, 1/0.25 = 4
    expected = (w * (scale * v - target) ** 2).mean()
    assert acdmd.fake_score_loss(v, target, scale).item() == pytest.approx(expected.item(), rel=1e-6)
    # move_scale_out=False: weight 1 whatever the scale
    ones = torch.ones(2, 1, 1, 1)
    unscaled = acdmd.fake_score_loss(v, target, ones, move_scale_out=False)
    assert unscaled.item() == pytest.approx(((v - target) ** 2).mean().item(), rel=1e-6)
    nan_v = v.clone()
    nan_v[0, 0, 0, 0] = float("nan")
    assert acdmd.fake_score_loss(nan_v, target, scale).item() == 0.0
    assert acdmd.fake_score_weight(torch.tensor([0.0])).item() == 10.0


# ------------------------------------------------------------------------------------ consistency (§2.5)
C_SLOPE, C_BIAS = 0.3, 0.1


def _affine_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """An affine fake score: h(x, s) = x - s * v(x) is affine in x, so E[h(x')] = h(E[x'])."""
    return C_SLOPE * x + C_BIAS


def test_consistency_two_sample_is_unbiased_and_one_sample_adds_variance():
    g = torch.Generator().manual_seed(8)
    rows = 4000  # identical rows: the batch mean is a Monte-Carlo average over independent path pairs
    x_e = torch.randn(1, 2, 4, 4, generator=g).expand(rows, -1, -1, -1).contiguous()
    sigma_e = torch.full((rows,), 0.6)
    v_e = _affine_velocity(x_e, sigma_e)
    jumps = torch.full((1, rows), 150, dtype=torch.int64)  # sigma' = 0.45
    s_end = 0.45
    two = acdmd.consistency_loss(
        _affine_velocity, x_e, sigma_e, v_e, eta=0.9, jump_steps=jumps, generator=g, two_sample=True
    )
    one = acdmd.consistency_loss(
        _affine_velocity, x_e, sigma_e, v_e, eta=0.9, jump_steps=jumps, generator=g, two_sample=False
    )
    # analytic: E[x'] is the CPS mean, and h is affine
    mean = cps.cps_step(x_e[:1], v_e[:1], 0.6, s_end, 0.9, noise=torch.zeros_like(x_e[:1])).sample
    h_mean = mean - s_end * _affine_velocity(mean, None)
    h_anchor = x_e[:1] - 0.6 * v_e[:1]
    target = ((h_mean - h_anchor) ** 2).mean().item()
    rho = s_end * math.sin(0.45 * math.pi)
    variance = ((1 - s_end * C_SLOPE) * rho) ** 2
    # std error of an average of rows * CHW independent products (m + n1)(m + n2): var = 2 m^2 s^2 + s^4
    draws = rows * x_e[0].numel()
    se = math.sqrt(2 * target * variance + variance**2) / math.sqrt(draws)
    assert two.item() == pytest.approx(target, abs=6 * se)
    assert one.item() == pytest.approx(target + variance, abs=6 * math.sqrt(2) * se)
    assert one.item() > two.item()


def test_consistency_eta0_collapses_to_one_sample_and_gradient_flows_through_h_only():
    w = torch.nn.Parameter(torch.tensor(0.3))
    calls = {"grad": [], "nograd": []}

    def velocity(x, sigma):
        calls["grad" if torch.is_grad_enabled() else "nograd"].append(1)
        return w * x

    g = torch.Generator().manual_seed(9)
    x_e = torch.randn(3, 2, 4, 4, generator=g)
    sigma_e = torch.tensor([0.9, 0.5, 0.05])  # the last one jumps to t' = max(50 - 100, 0) = 0
    jumps = torch.full((1, 3), 100, dtype=torch.int64)
    v_e = velocity(x_e, sigma_e)
    two = acdmd.consistency_loss(velocity, x_e, sigma_e, v_e, eta=0.0, jump_steps=jumps)
    one = acdmd.consistency_loss(velocity, x_e, sigma_e, v_e, eta=0.0, jump_steps=jumps, two_sample=False)
    assert torch.allclose(two, one, rtol=1e-6)
    two.backward()
    assert w.grad is not None and w.grad.abs().item() > 0
    # one-step paths reuse v_e: only the end evaluations call the model, with grad
    # v_e; both ends of the two-sample call in one batched forward; the one-sample end
    assert len(calls["nograd"]) == 0 and len(calls["grad"]) == 1 + 1 + 1


def test_consistency_multi_step_calls_the_model_under_no_grad_for_transitions():
    calls = {"grad": 0, "nograd": 0}
    seen_sigmas = []

    def velocity(x, sigma):
        calls["grad" if torch.is_grad_enabled() else "nograd"] += 1
        seen_sigmas.append(sigma.clone())
        return 0.5 * x

    x_e = torch.randn(2, 1, 3, 3)
    sigma_e = torch.tensor([0.8, 0.3])
    jumps = torch.tensor([[100, 50], [200, 100]])
    loss = acdmd.consistency_loss(
        velocity,
        x_e,
        sigma_e,
        0.5 * x_e,
        eta=0.9,
        num_steps=2,
        jump_steps=jumps,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(loss)
    assert calls == {"grad": 1, "nograd": 2}  # 1 transition call per path + 1 batched end evaluation
    assert torch.allclose(seen_sigmas[0], torch.tensor([0.7, 0.25]))  # after the first jump
    assert torch.equal(seen_sigmas[1], seen_sigmas[0])  # both paths share the jump sequence
    assert torch.allclose(seen_sigmas[2], torch.tensor([0.5, 0.15, 0.5, 0.15]))  # end level, [2B]


def test_consistency_batched_and_separate_end_evaluations_agree():
    w = torch.nn.Parameter(torch.tensor(0.4))

    def velocity(x, sigma):
        return w * x + sigma.view(-1, 1, 1, 1)

    x_e = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma_e = torch.tensor([0.9, 0.6, 0.3])
    jumps = torch.tensor([[120, 80], [50, 30], [200, 10]]).T.contiguous()
    losses, grads = [], []
    for batch_paths in (True, False):
        w.grad = None
        loss = acdmd.consistency_loss(
            velocity,
            x_e,
            sigma_e,
            velocity(x_e, sigma_e),
            eta=0.9,
            num_steps=2,
            jump_steps=jumps,
            generator=torch.Generator().manual_seed(2),
            batch_paths=batch_paths,
        )
        loss.backward()
        losses.append(loss.item())
        grads.append(w.grad.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and grads[0] == pytest.approx(grads[1], rel=1e-6)


def test_consistency_custom_transition_and_nan_guard():
    seen = []

    def transition(x, v, sig, sig_next, noise):
        seen.append(torch.is_grad_enabled())
        return x - (sig - sig_next).view(-1, 1, 1, 1) * v

    def nan_velocity(x, sigma):
        return torch.full_like(x, float("nan"))

    x_e = torch.randn(2, 1, 3, 3)
    loss = acdmd.consistency_loss(
        nan_velocity, x_e, torch.tensor([0.5, 0.5]), torch.zeros_like(x_e), eta=0.9, transition=transition
    )
    assert loss.item() == 0.0 and seen == [False, False]
    with pytest.raises(ValueError, match="jump_steps"):
        acdmd.consistency_loss(
            nan_velocity,
            x_e,
            torch.tensor([0.5, 0.5]),
            x_e,
            eta=0.9,
            jump_steps=torch.ones(2, 2, dtype=torch.int64),
        )


def test_draw_jump_steps_range():
    d = acdmd.draw_jump_steps(5000, 2, 200.0, torch.Generator().manual_seed(0))
    assert d.shape == (2, 5000) and d.min().item() == 1 and d.max().item() == 200
    assert acdmd.draw_jump_steps(10, 1, 0.0).max().item() == 1  # Delta = max(1, round(eps))


def test_x0_target_is_flow_matching_at_a_clean_boundary_and_the_path_target_in_the_mean_above_it():
    g = torch.Generator().manual_seed(7)
    x0, xi = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    e = torch.tensor([0.3, 0.6, 0.9])
    x_e, path, scale = acdmd.renoise(x0, 0.0, e, xi)
    assert torch.allclose(acdmd.x0_target(x_e, x0, e, scale), path, atol=1e-6)
    _, path_u, one = acdmd.renoise(x0, 0.0, e, xi, move_scale_out=False)
    assert torch.allclose(acdmd.x0_target(x_e, x0, e, one, move_scale_out=False), path_u, atol=1e-5)

    # 1-D, two-point data x0 = +-1, s -> e: binned by x_e, both targets have the same conditional mean (the
    # marginal velocity); the x0 target's variance stays ~2 (ordinary flow matching) while the path
    # target's grows like (s / (1 - s))^2 (3.7 at s = 0.5, 118 at s = 0.9)
    n = 400_000
    for s, e, path_var in ((0.5, 0.8, 3.0), (0.75, 0.85, 15.0)):
        x0 = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        x_s = (1 - s) * x0 + s * torch.randn(n, generator=g)
        sig_s, sig_e = torch.full((n,), s), torch.full((n,), e)
        x_e, path, scale = acdmd.renoise(x_s, sig_s, sig_e, torch.randn(n, generator=g), move_scale_out=False)
        tx0 = acdmd.x0_target(x_e, x0, sig_e, scale, move_scale_out=False)
        bins = torch.bucketize(x_e, torch.linspace(-1.5, 1.5, 13))
        for b in range(1, 13):
            m = bins == b
            assert m.sum() > 5_000
            assert path[m].mean().item() == pytest.approx(tx0[m].mean().item(), abs=0.1)
        assert tx0.var().item() == pytest.approx(2.0, abs=0.05) and path.var().item() > path_var

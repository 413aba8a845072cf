"""Spec algorithms.md §6 invariants 17-18 (the normalised DMD loss) plus a gradient check."""

from __future__ import annotations

import pytest
import torch

from rtdmd_ray.algorithms import dmd

torch.set_num_threads(1)


def test_inv17_dmd_loss_worked_example_and_normalisation():
    shape = (2, 3, 4, 4)
    numel = 2 * 3 * 4 * 4
    x = torch.zeros(shape, requires_grad=True)
    out = dmd.dmd_loss(x, y_fake=torch.zeros(shape), y_real=-torch.ones(shape))
    assert out.loss.item() == pytest.approx(0.5)
    assert out.grad_norm.item() == pytest.approx(numel**0.5)  # ||g|| with g = 1 everywhere
    out.loss.backward()
    assert torch.allclose(x.grad, torch.full(shape, 1.0 / numel))
    # doubling y_real: normalised g stays 1, unnormalised g = 2
    doubled = dmd.dmd_loss(torch.zeros(shape), torch.zeros(shape), -2 * torch.ones(shape))
    assert doubled.loss.item() == pytest.approx(0.5)
    raw = dmd.dmd_loss(torch.zeros(shape), torch.zeros(shape), -2 * torch.ones(shape), normalize=False)
    assert raw.loss.item() == pytest.approx(2.0) and raw.grad_norm.item() == pytest.approx(2 * numel**0.5)


def test_inv18_equal_projections_give_zero_gradient_and_nan_maps_to_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    y = torch.randn(2, 3, 4, 4, generator=g)
    out = dmd.dmd_loss(x, y, y.clone())
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    # p_real == 0 for sample 0 (x == y_real == y_fake): 0/0 -> NaN -> 0; sample 1 is untouched
    x2 = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    y_real = x2.detach().clone()
    y_real[1] -= 1.0
    y_fake = y_real.clone()
    y_fake[1] += 0.5
    out = dmd.dmd_loss(x2, y_fake, y_real)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.equal(x2.grad[0], torch.zeros_like(x2.grad[0]))
    assert torch.allclose(x2.grad[1], torch.full_like(x2.grad[1], 0.5 / x2.numel()))


def test_dmd_gradient_is_g_over_numel_and_points_to_the_teacher():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 5, 5, generator=g, requires_grad=True)
    y_fake, y_real = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    out = dmd.dmd_loss(x, y_fake, y_real)
    out.loss.backward()
    norm = (x.detach() - y_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    g_expected = (y_fake - y_real) / norm
    assert torch.allclose(x.grad, g_expected / x.numel(), rtol=1e-5, atol=1e-9)
    assert out.loss.item() == pytest.approx(0.5 * (g_expected**2).mean().item(), rel=1e-5)
    # a small descent step moves x toward y_real - y_fake
    step = -x.grad
    assert (step * (y_real - y_fake)).sum().item() > 0


def test_dmd_loss_is_float64_inside_with_bf16_inputs():
    x = torch.randn(2, 4, 8, 8).to(torch.bfloat16).requires_grad_()
    y_fake, y_real = torch.randn(2, 4, 8, 8).bfloat16(), torch.randn(2, 4, 8, 8).bfloat16()
    out = dmd.dmd_loss(x, y_fake, y_real)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert x.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="shapes differ"):
        dmd.dmd_loss(x, y_fake[:1], y_real)


def test_norm_diff_replaces_the_reference_normaliser():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    y_fake, y_real = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    diff = torch.randn(3, 2, 4, 4, generator=g)
    out = dmd.dmd_loss(x, y_fake, y_real, norm_diff=diff)
    out.loss.backward()
    expected = (y_fake - y_real) / diff.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(x.grad, expected / x.numel(), rtol=1e-5, atol=1e-9)
    # norm_diff = x - y_real is the reference exactly
    same = dmd.dmd_loss(x.detach(), y_fake, y_real, norm_diff=x.detach() - y_real)
    assert same.loss.item() == pytest.approx(dmd.dmd_loss(x.detach(), y_fake, y_real).loss.item(), rel=1e-12)
    with pytest.raises(ValueError, match="norm_diff"):
        dmd.dmd_loss(x, y_fake, y_real, norm_diff=diff[:1])


def test_clean_normaliser_equals_the_reference_at_a_clean_boundary_and_drops_the_noise_above():
    """sigma_s = 0: x_s = x0_gen, y_real = x0_real, so both normalisers agree. sigma_s = 0.9: the
    reference's x_s - y_real is dominated by two independent CPS noises; the clean one is
    (1 - s)|x0_gen - x0_real|."""
    from rtdmd_ray.algorithms.cps import cps_step

    g = torch.Generator().manual_seed(3)
    x0_gen, x0_real = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    clean = dmd.clean_normaliser(x0_gen, x0_real, torch.zeros(4))
    assert torch.equal(clean, x0_gen - x0_real)
    s = 0.9
    x_s = (1 - s) * x0_gen + s * torch.randn(4, 3, 8, 8, generator=g)
    v_real = torch.randn(4, 3, 8, 8, generator=g)
    x_e = torch.randn(4, 3, 8, 8, generator=g)
    y_real = cps_step(x_e, v_real, 0.95, s, 0.9, noise=torch.randn(4, 3, 8, 8, generator=g)).sample
    ref = (x_s - y_real).abs().mean()
    clean = dmd.clean_normaliser(x0_gen, x0_real, torch.full((4,), s)).abs().mean()
    assert clean.item() == pytest.approx(0.1 * (x0_gen - x0_real).abs().mean().item(), rel=1e-6)
    assert ref.item() > 5 * clean.item()
    assert dmd.clean_normaliser(x0_gen, x0_real, 0.5).shape == x0_gen.shape

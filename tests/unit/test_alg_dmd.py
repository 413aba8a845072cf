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

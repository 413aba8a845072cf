"""Spec algorithms.md §6 invariants 5-11 (the CPS step and its log-probability), plus the SDE variant."""

from __future__ import annotations

import math

import pytest
import torch

from rtdmd_ray.algorithms import cps, grpo

torch.set_num_threads(1)

X = torch.tensor([[0.5, -1.0]])
V = torch.tensor([[0.2, 0.4]])
XI = torch.tensor([[1.0, -1.0]])


def test_inv05_eta0_is_euler_worked_example():
    out = cps.cps_step(X, V, 0.9, 0.75, 0.0)
    assert torch.allclose(out.sample, torch.tensor([[0.47, -1.06]]), atol=1e-6)
    assert torch.equal(out.sample, cps.euler_step(X, V, 0.9, 0.75))
    assert out.std.item() == 0.0 and out.log_prob.item() == 0.0


def test_inv05_stochastic_formula_with_eta0_equals_euler_for_any_inputs():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    s = torch.rand(4, generator=g) * 0.9 + 0.1
    s_next = s * torch.rand(4, generator=g)
    sb, snb = s.view(-1, 1, 1, 1), s_next.view(-1, 1, 1, 1)
    # the CPS formula with theta = 0: (1 - s') x0_hat + s' eps_hat
    formula = (1 - snb) * (x - sb * v) + snb * (x + (1 - sb) * v)
    out = cps.cps_step(x, v, s, s_next, 0.0)
    assert torch.allclose(out.sample, formula, atol=1e-6)
    # and it consumes no randomness
    state = g.get_state()
    cps.cps_step(x, v, s, s_next, 0.0, generator=g)
    assert torch.equal(g.get_state(), state)


def test_inv06_final_step_is_x0_hat_deterministic_logp_zero():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    out = cps.cps_step(X, V, 0.5, 0.0, 0.9, generator=g)
    assert torch.allclose(out.sample, torch.tensor([[0.4, -1.2]]), atol=1e-7)
    assert torch.equal(out.sample, cps.predict_x0(X, V, 0.5))  # bit-exact x0_hat
    assert out.log_prob.item() == 0.0 and out.std.item() == 0.0
    assert torch.equal(g.get_state(), state)  # no randomness consumed
    # any supplied noise is multiplied by rho = 0
    big = cps.cps_step(X, V, 0.5, 0.0, 0.9, noise=torch.full_like(X, 1e6))
    assert torch.equal(big.sample, out.sample)


def test_inv06_final_step_logp_has_no_gradient_for_any_parameters():
    w = torch.tensor(0.7, requires_grad=True)
    x = torch.randn(3, 2, 4, 4)
    v = (w * x).to(torch.bfloat16)
    out = cps.cps_step(x, v, 0.5, 0.0, 0.9)
    assert out.sample.dtype == torch.bfloat16
    assert torch.equal(out.log_prob, torch.zeros(3))  # exactly 0 even after the bf16 cast
    recomputed = cps.cps_step(x, (1.3 * w * x).to(torch.bfloat16), 0.5, 0.0, 0.9, prev_sample=out.sample)
    recomputed.log_prob.sum().backward()
    assert recomputed.log_prob.abs().sum().item() == 0.0 and w.grad.item() == 0.0


def test_inv07_cps_eta09_worked_example():
    out = cps.cps_step(X, V, 0.9, 0.75, 0.9, noise=XI)
    rho = 0.75 * math.sin(0.45 * math.pi)
    assert rho == pytest.approx(0.740766, abs=1e-6)
    assert torch.allclose(out.mean, torch.tensor([[0.141009, -0.452633]]), atol=1e-6)
    assert torch.allclose(out.sample, torch.tensor([[0.881776, -1.193399]]), atol=1e-6)
    assert out.std.item() == pytest.approx(rho, abs=1e-6)
    assert out.log_prob.item() == pytest.approx(-0.548735, abs=1e-6)  # = -rho^2 with xi = +-1
    assert torch.allclose(out.log_prob, cps.cps_log_prob(out.sample, out.mean))


def test_inv08_cps_eta1_worked_example():
    out = cps.cps_step(X, V, 0.9, 0.75, 1.0, noise=XI)
    assert torch.allclose(out.mean, torch.tensor([[0.08, -0.34]]), atol=1e-6)  # (1 - s') x0_hat
    assert torch.allclose(out.sample, torch.tensor([[0.83, -1.09]]), atol=1e-6)


def test_inv09_coefficient_preservation_monte_carlo():
    g = torch.Generator().manual_seed(3)
    s, s_next = 0.9, 0.5
    x0 = torch.randn(8, 4, 64, 64, generator=g)
    eps = torch.randn(8, 4, 64, 64, generator=g)
    x = (1 - s) * x0 + s * eps
    v = eps - x0  # the exact velocity: x0_hat = x0 and eps_hat = eps
    assert torch.allclose(cps.predict_x0(x, v, s), x0, atol=1e-5)
    assert torch.allclose(cps.predict_eps(x, v, s), eps, atol=1e-5)
    out = cps.cps_step(x, v, s, s_next, 0.9, generator=g)
    noise_part = out.sample - (1 - s_next) * x0
    assert noise_part.var().item() == pytest.approx(s_next**2, rel=0.01)


@pytest.mark.parametrize(("s_next", "rho_sq"), [(0.9, 0.790178), (0.75, 0.548735), (0.5, 0.243882)])
def test_inv10_rho_squared_and_expected_logp(s_next, rho_sq):
    g = torch.Generator().manual_seed(4)
    x, v = torch.randn(4, 4, 64, 64, generator=g), torch.randn(4, 4, 64, 64, generator=g)
    out = cps.cps_step(x, v, 1.0, s_next, 0.9, generator=g)
    assert out.std[0].item() ** 2 == pytest.approx(rho_sq, abs=1e-6)
    d = 4 * 64 * 64
    tol = 5 * rho_sq * math.sqrt(2 / d)  # 5 standard errors
    assert torch.all((out.log_prob + rho_sq).abs() < tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inv11_logprob_recomputation_is_bit_exact_and_ratio_is_one(dtype):
    g = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.1)
    x = torch.randn(6, 4, 8, 8, generator=g)

    def velocity(lat):
        return torch.einsum("oc,bchw->bohw", w, lat.float()).to(dtype)

    with torch.no_grad():
        old = cps.cps_step(x, velocity(x), 0.9, 0.75, 0.9, generator=g)
    assert old.sample.dtype == dtype
    new = cps.cps_step(x, velocity(x), 0.9, 0.75, 0.9, prev_sample=old.sample)
    assert torch.equal(new.log_prob.detach(), old.log_prob)
    adv = torch.linspace(-1, 1, 6)
    loss, stats = grpo.ppo_loss(new.log_prob, old.log_prob, adv, 1e-5, 1e-5)
    assert stats["ratio_min"].item() == 1.0 and stats["ratio_max"].item() == 1.0
    # on-policy: dL/dw = -mean_B(A * dlogp/dw)
    loss.backward()
    grad_ppo = w.grad.clone()
    w.grad = None
    new2 = cps.cps_step(x, velocity(x), 0.9, 0.75, 0.9, prev_sample=old.sample)
    (-(adv * new2.log_prob).mean()).backward()
    assert torch.allclose(grad_ppo, w.grad, rtol=1e-5, atol=1e-8)


def test_per_sample_sigmas_match_scalar_calls():
    g = torch.Generator().manual_seed(6)
    x, v, xi = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    out = cps.cps_step(x, v, torch.tensor([0.9, 0.5]), torch.tensor([0.75, 0.0]), 0.9, noise=xi)
    first = cps.cps_step(x[:1], v[:1], 0.9, 0.75, 0.9, noise=xi[:1])
    last = cps.cps_step(x[1:], v[1:], 0.5, 0.0, 0.9, noise=xi[1:])
    assert torch.equal(out.sample[:1], first.sample) and torch.equal(out.sample[1:], last.sample)
    assert torch.equal(out.log_prob, torch.cat([first.log_prob, last.log_prob]))
    assert out.std.shape == (2, 1, 1, 1) and out.std[1].item() == 0.0
    with pytest.raises(ValueError, match="noise level"):
        cps.cps_step(x, v, torch.tensor([0.9, 0.5, 0.1]), 0.0, 0.9)


def test_gaussian_log_prob_is_the_true_density():
    g = torch.Generator().manual_seed(7)
    x, v = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    out = cps.cps_step(x, v, 0.9, 0.75, 0.9, generator=g, log_prob="gaussian")
    rho = out.std[0].item()
    dist = torch.distributions.Normal(out.mean, rho)
    expected = dist.log_prob(out.sample.float()).mean(dim=(1, 2, 3))
    assert torch.allclose(out.log_prob, expected, atol=1e-5)
    # reference form = 2 rho^2 * (gaussian + log rho + log sqrt(2 pi)) per element mean
    ref = cps.cps_log_prob(out.sample, out.mean)
    const = math.log(rho) + 0.5 * math.log(2 * math.pi)
    assert torch.allclose(ref, 2 * rho**2 * (out.log_prob + const), atol=1e-5)
    final = cps.cps_step(x, v, 0.5, 0.0, 0.9, log_prob="gaussian")
    assert torch.equal(final.log_prob, torch.zeros(3))


def test_sde_step_flow_grpo_formula():
    g = torch.Generator().manual_seed(8)
    x, v, xi = (torch.randn(2, 2, 3, 3, generator=g) for _ in range(3))
    s, s_next, eta = 0.75, 0.5, 0.7
    out = cps.sde_step(x, v, s, s_next, eta, noise=xi, sigma_max=0.9)
    std = eta * math.sqrt(s / (1 - s))
    dt = s_next - s
    mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    assert torch.allclose(out.mean, mean, atol=1e-6)
    assert torch.allclose(out.sample, mean + std * math.sqrt(-dt) * xi, atol=1e-6)
    dist = torch.distributions.Normal(mean, std * math.sqrt(-dt))
    assert torch.allclose(out.log_prob, dist.log_prob(out.sample).mean(dim=(1, 2, 3)), atol=1e-5)
    # sigma = 1 uses sigma_max in the denominator only
    top = cps.sde_step(x, v, 1.0, 0.9, eta, noise=xi, sigma_max=0.9)
    assert top.std[0].item() == pytest.approx(eta * math.sqrt(1.0 / 0.1) * math.sqrt(0.1), rel=1e-6)
    with pytest.raises(ValueError, match="eta"):
        cps.sde_step(x, v, s, s_next, 0.0, sigma_max=0.9)


def test_cps_input_validation():
    with pytest.raises(ValueError, match="sampling.eta"):
        cps.cps_step(X, V, 0.9, 0.75, 1.5)
    with pytest.raises(ValueError, match="log_prob"):
        cps.cps_log_prob(X, V, kind="exact")


def test_seeded_noise_is_device_independent_with_a_cpu_generator():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    draws = []
    for device in devices:
        x = torch.zeros(2, 3, 4, 4, device=device)
        noise = cps.randn_like_on(x, torch.Generator().manual_seed(11))
        assert noise.device.type == device and noise.dtype == torch.float32
        out = cps.cps_step(x, x, 0.9, 0.75, 0.9, generator=torch.Generator().manual_seed(11))
        assert torch.equal(out.sample.cpu(), (out.std * noise).cpu())
        draws.append(noise.cpu())
    assert all(torch.equal(d, draws[0]) for d in draws)

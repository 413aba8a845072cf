"""Spec algorithms.md §6 invariants 1-4 (schedules) plus the index samplers and the LR warm-up."""

from __future__ import annotations

import pytest
import torch

from rtdmd_ray.algorithms import schedules

torch.set_num_threads(1)


def test_inv01_sd3_schedule_and_timesteps():
    sigmas = schedules.sigma_schedule("sd3")
    assert sigmas == [1.0, 0.9, 0.75, 0.5, 0.0]
    assert schedules.schedule_timesteps(sigmas) == [1000.0, 900.0, 750.0, 500.0]


def test_inv01_sd3_rounds_to_six_decimals():
    # r = 0.3 -> 0.9 / 1.6 = 0.5625 exactly; r = 0.1 -> 0.3 / 1.2 = 0.25; r = 0.7 -> 2.1/2.4 = 0.875
    assert schedules.sigma_schedule("sd3", (700, 300, 100)) == [0.875, 0.5625, 0.25, 0.0]
    # r = 0.333: 0.999 / 1.666 = 0.59963985... -> rounded to 6 dp
    assert schedules.sigma_schedule("sd3", (333,))[0] == 0.59964


@pytest.mark.parametrize(
    ("resolution_px", "mu", "expected"),
    [
        (512, 0.63, [1.0, 0.849235, 0.652489, 0.384945]),
        (1024, 1.15, [1.0, 0.904531, 0.759511, 0.512844]),
    ],
)
def test_inv02_flux1_schedule(resolution_px, mu, expected):
    seq_len = schedules.image_seq_len_for("flux1", resolution_px)
    assert seq_len == {512: 1024, 1024: 4096}[resolution_px]
    assert schedules.flux1_mu(seq_len) == pytest.approx(mu, abs=1e-12)
    sigmas = schedules.sigma_schedule("flux1", image_seq_len=seq_len)
    assert sigmas[-1] == 0.0 and len(sigmas) == 5
    assert sigmas[:-1] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("resolution_px", "mu", "expected"),
    [
        (512, 2.030690, [1.0, 0.958085, 0.883982, 0.717497]),
        (1024, 2.291180, [1.0, 0.967384, 0.908144, 0.767200]),
    ],
)
def test_inv03_flux2_schedule(resolution_px, mu, expected):
    seq_len = schedules.image_seq_len_for("flux2", resolution_px)
    assert schedules.flux2_mu(seq_len, 4) == pytest.approx(mu, abs=1e-6)
    sigmas = schedules.sigma_schedule("flux2", image_seq_len=seq_len)
    assert sigmas[:-1] == pytest.approx(expected, abs=1e-6)
    assert sigmas[0] == 1.0  # exactly: 1/r - 1 = 0 at r = 1


def test_inv03_flux2_mu_depends_on_step_count_and_long_sequences():
    full = schedules.sigma_schedule("flux2", (1000, 750, 500, 250), image_seq_len=1024)
    truncated = schedules.sigma_schedule("flux2", (1000, 750, 500), image_seq_len=1024)
    assert truncated[1] != pytest.approx(full[1])
    # above 4300 tokens mu is the 200-step fit, whatever the step count
    assert schedules.flux2_mu(5000, 4) == pytest.approx(0.00016927 * 5000 + 0.45666666)
    assert schedules.flux2_mu(5000, 4) == schedules.flux2_mu(5000, 50)


def test_flux2_shift_terminal_stretches_the_last_sigma():
    sigmas = schedules.sigma_schedule("flux2", image_seq_len=1024, shift_terminal=0.5)
    assert sigmas[0] == pytest.approx(1.0) and sigmas[3] == pytest.approx(0.5) and sigmas[4] == 0.0
    with pytest.raises(ValueError, match="shift_terminal"):
        schedules.sigma_schedule("flux1", image_seq_len=1024, shift_terminal=0.5)


def test_flux_linear_time_shift_and_static_fallback():
    lin = schedules.sigma_schedule("flux1", (1000, 500), image_seq_len=1024, time_shift_type="linear")
    assert lin[1] == pytest.approx(0.63 / (0.63 + 1.0))
    static = schedules.sigma_schedule("flux1", (1000, 500), use_dynamic_shifting=False, shift=3.0)
    assert static[1] == pytest.approx(0.75)


def test_any_schedule_starts_at_exactly_one():
    for backbone, seq in (("sd3", None), ("flux1", 1024), ("flux1", 4096), ("flux2", 1024), ("flux2", 9000)):
        assert schedules.sigma_schedule(backbone, image_seq_len=seq)[0] == 1.0


def test_schedule_errors_teach():
    with pytest.raises(ValueError, match="image_seq_len"):
        schedules.sigma_schedule("flux1")
    with pytest.raises(ValueError, match="denoising_step_list"):
        schedules.sigma_schedule("sd3", (500, 750))
    with pytest.raises(ValueError, match="model.backbone"):
        schedules.sigma_schedule("sdxl")


def test_inv04_training_table():
    sd3 = schedules.training_sigmas("sd3")
    assert sd3.shape == (1000,) and sd3.dtype == torch.float32
    assert sd3[999].item() == 1.0
    assert sd3[0].item() == pytest.approx(0.003 / 1.002, rel=1e-6)
    assert sd3[0].item() == pytest.approx(0.002994, abs=1e-6)
    assert torch.all(sd3[1:] > sd3[:-1])
    flux = schedules.training_sigmas("flux1")
    assert flux[0].item() == pytest.approx(0.001) and flux[499].item() == pytest.approx(0.5)
    assert torch.equal(flux, schedules.training_sigmas("flux2"))


def test_uniform_index_sampler_range():
    g = torch.Generator().manual_seed(0)
    idx = schedules.sample_timestep_indices(20000, scheme="uniform", min_step=20, max_step=980, generator=g)
    assert idx.dtype == torch.int64 and idx.min().item() == 20 and idx.max().item() == 980
    # max_step above the table is capped at 999
    idx = schedules.sample_timestep_indices(5000, min_step=990, max_step=5000, generator=g)
    assert idx.max().item() == 999


def test_logit_normal_index_sampler_is_centred_and_bounded():
    g = torch.Generator().manual_seed(0)
    idx = schedules.sample_timestep_indices(
        40000, scheme="logit_normal", min_step=0, max_step=999, generator=g
    )
    assert 0 <= idx.min().item() and idx.max().item() <= 999
    # sigmoid(N(0, 1)) is symmetric around 0.5: median index ~ 500
    assert abs(idx.double().median().item() - 500) < 10
    # same seed, same draw
    again = schedules.sample_timestep_indices(
        40000, scheme="logit_normal", min_step=0, max_step=999, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(idx, again)
    with pytest.raises(ValueError, match="logit_normal"):
        schedules.sample_timestep_indices(4, scheme="cosine")


def test_warmup_constant_lr():
    assert [schedules.warmup_constant_lr(s, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert schedules.warmup_constant_lr(0, 0) == 1.0  # shipped warm-up 0: full LR from the first step

"""Spec algorithms.md §6 invariants 19-23 and 25 (advantages, filter, step selection, shared noise,
K-repeat draws) plus the PPO loss."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch

from rtdmd_ray.algorithms import cps, grpo

torch.set_num_threads(1)

REWARDS = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 12.0, 12.0])
PROMPTS = ["a"] * 4 + ["b"] * 4
CENTRED = [-0.3424, -0.1141, 0.1141, 0.3424, -0.2283, -0.2283, 0.2283, 0.2283]
FINAL = [-1.4136, -0.4712, 0.4712, 1.4136, -0.9424, -0.9424, 0.9424, 0.9424]


def _group_means(adv: torch.Tensor, prompts: list[str]) -> list[float]:
    return [adv[[i for i, p in enumerate(prompts) if p == key]].mean().item() for key in sorted(set(prompts))]


def test_inv19_advantages_worked_example():
    assert REWARDS.std(correction=0).item() == pytest.approx(4.380354, abs=1e-6)
    centred = grpo.compute_advantages({"r": REWARDS}, {"r": 1.0}, PROMPTS, weight_advantages=False)
    assert centred.tolist() == pytest.approx(CENTRED, abs=1e-4)
    final = grpo.compute_advantages({"r": REWARDS}, {"r": 1.0}, PROMPTS)
    assert final.dtype == torch.float32
    assert final.tolist() == pytest.approx(FINAL, abs=1e-4)
    assert final.double().std(correction=0).item() == pytest.approx(0.99959, abs=1e-5)


def test_inv20_advantage_invariants():
    g = torch.Generator().manual_seed(0)
    prompts = [f"p{i % 5}" for i in range(40)]
    rewards = {"clip": torch.randn(40, generator=g), "pick": torch.randn(40, generator=g) * 3 + 1}
    weights = {"clip": 1.0, "pick": 0.5}
    adv = grpo.compute_advantages(rewards, weights, prompts)
    assert _group_means(adv, prompts) == pytest.approx([0.0] * 5, abs=1e-6)
    # before renormalisation too (weight_advantages=False path is per-prompt centred)
    raw = grpo.compute_advantages(rewards, weights, prompts, weight_advantages=False)
    assert _group_means(raw, prompts) == pytest.approx([0.0] * 5, abs=1e-6)
    # a per-prompt constant added to a reward changes nothing: the group centring removes it, and the
    # global std it inflates is divided out by the final renormalisation (up to the 1e-4 terms)
    shift = torch.tensor([float(int(p[1:]) * 7) for p in prompts])
    single = grpo.compute_advantages({"r": rewards["pick"]}, {"r": 1.0}, prompts)
    single_shifted = grpo.compute_advantages({"r": rewards["pick"] + shift}, {"r": 1.0}, prompts)
    assert torch.allclose(single, single_shifted, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(
        single,
        grpo.compute_advantages({"r": rewards["pick"] + shift}, {"r": 1.0}, prompts, per_prompt=False),
        atol=0.1,
    )
    # with several rewards the shifted reward's global std (its weight) changes; centring still holds
    shifted = grpo.compute_advantages(
        {"clip": rewards["clip"] + shift, "pick": rewards["pick"]}, weights, prompts
    )
    assert _group_means(shifted, prompts) == pytest.approx([0.0] * 5, abs=1e-6)
    # scaling every reward by c > 0 leaves the advantages unchanged up to the 1e-4 in the denominators
    scaled = grpo.compute_advantages({k: 10.0 * v for k, v in rewards.items()}, weights, prompts)
    assert torch.allclose(adv, scaled, atol=1e-3)
    # the advantage is per sample: expanding to [N, T] keeps it constant across T
    assert torch.equal(adv[:, None].expand(40, 4)[:, 2], adv)


def test_weighted_sum_of_per_reward_advantages_matches_by_hand():
    r1 = torch.tensor([1.0, 3.0, 0.0, 4.0])
    r2 = torch.tensor([2.0, 2.0, 5.0, 1.0])
    prompts = ["x", "x", "y", "y"]

    def by_hand(r):
        means = torch.tensor([2.0, 2.0, 2.0, 2.0]) if r is r1 else torch.tensor([2.0, 2.0, 3.0, 3.0])
        return (r.double() - means) / (r.double().std(correction=0) + 1e-4)

    a = 1.0 * by_hand(r1) + 0.25 * by_hand(r2)
    a = (a - a.mean()) / (a.std(correction=0) + 1e-4)
    got = grpo.compute_advantages(
        {"r1": r1, "r2": r2, "ignored": torch.zeros(4)}, {"r1": 1.0, "r2": 0.25}, prompts
    )
    assert torch.allclose(got.double(), a, atol=1e-6)


def test_per_prompt_std_and_global_zscore_modes():
    per_prompt_std = grpo.compute_advantages(
        {"r": REWARDS}, {"r": 1.0}, PROMPTS, weight_advantages=False, per_prompt_global_std=False
    )
    std_a = torch.tensor([1.0, 2, 3, 4]).std(correction=0).item()
    assert per_prompt_std[0].item() == pytest.approx(-1.5 / (std_a + 1e-4), rel=1e-6)
    assert per_prompt_std[4].item() == pytest.approx(-1.0 / (1.0 + 1e-4), rel=1e-6)
    z = grpo.compute_advantages(
        {"r": REWARDS}, {"r": 1.0}, PROMPTS, weight_advantages=False, per_prompt=False
    )
    expected = (REWARDS - REWARDS.mean()) / (REWARDS.std(correction=0) + 1e-4)
    assert torch.allclose(z, expected, atol=1e-6)


def test_valid_mask_excludes_samples_from_every_statistic():
    rewards = torch.cat([REWARDS, torch.tensor([float("nan"), 100.0])])
    prompts = PROMPTS + ["a", "b"]
    valid = torch.tensor([True] * 8 + [False, False])
    adv = grpo.compute_advantages({"r": rewards}, {"r": 1.0}, prompts, valid=valid)
    assert adv[8:].tolist() == [0.0, 0.0]
    assert adv[:8].tolist() == pytest.approx(FINAL, abs=1e-4)
    with pytest.raises(ValueError, match="valid=False"):
        grpo.compute_advantages({"r": rewards}, {"r": 1.0}, prompts)
    with pytest.raises(KeyError, match="hpsv2"):
        grpo.compute_advantages({"r": REWARDS}, {"hpsv2": 1.0}, PROMPTS)
    nothing_valid = grpo.compute_advantages(
        {"r": REWARDS}, {"r": 1.0}, PROMPTS, valid=torch.zeros(8, dtype=bool)
    )
    assert torch.equal(nothing_valid, torch.zeros(8))


def test_inv21_zero_advantage_filter():
    num_batches = 4
    adv = torch.zeros(16, 3)
    adv[[1, 5, 6, 9, 13], :] = 1.0  # 5 non-zero rows -> padded to 8
    keep = grpo.zero_advantage_filter(adv, num_batches, epoch=3, rank=1)
    assert keep.dtype == torch.bool and keep.sum().item() == 8
    assert keep[[1, 5, 6, 9, 13]].all()
    assert torch.equal(keep, grpo.zero_advantage_filter(adv, num_batches, epoch=3, rank=1))  # deterministic
    assert not torch.equal(keep, grpo.zero_advantage_filter(adv, num_batches, epoch=3, rank=2))
    # everything zero: exactly num_batches rows are kept
    none = grpo.zero_advantage_filter(torch.zeros(16), num_batches, epoch=0, rank=0)
    assert none.sum().item() == num_batches
    # already a multiple: exactly the non-zero rows
    exact = torch.zeros(16)
    exact[:8] = 0.5
    assert torch.equal(grpo.zero_advantage_filter(exact, num_batches, 0, 0), exact != 0)
    for seed in range(20):
        rows = torch.rand(16, generator=torch.Generator().manual_seed(seed)) > 0.6
        kept = grpo.zero_advantage_filter(rows.float(), num_batches, seed, 0)
        assert kept.sum().item() % num_batches == 0 and kept.sum().item() >= num_batches
    with pytest.raises(ValueError, match="sample_batches_per_epoch"):
        grpo.zero_advantage_filter(torch.ones(10), 4, 0, 0)


def test_inv22_step_selection_is_shared_sorted_and_seeded():
    picks = [grpo.select_train_steps(42, e, range(0, 3), 2) for e in range(50)]
    for e, p in enumerate(picks):
        assert p == sorted(p) and len(set(p)) == 2 and set(p) <= {0, 1, 2}
        # every "rank" calling with (seed, epoch) agrees; the seed formula is the reference's
        assert p == grpo.select_train_steps(42, e, [0, 1, 2], 2)
        assert p == sorted(random.Random(42 + e * 100000 + 104729).sample([0, 1, 2], 2))
    assert len({tuple(p) for p in picks}) == 3  # all three pairs occur over epochs
    with pytest.raises(ValueError, match="step_selection"):
        grpo.select_train_steps(42, 0, [0, 1, 2], 4)


def test_inv23_shared_noise_is_prompt_deterministic():
    shape = (4, 8, 8)
    a1 = grpo.shared_noise("a red cube", step=1, epoch=5, shape=shape)
    a2 = grpo.shared_noise("a red cube", step=1, epoch=5, shape=shape)
    assert a1.dtype == torch.float32 and a1.device.type == "cpu" and a1.shape == shape
    assert torch.equal(a1, a2)  # any copy of the prompt, on any rank
    assert not torch.equal(a1, grpo.shared_noise("a red cube", step=2, epoch=5, shape=shape))
    assert not torch.equal(a1, grpo.shared_noise("a red cube", step=1, epoch=6, shape=shape))
    assert not torch.equal(a1, grpo.shared_noise("a blue cube", step=1, epoch=5, shape=shape))
    h = int.from_bytes(hashlib.sha256(b"a red cube").digest()[:4], "big")
    assert grpo.shared_noise_seed("a red cube", 1, 5) == (h + 10007 + 500000) % 2**31
    batch = grpo.shared_noise_batch(["a red cube", "x", "a red cube"], 1, 5, shape)
    assert torch.equal(batch[0], a1) and torch.equal(batch[2], a1) and not torch.equal(batch[1], a1)


def test_inv23_rollout_with_shared_noise_matches_in_untrained_steps_only():
    """Two copies of a prompt with identical latents stay identical through a step with shared noise and
    diverge through a selected step with fresh noise."""
    x = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)
    v = 0.3 * x
    shared = grpo.shared_noise_batch(["p", "p"], step=0, epoch=0, shape=(4, 8, 8))
    untrained = cps.cps_step(x, v, 1.0, 0.9, 0.9, noise=shared)
    assert torch.equal(untrained.sample[0], untrained.sample[1])
    trained = cps.cps_step(x, v, 1.0, 0.9, 0.9, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(trained.sample[0], trained.sample[1])


def test_inv25_k_repeat_draw():
    world, per_rank, k = 8, 9, 24
    rows = grpo.k_repeat_indices(
        seed=42, draw_index=3, dataset_len=500, total_slots=world * per_rank, images_per_prompt=k
    )
    assert len(rows) == 72
    counts = {r: rows.count(r) for r in set(rows)}
    assert len(counts) == 3 and set(counts.values()) == {24}
    slices = [rows[r * per_rank : (r + 1) * per_rank] for r in range(world)]
    assert all(len(s) == 9 for s in slices)
    # copies of a prompt are spread over ranks (so advantages need the gathered batch)
    assert sum(1 for s in slices if set(s) != set(slices[0])) > 0
    assert rows == grpo.k_repeat_indices(42, 3, 500, 72, 24)  # same on every rank
    assert rows != grpo.k_repeat_indices(42, 4, 500, 72, 24)
    with pytest.raises(ValueError, match="images_per_prompt"):
        grpo.k_repeat_indices(42, 0, 500, 70, 24)
    with pytest.raises(ValueError, match="distinct prompts"):
        grpo.k_repeat_indices(42, 0, 2, 72, 24)


def test_ppo_loss_clipping_advantage_clip_and_stats():
    new = torch.tensor([0.0, 0.1, -0.1, 0.0], requires_grad=True)
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, 1.0, 10.0])
    loss, stats = grpo.ppo_loss(new, old, adv, clip_range_lt=0.05, clip_range_gt=0.05, adv_clip_max=5.0)
    r = torch.exp(new.detach())
    # sample 1: ratio 1.105 > 1.05 with A > 0 -> clipped (constant); sample 2: ratio 0.905 < 0.95 with A > 0
    # -> the unclipped term is larger (max) so it keeps its gradient; sample 3: A clipped to 5
    expected = torch.stack([-r[0], -1.05 * torch.ones(()), -r[2], -5 * r[3]]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert new.grad.tolist() == pytest.approx([-0.25, 0.0, -r[2].item() / 4, -5 * 0.25], rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    assert stats["ratio_max"].item() == pytest.approx(r[1].item())
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (0.01 + 0.01) / 4)
    with pytest.raises(ValueError, match=r"\[B\]"):
        grpo.ppo_loss(new[:, None], old[:, None], adv[:, None], 0.1, 0.1)


def test_kl_penalty_value_and_guard():
    mean = torch.ones(2, 1, 2, 2, requires_grad=True)
    ref = torch.zeros(2, 1, 2, 2)
    std = torch.tensor([0.5, 1.0]).view(2, 1, 1, 1)
    kl = grpo.kl_penalty(mean, ref, std)
    assert kl.item() == pytest.approx((1 / (2 * 0.25) + 1 / 2) / 2)
    with pytest.raises(ValueError, match="rho > 0"):
        grpo.kl_penalty(mean, ref, torch.zeros(2, 1, 1, 1))

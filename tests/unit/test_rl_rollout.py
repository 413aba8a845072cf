"""Rollout prompts and noise without models: K-repeat jobs across samplers, per-sample seeds, SubGRPO shared
noise (spec algorithms.md §3.2-§3.3, invariants 22-23, 25)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from rtdmd_ray.algorithms.grpo import select_train_steps, shared_noise
from rtdmd_ray.config import GRPOConfig, StepSelectionConfig
from rtdmd_ray.roles.sampler import epoch_prompt_jobs, epoch_train_steps, sample_seed, trajectory_noise
from rtdmd_ray.types import PromptBatch

RECORDS = [{"prompt": f"prompt {i}", "tag": f"t{i % 3}"} for i in range(10)]


def grpo(**kw) -> GRPOConfig:
    base = {"prompts_per_step": 3, "images_per_prompt": 4, "sample_batches_per_epoch": 2}
    return GRPOConfig(**(base | kw))


def test_jobs_cover_k_repeat_groups_spread_over_samplers():
    g = grpo(sampler_micro_batch_images=2)
    jobs = epoch_prompt_jobs(RECORDS, grpo=g, seed=7, epoch=3, num_samplers=2, policy_version=3)
    # 2 steps x 2 samplers x (6 images / 2 per call) micro-batches, in sample order
    assert [j.key for j in jobs] == [(i, s, m) for i in range(2) for s in range(2) for m in range(3)]
    assert all(len(j.prompts) == 2 and j.prompts.policy_version == 3 for j in jobs)
    for step in range(2):
        step_jobs = [j for j in jobs if j.key[0] == step]
        prompts = [p for j in step_jobs for p in j.prompts.prompts]
        counts = Counter(prompts)
        assert len(counts) == 3 and set(counts.values()) == {4}  # 3 prompts x K=4 copies
        by_sampler = {s: {p for j in step_jobs if j.sampler == s for p in j.prompts.prompts} for s in (0, 1)}
        assert by_sampler[0] & by_sampler[1], "with 2 samplers some group must span both (K copies shuffled)"
    seeds = torch.cat([j.prompts.seeds for j in jobs])
    assert len(set(seeds.tolist())) == len(seeds)
    # group ids are dataset rows and metadata travels with the prompt
    for j in jobs:
        for gid, p, md in zip(
            j.prompts.group_ids.tolist(), j.prompts.prompts, j.prompts.metadata, strict=True
        ):
            assert RECORDS[gid]["prompt"] == p and md["tag"] == RECORDS[gid]["tag"]


def test_jobs_are_a_pure_function_of_seed_and_epoch():
    g = grpo()
    a = epoch_prompt_jobs(RECORDS, grpo=g, seed=7, epoch=1, num_samplers=1, policy_version=0)
    b = epoch_prompt_jobs(RECORDS, grpo=g, seed=7, epoch=1, num_samplers=1, policy_version=0)
    c = epoch_prompt_jobs(RECORDS, grpo=g, seed=7, epoch=2, num_samplers=1, policy_version=0)
    assert [j.prompts.prompts for j in a] == [j.prompts.prompts for j in b]
    assert all(torch.equal(x.prompts.seeds, y.prompts.seeds) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0].prompts.seeds, c[0].prompts.seeds)
    # the sample's seed does not depend on how many samplers share the step
    two = epoch_prompt_jobs(RECORDS, grpo=g, seed=7, epoch=1, num_samplers=2, policy_version=0)
    assert (
        torch.cat([j.prompts.seeds for j in two]).tolist() == torch.cat([j.prompts.seeds for j in a]).tolist()
    )
    assert sample_seed(7, 1, 0) == int(a[0].prompts.seeds[0])


def test_epoch_train_steps():
    g = grpo()
    for epoch in range(5):
        assert epoch_train_steps(g, 42, epoch) == tuple(select_train_steps(42, epoch, [0, 1, 2], 2))
    off = grpo(step_selection=StepSelectionConfig(enabled=False, range_start=0, range_end=2))
    assert epoch_train_steps(off, 42, 0) == (0, 1, 2)


def _batch(prompts: list[str], seeds: list[int], epoch: int = 4) -> PromptBatch:
    ids = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    return PromptBatch(
        prompts=prompts,
        metadata=[{} for _ in prompts],
        group_ids=torch.tensor([ids[p] for p in prompts]),
        seeds=torch.tensor(seeds),
        epoch=epoch,
        policy_version=0,
    )


def test_shared_noise_identical_in_group_across_samplers_and_fresh_at_trained_steps():
    shape, train_steps = (2, 3, 3), (0, 2)
    # one group ("cat") split over two samplers' batches, plus another prompt
    s0 = _batch(["cat", "dog", "cat"], [11, 12, 13])
    s1 = _batch(["cat", "dog"], [21, 22])
    x0_a, n_a = trajectory_noise(s0, num_steps=4, shape=shape, train_steps=train_steps, share_untrained=True)
    x0_b, n_b = trajectory_noise(s1, num_steps=4, shape=shape, train_steps=train_steps, share_untrained=True)
    cats = [n_a[0], n_a[2], n_b[0]]
    for j in (1, 3):  # untrained steps: bit-identical for every copy of the prompt, on either sampler
        assert all(torch.equal(c[j], cats[0][j]) for c in cats)
        assert torch.equal(cats[0][j], shared_noise("cat", j, 4, shape))
        assert not torch.equal(n_a[1, j], cats[0][j])  # another prompt, another noise
    for j in train_steps:  # trained steps: every copy has its own noise
        assert not torch.equal(cats[0][j], cats[1][j]) and not torch.equal(cats[0][j], cats[2][j])
    assert not torch.equal(x0_a[0], x0_a[2])  # the initial noise is never shared
    # another epoch shares other noise
    _, n_e = trajectory_noise(
        _batch(["cat"], [11], epoch=5),
        num_steps=4,
        shape=shape,
        train_steps=train_steps,
        share_untrained=True,
    )
    assert not torch.equal(n_e[0, 1], n_a[0, 1])


def test_noise_is_per_sample_not_per_batch():
    shape = (2, 2, 2)
    full = _batch(["a", "b", "c", "d"], [1, 2, 3, 4])
    x0, noise = trajectory_noise(full, num_steps=3, shape=shape, train_steps=(0, 1), share_untrained=False)
    for lo in (0, 2):
        part = _batch(full.prompts[lo : lo + 2], full.seeds[lo : lo + 2].tolist())
        px0, pn = trajectory_noise(part, num_steps=3, shape=shape, train_steps=(0, 1), share_untrained=False)
        assert torch.equal(px0, x0[lo : lo + 2]) and torch.equal(pn, noise[lo : lo + 2])


@pytest.mark.parametrize("num_samplers", [1, 3])
def test_jobs_cover_the_epoch(num_samplers):
    g = grpo(prompts_per_step=3, images_per_prompt=2)
    jobs = epoch_prompt_jobs(RECORDS, grpo=g, seed=0, epoch=0, num_samplers=num_samplers, policy_version=0)
    assert sum(len(j.prompts) for j in jobs) == g.samples_per_epoch

"""The reward pool on local CPU Ray: dispatch as requests become ready, and re-dispatch of the work a dying
worker held (every request scored exactly once, with the same scores as a fault-free run)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rtdmd_ray.config import RewardsConfig, RoleResourcesConfig

pytestmark = pytest.mark.ray

SERVICE_S = 2.0


def requests(n: int) -> list:
    import ray

    from rtdmd_ray.roles.sampler import ScoreRequest

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        images = torch.randint(0, 256, (3, 3, 8, 8), generator=g, dtype=torch.uint8)
        out.append(type("Job", (), {"key": i, "request_ref": ray.put(ScoreRequest(images, [f"p{i}"] * 3,
                                                                                  [{}] * 3))})())
    return out


def expected(job) -> torch.Tensor:
    import ray

    images = ray.get(job.request_ref).images.float() / 255.0
    return images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))  # the latency scorer's score


def test_reward_pool_redispatches_work_of_a_dead_worker(ray_local):
    import ray

    from rtdmd_ray.roles.reward_pool import RewardPool

    rewards = RewardsConfig(weights={"latency": 1.0}, device="cpu",
                            options={"latency": {"seconds_per_batch": SERVICE_S}})
    resources = RoleResourcesConfig(count=2, cpus_per_actor=0.25, max_restarts=1)
    pool = RewardPool(rewards=rewards, resources=resources)
    try:
        jobs = requests(4)
        box: dict = {}

        def run() -> None:
            try:
                box["out"] = pool.score(jobs)
            except BaseException as e:  # surfaced below
                box["err"] = e

        th = threading.Thread(target=run)
        th.start()
        deadline = time.monotonic() + 60
        while pool.inflight[0] == 0 and time.monotonic() < deadline:  # worker 0 holds a request
            time.sleep(0.05)
        assert pool.inflight[0] > 0
        ray.kill(pool.group[0], no_restart=False)  # dies mid-call; Ray restarts it
        th.join(timeout=600)
        assert not th.is_alive() and "err" not in box, box.get("err")
        results, metrics = box["out"]
        assert sorted(results) == [0, 1, 2, 3]  # every request scored exactly once
        assert metrics["reward/pool/redispatched"] >= 1
        for job in jobs:
            scored = results[job.key]
            assert scored.valid.all() and len(scored) == 3
            torch.testing.assert_close(scored.scores["latency"], expected(job))
            torch.testing.assert_close(scored.total, expected(job))
    finally:
        pool.shutdown()

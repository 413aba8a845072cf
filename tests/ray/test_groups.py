"""Role actor groups: resources applied in one place, a 2-rank gloo learner group, timeouts, restarts."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

import pytest
import ray.cloudpickle

from rtdmd_ray.roles.groups import (
    RoleResources,
    create_actor_group,
    create_learner_group,
    create_placement_group,
    gather,
)

# test modules are not importable inside Ray workers: ship this module's classes by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Rank:
    """A stand-in learner rank: reports its process group and all-reduces a number."""

    def __init__(self, *, scale: float):
        self.scale = scale

    def world(self) -> tuple[int, int, str, str]:
        import os

        import torch.distributed as dist

        return dist.get_rank(), dist.get_world_size(), dist.get_backend(), os.environ["MASTER_PORT"]

    def allreduce(self, x: float) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([x * self.scale])
        dist.all_reduce(t)
        return float(t.item())


class Worker:
    def __init__(self, *, worker_id: int):
        self.worker_id, self.pid, self.calls = worker_id, os.getpid(), 0

    def info(self) -> tuple[int, int, int]:
        self.calls += 1
        return self.worker_id, self.pid, self.calls

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def test_role_resources_validation():
    assert RoleResources(count=2, cpus_per_actor=0.5).bundle == {"CPU": 0.5}
    assert RoleResources(count=1, cpus_per_actor=1, gpus_per_actor=0.25).bundle == {"CPU": 1.0, "GPU": 0.25}
    with pytest.raises(ValueError, match="max_restarts too"):
        RoleResources(count=1, max_task_retries=2)
    with pytest.raises(ValueError, match="count must be >= 0"):
        RoleResources(count=-1)
    with pytest.raises(ValueError, match="must be whole"):
        RoleResources(count=1, gpus_per_actor=1.5)
    # custom resources go into every bundle (zero amounts dropped, as Ray requires) and stay read-only
    pinned = RoleResources(count=2, cpus_per_actor=0.5, custom={"rtdmd_reward": 1, "unused": 0})
    assert pinned.bundle == {"CPU": 0.5, "rtdmd_reward": 1.0} and dict(pinned.custom) == {"rtdmd_reward": 1.0}
    with pytest.raises(TypeError, match="read-only"):
        pinned.custom["x"] = 1  # type: ignore[index]
    with pytest.raises(ValueError, match="gpus_per_actor"):
        RoleResources(count=1, custom={"GPU": 1})
    with pytest.raises(ValueError, match="amount >= 0"):
        RoleResources(count=1, custom={"rtdmd_reward": -1})


def test_role_resources_from_config_carries_custom():
    from rtdmd_ray.config import load_config

    cfg = load_config("configs/cluster/sd35m.yaml")
    res = RoleResources.from_config(cfg.resources.reward_worker, max_task_retries=0)
    assert (res.count, res.gpus_per_actor, res.max_restarts, res.max_task_retries) == (8, 0.5, -1, 0)
    assert res.bundle == {"CPU": 2.0, "GPU": 0.5, "rtdmd_reward": 1.0}


@pytest.mark.ray
def test_learner_group_two_ranks_allreduce_with_fractional_cpus(ray_local):
    group, info = create_learner_group(
        Rank,
        RoleResources(count=2, cpus_per_actor=0.5),
        init_kwargs=lambda rank: {"scale": rank + 1.0},
        timeout_s=60,
    )
    try:
        assert info.backend == "gloo" and info.world_size == 2 and info.master_port > 0
        worlds = group.map(lambda a: a.world.remote(), timeout_s=60, what="world")
        assert [w[:3] for w in worlds] == [(0, 2, "gloo"), (1, 2, "gloo")]
        assert {w[3] for w in worlds} == {str(info.master_port)}
        # rank r contributes 10 * (r + 1): 10 + 20 on both ranks
        assert group.map(lambda a: a.allreduce.remote(10.0), timeout_s=60) == [30.0, 30.0]
        table = ray_local.util.placement_group_table(group.placement_group)
        assert [b for b in table["bundles"].values()] == [{"CPU": 0.5}, {"CPU": 0.5}]
    finally:
        group.shutdown()


@pytest.mark.ray
def test_actor_group_map_gather_timeout_and_restart(ray_local):
    group = create_actor_group(
        Worker,
        RoleResources(count=2, cpus_per_actor=0.25, max_restarts=1),
        role="sampler",
        init_kwargs=lambda rank: {"worker_id": rank},
    )
    try:
        group.wait_ready(timeout_s=60)
        first = group.map(lambda a: a.info.remote(), timeout_s=60, what="info")
        assert [f[0] for f in first] == [0, 1] and [f[2] for f in first] == [1, 1]
        refs = group.map_ranked_async(lambda rank, a: a.sleep.remote(0.0 if rank == 0 else 2.0))
        with pytest.raises(TimeoutError, match=r"sample phase: results \[1\] of 2 not ready"):
            gather(refs, timeout_s=0.5, what="sample phase")
        gather(refs, timeout_s=30, what="drain")
        # max_restarts was applied: a crashed actor comes back as a fresh process with fresh state
        os.kill(first[1][1], signal.SIGKILL)  # the sampler's own process, started by this test
        deadline = time.monotonic() + 30
        while True:
            try:
                wid, pid, calls = ray_local.get(group[1].info.remote(), timeout=10)
                break
            except ray_local.exceptions.RayActorError:
                assert time.monotonic() < deadline, "sampler 1 was not restarted"
                time.sleep(0.2)
        assert wid == 1 and pid != first[1][1] and calls == 1
    finally:
        group.shutdown()


@pytest.mark.ray
def test_placement_group_that_cannot_fit_fails_with_a_teaching_error(ray_local):
    with pytest.raises(TimeoutError, match=r"config `resources`"):
        create_placement_group(RoleResources(count=1, cpus_per_actor=64), name="too-big", timeout_s=0.5)


def _available(ray_mod, name: str, want: float, timeout_s: float = 20.0) -> float:
    """``ray.available_resources()[name]`` once it equals ``want`` (the resource view lags a little)."""
    deadline = time.monotonic() + timeout_s
    while True:
        have = ray_mod.available_resources().get(name, 0.0)
        if have == want or time.monotonic() > deadline:
            return have
        time.sleep(0.2)


@pytest.mark.ray
def test_custom_resource_pins_actors_and_a_shortfall_names_the_config_key(ray_local):
    # the local cluster advertises rtdmd_reward: 2 (tests/conftest.py), like a small reward node
    pinned = RoleResources(count=2, cpus_per_actor=0.25, custom={"rtdmd_reward": 1})
    one_more = RoleResources(count=1, cpus_per_actor=0.25, custom={"rtdmd_reward": 1})
    group = create_actor_group(
        Worker, pinned, role="reward", init_kwargs=lambda rank: {"worker_id": rank}, placement_timeout_s=60
    )
    try:
        group.wait_ready(timeout_s=60)
        assert [i[0] for i in group.map(lambda a: a.info.remote(), timeout_s=60)] == [0, 1]
        table = ray_local.util.placement_group_table(group.placement_group)
        assert list(table["bundles"].values()) == [{"CPU": 0.25, "rtdmd_reward": 1.0}] * 2
        assert _available(ray_local, "rtdmd_reward", 0.0) == 0.0  # both units reserved by the role
        # a third reward actor does not fit while these hold the resource: a placement group times out
        # with the resource, the numbers and the config key to change
        with pytest.raises(TimeoutError) as info:
            create_actor_group(
                Worker, one_more, role="reward", init_kwargs={"worker_id": 9}, placement_timeout_s=1
            )
        msg = str(info.value)
        assert "custom resource 'rtdmd_reward': 1 x 1 = 1 needed, 0 of 2 available" in msg, msg
        assert "resources.reward_worker.custom" in msg and "resources.reward_worker.count" in msg, msg
    finally:
        group.shutdown()
    assert _available(ray_local, "rtdmd_reward", 2.0) == 2.0

    # more than the cluster has at all (3 x 1 of 2): never granted
    with pytest.raises(TimeoutError, match=r"'rtdmd_reward': 3 x 1 = 3 needed, 2 of 2 available"):
        create_actor_group(
            Worker, dataclasses.replace(pinned, count=3), role="reward", init_kwargs={"worker_id": 0},
            placement_timeout_s=1,
        )


@pytest.mark.ray
def test_actor_asking_for_a_resource_no_node_has_stays_pending_with_a_clear_error(ray_local):
    # without a placement group the actor is created but never placed; start-up names the missing resource
    group = create_actor_group(
        Worker,
        RoleResources(count=1, cpus_per_actor=0.25, custom={"rtdmd_sampler": 1}),
        role="sampler",
        strategy=None,
        init_kwargs={"worker_id": 0},
    )
    try:
        with pytest.raises(TimeoutError) as info:
            group.wait_ready(timeout_s=2)
        msg = str(info.value)
        assert "sampler start-up: results [0] of 1 not ready" in msg, msg
        assert "'rtdmd_sampler' (1 x 1) is advertised by no node" in msg, msg
        assert "config `resources.sampler.custom`" in msg, msg
    finally:
        group.shutdown()

"""The one place that applies resources: placement groups, role actors, and the learner's process group.

Roles are plain classes (no ``@ray.remote(num_cpus=...)``); ``create_actor_group`` wraps them and
applies a ``RoleResources`` slice (mapped from the config's ``resources`` section) through
``.options(...)``. ``ActorGroup`` fans calls out by real method access and gathers with a timeout::

    samplers = create_actor_group(RolloutWorker, RoleResources(count=2, cpus_per_actor=0.5), role="sampler",
                                  init_kwargs=lambda rank: {"sampler_id": rank, "cfg": cfg.rollout})
    refs = samplers.map_async(lambda a: a.sample.remote(prompts))    # list[ObjectRef]
    batches = gather(refs, timeout_s=600, what="sample")              # one ray.get per phase
"""

from __future__ import annotations

import datetime
import math
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rtdmd_ray.config import RAY_BUILTIN_RESOURCES, FrozenDict

PLACEMENT_STRATEGIES: tuple[str, ...] = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# group role name -> its key in the config's `resources` section, where they differ (for error messages)
_CONFIG_ROLE: dict[str, str] = {"reward": "reward_worker"}


def config_key(role: str) -> str:
    """The config path of ``role``'s resources, e.g. ``resources.reward_worker`` for role ``"reward"``."""
    return f"resources.{_CONFIG_ROLE.get(role, role or '<role>')}"


@dataclass(frozen=True)
class RoleResources:
    """Resources of one role's actors (samplers, reward workers or learner ranks).

    Attributes:
        count: number of actors.
        cpus_per_actor: logical CPUs each (fractions allowed, e.g. 0.5 on a 2-core test machine).
        gpus_per_actor: GPUs each (0 on CPU; fractions share a GPU between colocated actors).
        max_restarts: how often Ray restarts a dead actor (-1: forever; 0: never).
        max_task_retries: how often a call on a restarted actor is retried (-1: forever); needs
            ``max_restarts != 0``.
        custom: Ray custom resources each actor needs ``{name: amount}`` (config ``resources.<role>.custom``),
            applied to the actor options (``resources=``) and to its placement-group bundle, so the role
            runs only on nodes that advertise them (``ray start --resources``).
    """

    count: int
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    max_restarts: int = 0
    max_task_retries: int = 0
    custom: Mapping[str, float] = field(default_factory=FrozenDict)

    @classmethod
    def from_config(cls, role_cfg: Any, **overrides: Any) -> RoleResources:
        """The slice of a ``config.RoleResourcesConfig`` that groups apply (``overrides`` replace fields,
        e.g. ``max_task_retries=0`` for roles whose retries are the caller's job)."""
        fields = {
            "count": role_cfg.count,
            "cpus_per_actor": role_cfg.cpus_per_actor,
            "gpus_per_actor": role_cfg.gpus_per_actor,
            "max_restarts": role_cfg.max_restarts,
            "max_task_retries": role_cfg.max_task_retries,
            "custom": getattr(role_cfg, "custom", {}),
        }
        return cls(**{**fields, **overrides})

    def __post_init__(self) -> None:
        # read-only, picklable and hashable like the config's maps; zero amounts dropped (Ray rejects them
        # in bundles)
        custom = FrozenDict({k: float(v) for k, v in self.custom.items() if v != 0})
        object.__setattr__(self, "custom", custom)
        for name, amount in self.custom.items():
            if name in RAY_BUILTIN_RESOURCES or not 0 <= amount < math.inf:
                raise ValueError(
                    f"RoleResources.custom[{name!r}]={amount}: custom resources need a name other than "
                    f"{sorted(RAY_BUILTIN_RESOURCES)} (use cpus_per_actor / gpus_per_actor) and an "
                    "amount >= 0"
                )
        if self.count < 0:
            raise ValueError(f"RoleResources.count must be >= 0, got {self.count}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ValueError(
                f"RoleResources: cpus_per_actor ({self.cpus_per_actor}) and gpus_per_actor "
                f"({self.gpus_per_actor}) must be >= 0"
            )
        if self.gpus_per_actor > 1 and self.gpus_per_actor != int(self.gpus_per_actor):
            raise ValueError(f"RoleResources.gpus_per_actor={self.gpus_per_actor}: above 1 it must be whole")
        if self.max_restarts < -1 or self.max_task_retries < -1:
            raise ValueError("RoleResources.max_restarts / max_task_retries must be >= -1 (-1 means forever)")
        if self.max_task_retries != 0 and self.max_restarts == 0:
            raise ValueError(
                f"RoleResources.max_task_retries={self.max_task_retries} has no effect with "
                "max_restarts=0: Ray only retries calls on restarted actors; set max_restarts too"
            )

    @property
    def bundle(self) -> dict[str, float]:
        """The placement-group bundle of one actor (zero entries left out, as Ray requires)."""
        b = {"CPU": float(self.cpus_per_actor), "GPU": float(self.gpus_per_actor), **self.custom}
        return {k: v for k, v in b.items() if v > 0}


def _custom_shortfall(resources: RoleResources, role: str, *, of_total: bool = False) -> str:
    """Why a role's custom resources cannot be granted ('' if there is enough of each): compared with what
    is available now, or with the cluster's total when the role's own actors may already hold some."""
    if not resources.custom:
        return ""
    total = ray.cluster_resources()
    free = total if of_total else ray.available_resources()
    lines = []
    for name, amount in resources.custom.items():
        need = resources.count * amount
        have, avail = float(total.get(name, 0.0)), float(free.get(name, 0.0))
        if have == 0:
            lines.append(
                f"custom resource {name!r} ({resources.count} x {amount:g}) is advertised by no node"
            )
        elif avail < need:
            lines.append(
                f"custom resource {name!r}: {resources.count} x {amount:g} = {need:g} needed, {avail:g} of "
                f"{have:g} available"
            )
    if not lines:
        return ""
    key = config_key(role)
    return (
        f"{'; '.join(lines)} (config `{key}.custom`). Start this role's nodes with the resource "
        f"(`ray start --resources`, rayStartParams.resources in cluster/raycluster.yaml), lower {key}.count, "
        f"or clear {key}.custom. "
    )


def create_placement_group(
    resources: RoleResources,
    *,
    strategy: str = "PACK",
    name: str = "",
    timeout_s: float = 60.0,
    role: str = "",
) -> PlacementGroup:
    """Reserve one bundle per actor (CPU, GPU and custom resources) and wait until the cluster grants all.

    ``role`` (``"sampler"``, ...) names the config key in errors.

    Raises:
        TimeoutError: the cluster cannot fit the bundles within ``timeout_s`` (the message lists what
            was asked and what the cluster has); the half-made group is removed.
    """
    if strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(
            f"placement strategy {strategy!r} (config `resources.*.placement`) must be one of "
            f"{PLACEMENT_STRATEGIES}"
        )
    if not resources.bundle:
        raise ValueError(f"{name or 'role'}: a placement group needs cpus_per_actor or gpus_per_actor > 0")
    pg = placement_group([resources.bundle] * resources.count, strategy=strategy, name=name)
    if not pg.wait(timeout_seconds=timeout_s):
        remove_placement_group(pg)
        raise TimeoutError(
            f"placement group {name!r}: {resources.count} x {resources.bundle} ({strategy}) not granted "
            f"within {timeout_s} s; {_custom_shortfall(resources, role)}the cluster has "
            f"{ray.available_resources()} available of {ray.cluster_resources()}. "
            "Lower the role's count or cpus/gpus_per_actor in config `resources`, or add nodes"
        )
    return pg


def gather(refs: Sequence[ray.ObjectRef], *, timeout_s: float, what: str) -> list[Any]:
    """``ray.get(refs)`` with a timeout whose error names the phase ``what`` and the pending indices."""
    try:
        return ray.get(list(refs), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        ready_ids = {r.hex() for r in ready}
        pending = [i for i, r in enumerate(refs) if r.hex() not in ready_ids]
        raise TimeoutError(
            f"{what}: results {pending} of {len(refs)} not ready after {timeout_s} s; check those "
            "actors' logs, or raise the phase timeout in the config"
        ) from e


def init_ray(ray_address: str | None, cpus_needed: float) -> None:
    """Join ``ray_address`` (default ``$RAY_ADDRESS``), else start a private local cluster with
    ``cpus_needed`` CPUs or this machine's count if larger; nothing when Ray is already initialised."""
    if ray.is_initialized():
        return
    address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=True,
        **({"num_cpus": max(math.ceil(cpus_needed), os.cpu_count() or 1)} if address == "local" else {}),
    )


STOP_GRACE_S = 60.0  # a run that ended well: how long its actors get to exit on their own before a kill


class ActorGroup:
    """N actors of one role, in rank order, with their resources and placement group.

    Fan out with real method access, ``group.map_async(lambda a: a.sample.remote(x))``, and gather
    once per phase with ``gather`` (or ``group.map`` for both).
    """

    def __init__(
        self,
        *,
        role: str,
        actors: list[Any],
        resources: RoleResources,
        placement_group: PlacementGroup | None,
    ):
        self.role = role
        self.actors = actors
        self.resources = resources
        self.placement_group = placement_group

    def __len__(self) -> int:
        return len(self.actors)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.actors)

    def __getitem__(self, rank: int) -> Any:
        return self.actors[rank]

    def map_async(self, fn: Callable[[Any], ray.ObjectRef]) -> list[ray.ObjectRef]:
        """``[fn(actor) for actor in group]``, e.g. ``lambda a: a.score.remote(batch)``."""
        return [fn(a) for a in self.actors]

    def map_ranked_async(self, fn: Callable[[int, Any], ray.ObjectRef]) -> list[ray.ObjectRef]:
        """``[fn(rank, actor) for ...]`` for calls whose arguments differ per rank."""
        return [fn(rank, a) for rank, a in enumerate(self.actors)]

    def map(self, fn: Callable[[Any], ray.ObjectRef], *, timeout_s: float, what: str = "") -> list[Any]:
        """``map_async`` then ``gather``: the results in rank order."""
        return gather(self.map_async(fn), timeout_s=timeout_s, what=what or f"{self.role} call")

    def wait_ready(self, *, timeout_s: float) -> None:
        """Block until every actor's constructor has run (its errors surface here)."""
        try:
            gather(
                self.map_async(lambda a: a.__ray_ready__.remote()),
                timeout_s=timeout_s,
                what=f"{self.role} start-up",
            )
        except TimeoutError as e:
            # actors outside a placement group wait unplaced for a custom resource no node has enough of
            why = _custom_shortfall(self.resources, self.role, of_total=True)
            if why:
                raise TimeoutError(f"{e}; {why.rstrip()}") from e
            raise

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop the actors (no restart) and free the placement group.

        ``grace_s > 0``, for a run that ended well: each actor finishes its queued calls and exits on its own
        (``__ray_terminate__``: its atexit handlers run and no SIGTERM reaches it, so no worker prints a
        ``SystemExit`` traceback); any actor still alive after ``grace_s`` is killed. ``0`` (failures, where
        an actor may be stuck in a collective): kill at once.
        """
        if grace_s > 0 and self.actors:
            refs = [a.__ray_terminate__.remote() for a in self.actors]
            ray.wait(refs, num_returns=len(refs), timeout=grace_s)
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None


def create_actor_group(
    actor_cls: type | Any,
    resources: RoleResources,
    *,
    role: str,
    init_kwargs: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None = None,
    strategy: str | None = "PACK",
    env_vars: Mapping[str, str] | None = None,
    max_concurrency: int = 1,
    placement_timeout_s: float = 60.0,
) -> ActorGroup:
    """Create ``resources.count`` actors of ``actor_cls`` with the resources applied here, in rank order.

    Args:
        actor_cls: a plain class (wrapped with ``ray.remote`` here) or an existing Ray actor class.
        resources: the role's slice of the config's ``resources`` section (``RoleResources.from_config``);
            its ``custom`` resources are requested by every actor and bundle.
        role: a short role name for errors and the placement group's name (``"sampler"``, ...).
        init_kwargs: keyword arguments of the constructor, or ``rank -> kwargs`` when they differ per rank.
        strategy: placement-group strategy; None schedules without a placement group.
        env_vars: environment variables of the actors' processes.
        max_concurrency: concurrent calls per actor (1: calls run one at a time, in order).
        placement_timeout_s: how long to wait for the placement group.
    """
    if resources.count == 0:
        return ActorGroup(role=role, actors=[], resources=resources, placement_group=None)
    remote_cls = actor_cls if isinstance(actor_cls, ray.actor.ActorClass) else ray.remote(actor_cls)
    pg = None
    if strategy is not None:
        pg = create_placement_group(
            resources,
            strategy=strategy,
            name=f"rtdmd-{role}-{uuid.uuid4().hex[:8]}",
            timeout_s=placement_timeout_s,
            role=role,
        )
    actors = []
    for rank in range(resources.count):
        kwargs = init_kwargs(rank) if callable(init_kwargs) else dict(init_kwargs or {})
        options: dict[str, Any] = {
            "num_cpus": resources.cpus_per_actor,
            "num_gpus": resources.gpus_per_actor,
            "max_restarts": resources.max_restarts,
            "max_task_retries": resources.max_task_retries,
            "max_concurrency": max_concurrency,
        }
        if resources.custom:
            # inside a placement group Ray charges this to the actor's bundle (which reserved it)
            options["resources"] = dict(resources.custom)
        if pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=rank
            )
        if env_vars:
            options["runtime_env"] = {"env_vars": dict(env_vars)}
        actors.append(remote_cls.options(**options).remote(**kwargs))
    return ActorGroup(role=role, actors=actors, resources=resources, placement_group=pg)


# ---------------------------------------------------------------------------------------------------
# Learner group: the default torch.distributed process group among rank actors
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """The learner group's rendezvous: rank 0's node address and store port, backend, world size."""

    master_addr: str
    master_port: int
    backend: str
    world_size: int


def _serve_master_store(actor: Any, timeout_s: float) -> tuple[str, int]:
    """On rank 0: serve a TCPStore on a free port (kept on the actor) and return ``(ip, port)``."""
    import torch.distributed as dist

    from rtdmd_ray.roles.weight_sync import node_ip

    addr = node_ip()
    store = dist.TCPStore(addr, 0, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    actor._rtdmd_dist_store = store  # keep the server alive as long as the actor
    return addr, store.port


def _init_default_group(actor: Any, info: DistInfo, rank: int, timeout_s: float) -> int:
    """On every rank: ``init_process_group`` over rank 0's store; returns the rank torch sees."""
    import torch
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = getattr(actor, "_rtdmd_dist_store", None) if rank == 0 else None
    if store is None:
        store = dist.TCPStore(info.master_addr, info.master_port, None, False, timeout)
    # the usual env contract, for libraries that read it (FSDP helpers, logging)
    os.environ.update(
        {
            "MASTER_ADDR": info.master_addr,
            "MASTER_PORT": str(info.master_port),
            "RANK": str(rank),
            "WORLD_SIZE": str(info.world_size),
            "LOCAL_RANK": "0",
        }
    )
    if info.backend == "nccl":
        torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
    dist.init_process_group(info.backend, store=store, rank=rank, world_size=info.world_size, timeout=timeout)
    return dist.get_rank()


def init_learner_process_group(
    group: ActorGroup, *, backend: str | None = None, timeout_s: float = 120.0
) -> DistInfo:
    """Make ``group``'s actors ranks 0..N-1 of a default torch.distributed process group.

    Rank 0 serves the store on a free port of its node; every rank then joins concurrently. The
    backend defaults to ``nccl`` when the role has GPUs, else ``gloo``.
    """
    if backend is None:
        backend = "nccl" if group.resources.gpus_per_actor > 0 else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"learner backend {backend!r} must be 'gloo' (CPU) or 'nccl' (GPU)")
    if backend == "nccl" and group.resources.gpus_per_actor < 1:
        raise ValueError(
            "an NCCL learner group needs gpus_per_actor >= 1 (NCCL cannot put two ranks on one GPU)"
        )
    addr, port = gather(
        [group[0].__ray_call__.remote(_serve_master_store, timeout_s)],
        timeout_s=timeout_s,
        what=f"{group.role} rank 0 store",
    )[0]
    info = DistInfo(master_addr=addr, master_port=port, backend=backend, world_size=len(group))
    ranks = gather(
        group.map_ranked_async(lambda r, a: a.__ray_call__.remote(_init_default_group, info, r, timeout_s)),
        timeout_s=timeout_s,
        what=f"{group.role} init_process_group",
    )
    if ranks != list(range(len(group))):
        raise RuntimeError(f"{group.role}: torch.distributed ranks {ranks} do not match actor order")
    return info


def create_learner_group(
    actor_cls: type | Any,
    resources: RoleResources,
    *,
    init_kwargs: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None = None,
    backend: str | None = None,
    strategy: str = "PACK",
    timeout_s: float = 120.0,
) -> tuple[ActorGroup, DistInfo]:
    """Create the learner rank actors (one placement group, gang-scheduled) and their process group.

    Returns:
        ``(group, dist_info)``; in each actor ``torch.distributed`` is initialised with its rank.
    """
    if resources.count < 1:
        raise ValueError("the learner group needs resources.learner.count >= 1")
    group = create_actor_group(
        actor_cls,
        resources,
        role="learner",
        init_kwargs=init_kwargs,
        strategy=strategy,
        placement_timeout_s=timeout_s,
    )
    try:
        group.wait_ready(timeout_s=timeout_s)
        info = init_learner_process_group(group, backend=backend, timeout_s=timeout_s)
    except BaseException:
        group.shutdown()
        raise
    return group, info

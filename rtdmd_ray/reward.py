"""The reward role: ``RewardWorker`` (one scorer actor hosting every training reward) and ``RewardPool`` (the
driver-side dispatcher over the workers).

Scoring overlaps sampling: the driver gives the pool every sampler call's ``ScoreRequest`` ref at once, and
the pool dispatches each one to the least-loaded worker the moment the sampler finishes it (``ray.wait``),
while the samplers go on with their next calls. The pool tracks what is in flight on which worker, so work on
a worker that died is simply dispatched again (to the restarted actor or another one): every request is scored
exactly once.

A worker runs ``MultiScorer`` semantics (spec rewards-inference.md §2): each reward in config order with its
own ``rewards.batch_images``, on 8-bit images; the weighted total and the NaN/inf quarantine mask are built by
``ScoredBatch.from_scores``, so a quarantined sample never reaches the advantages as a number.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rtdmd_ray.config import RewardsConfig, resolve_path
from rtdmd_ray.types import ScoredBatch


def resolve_scorer_options(
    options: Mapping[str, Mapping[str, Any]], names: Sequence[str] | Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """``rewards.options`` for ``names`` with repository-relative ``model`` directories made absolute (a hub
    id, or a path that does not exist, is passed through)."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        opts = dict(options.get(name, {}))
        model = opts.get("model")
        if isinstance(model, str) and model and Path(resolve_path(model)).exists():
            opts["model"] = str(resolve_path(model))
        out[name] = opts
    return out


class RewardWorker:
    """One reward actor: every training scorer of ``rewards.weights`` (weights load here, so a missing one
    fails at pool start).

    Args:
        rewards: the ``rewards`` section.
        worker_id: index in the pool (metrics, errors).
        threads: intra-op CPU threads.
    """

    def __init__(self, *, rewards: RewardsConfig, worker_id: int, threads: int = 1):
        from rtdmd_ray.rewards.multi import MultiScorer

        torch.set_num_threads(max(1, threads))
        self.cfg, self.worker_id = rewards, worker_id
        device = rewards.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.scorer = MultiScorer(
            dict(rewards.weights),
            ckpt_dir=rewards.ckpt_dir or None,
            device=device,
            batch_images=dict(rewards.batch_images),
            options=resolve_scorer_options(rewards.options, rewards.weights),
        )
        self.images_scored, self.busy_s = 0, 0.0

    def score(self, request: Any) -> ScoredBatch:
        """Scores of one ``rollout.ScoreRequest`` (uint8 images ``[N, 3, H, W]``), same order, as a
        ``ScoredBatch``."""
        t0 = time.perf_counter()
        out = self.scorer(request.images.float() / 255.0, list(request.prompts), list(request.metadata))
        out.pop("mean")  # ScoredBatch.total is the weighted sum over the finite rewards
        scored = ScoredBatch.from_scores(out, self.scorer.weights)
        self.images_scored += len(scored)
        self.busy_s += time.perf_counter() - t0
        return scored

    def stats(self) -> dict[str, float]:
        return {"images_scored": float(self.images_scored), "busy_s": self.busy_s}


class RewardPool:
    """The reward workers (``resources.reward_worker``) and the dispatcher that feeds them.

    Args:
        rewards: the ``rewards`` section; resources: ``resources.reward_worker``.
        timeout_s: the longest a scoring phase may take.
        max_attempts: how often one request is dispatched before the pool gives up (worker deaths).
    """

    def __init__(
        self, *, rewards: RewardsConfig, resources: Any, timeout_s: float = 3600.0, max_attempts: int = 3
    ):
        from rtdmd_ray.groups import RoleResources, create_actor_group

        r = resources
        res = RoleResources(
            count=r.count,
            cpus_per_actor=r.cpus_per_actor,
            gpus_per_actor=r.gpus_per_actor,
            max_restarts=r.max_restarts,
            max_task_retries=0,
        )  # re-dispatch is the pool's job
        if r.count < 1:
            raise ValueError(
                "resources.reward_worker.count must be >= 1: the RL stage scores on the reward pool"
            )
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self.group = create_actor_group(
            RewardWorker,
            res,
            role="reward",
            strategy=r.placement,
            init_kwargs=lambda i: {
                "rewards": rewards,
                "worker_id": i,
                "threads": max(1, math.floor(r.cpus_per_actor)),
            },
        )
        try:
            self.group.wait_ready(timeout_s=min(timeout_s, 600.0))
        except BaseException:
            self.group.shutdown()
            raise
        self.inflight = [0] * len(self.group)
        self.redispatched = 0

    def __len__(self) -> int:
        return len(self.group)

    def _dispatch(
        self, key: Any, request_ref: Any, pending: dict[Any, tuple[Any, Any, int, int]], attempt: int
    ) -> None:
        w = min(range(len(self.inflight)), key=lambda i: (self.inflight[i], i))  # least loaded
        self.inflight[w] += 1
        pending[self.group[w].score.remote(request_ref)] = (key, request_ref, w, attempt)

    def score(self, jobs: Sequence[Any]) -> tuple[dict[Any, ScoredBatch], dict[str, float]]:
        """Score every job's ``request_ref`` as soon as its sampler call finishes; wait for all of them.

        Args:
            jobs: objects with ``key`` and ``request_ref`` (``rollout.RolloutJob``).

        Returns:
            ``({key: ScoredBatch}, metrics)``: ``timing/reward_wait_s`` is the time spent after the last
            sampler call finished (the scoring the samplers could not hide).
        """
        import ray

        waiting = {j.request_ref: j.key for j in jobs}
        pending: dict[Any, tuple[Any, Any, int, int]] = {}
        results: dict[Any, ScoredBatch] = {}
        deadline = time.monotonic() + self.timeout_s
        sampled_at = None
        while waiting or pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"reward pool: {len(waiting)} sampler calls and {len(pending)} scoring calls "
                    f"not done after {self.timeout_s} s; check the sampler/reward actors' logs"
                )
            ready, _ = ray.wait([*waiting, *pending], num_returns=1, timeout=left)
            for ref in ready:
                if ref in waiting:  # a sampler call finished: its images go to the pool now
                    self._dispatch(waiting.pop(ref), ref, pending, attempt=1)
                    if not waiting:
                        sampled_at = time.monotonic()
                    continue
                key, request_ref, w, attempt = pending.pop(ref)
                self.inflight[w] -= 1
                try:
                    results[key] = ray.get(ref)
                except ray.exceptions.RayActorError as e:  # the worker died holding it: dispatch again
                    if attempt >= self.max_attempts:
                        raise RuntimeError(
                            f"reward request {key} failed on {attempt} workers; last: {e}"
                        ) from e
                    self.redispatched += 1
                    self._dispatch(key, request_ref, pending, attempt + 1)
        wait_s = time.monotonic() - sampled_at if sampled_at is not None else 0.0
        return results, {"timing/reward_wait_s": wait_s, "reward/pool/redispatched": float(self.redispatched)}

    def shutdown(self) -> None:
        self.group.shutdown()


def reward_metrics(scored: ScoredBatch) -> dict[str, float]:
    """``reward/<name>/mean`` per scorer key (finite values; the ``-10`` not-applicable sentinel of per-tag
    keys left out, as in eval), ``reward/total/mean|std`` over valid samples, ``reward/total/quarantined``."""
    from rtdmd_ray.rewards._common import SENTINEL

    valid = scored.valid
    out = {"reward/total/quarantined": float(scored.num_quarantined)}
    if bool(valid.any()):
        out["reward/total/mean"] = float(scored.total[valid].mean())
        out["reward/total/std"] = float(scored.total[valid].std(correction=0))
    for name, values in scored.scores.items():
        keep = torch.isfinite(values) & (values != SENTINEL)
        if bool(keep.any()):
            out[f"reward/{name}/mean"] = float(values[keep].mean())
    return out

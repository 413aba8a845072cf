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
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rtdmd_ray.config import RewardsConfig
from rtdmd_ray.roles.judge_serve import delete_app, ensure_judge_app, scorer_options
from rtdmd_ray.types import ScoredBatch


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
            options=scorer_options(rewards.options, rewards.weights),
        )
        self.images_scored, self.busy_s = 0, 0.0
        self._poison: tuple[str, int] | None = None

    def poison(self, name: str, count: int) -> None:
        """Test hook: the reward ``name`` of the next ``count`` samples scored here is NaN."""
        self._poison = (name, count)

    def score(self, request: Any) -> ScoredBatch:
        """Scores of one ``rollout.ScoreRequest`` (uint8 images ``[N, 3, H, W]``), same order, as a
        ``ScoredBatch``."""
        t0 = time.perf_counter()
        out = self.scorer(request.images.float() / 255.0, list(request.prompts), list(request.metadata))
        out.pop("mean")  # ScoredBatch.total is the weighted sum over the finite rewards
        if self._poison:  # test hook: make the next samples' reward NaN (the quarantine path end to end)
            name, count = self._poison
            k = min(count, len(out[name]))
            out[name] = out[name].clone()
            out[name][:k] = math.nan
            self._poison = (name, count - k) if count > k else None
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
        wait: wait here until the workers are up; False = ``wait_ready()`` later.
        timeout_s: the longest a scoring phase may take.
        max_attempts: how often one request is dispatched before the pool gives up (worker deaths).
    """

    def __init__(
        self,
        *,
        rewards: RewardsConfig,
        resources: Any,
        wait: bool = True,
        timeout_s: float = 3600.0,
        max_attempts: int = 3,
    ):
        from rtdmd_ray.roles.groups import RoleResources, create_actor_group

        r = resources
        res = RoleResources.from_config(r, max_task_retries=0)  # re-dispatch is the pool's job
        if r.count < 1:
            raise ValueError(
                "resources.reward_worker.count must be >= 1: the RL stage scores on the reward pool"
            )
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self.judge_app = ensure_judge_app(rewards, rewards.weights)  # before the workers resolve its endpoint
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
        self.inflight = [0] * len(self.group)
        self._ready_timeout_s = min(timeout_s, 600.0)
        self.redispatched = 0  # requests dispatched again after a reward worker died (whole run)
        self.resubmitted = 0  # sampler calls submitted again after a sampler died (whole run)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every reward worker has built its scorers (after ``wait=False``)."""
        try:
            self.group.wait_ready(timeout_s=self._ready_timeout_s)
        except BaseException:
            self.group.shutdown()
            raise

    def __len__(self) -> int:
        return len(self.group)

    def _dispatch(self, job: Any, request_ref: Any, pending: dict[Any, tuple[Any, Any, int, int]],
                  attempt: int) -> None:
        w = min(range(len(self.inflight)), key=lambda i: (self.inflight[i], i))  # least loaded
        if self.inflight[w] == 0:
            self._busy_since[w] = time.monotonic()
        self.inflight[w] += 1
        self._depth_max[w] = max(self._depth_max[w], self.inflight[w])
        pending[self.group[w].score.remote(request_ref)] = (job, request_ref, w, attempt)

    def _done(self, w: int) -> None:
        self.inflight[w] -= 1
        if self.inflight[w] == 0:  # a worker is busy while it holds at least one request
            self._busy_s[w] += time.monotonic() - self._busy_since[w]

    def score(
        self, jobs: Sequence[Any], resubmit: Callable[[Any], Any] | None = None
    ) -> tuple[dict[Any, ScoredBatch], dict[str, float]]:
        """Score every job's ``request_ref`` as soon as its sampler call finishes; wait for all of them.

        Args:
            jobs: objects with ``key`` and ``request_ref`` (``rollout.RolloutJob``; its ``stats_ref`` tells a
                failed sampler call apart from a finished one).
            resubmit: called with a job whose sampler died holding it (``SamplerGroup.resubmit``); it
                points the job at a new call in place. None: a failed sampler call fails the phase.

        Returns:
            ``({key: ScoredBatch}, metrics)``: ``timing/reward_wait_s`` is the time spent after the last
            sampler call finished (the scoring the samplers could not hide); per worker the images scored per
            busy second, the deepest queue and the busy seconds (the driver turns them into idle fractions).
        """
        import ray

        n_workers = len(self.inflight)
        self._busy_s, self._busy_since = [0.0] * n_workers, [0.0] * n_workers
        self._depth_max = [0] * n_workers
        images = [0] * n_workers
        waiting = {j.request_ref: j for j in jobs}
        pending: dict[Any, tuple[Any, Any, int, int]] = {}
        results: dict[Any, ScoredBatch] = {}
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
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
                    job = take_sampled_call(waiting, ref, resubmit)
                    if job is None:  # its sampler died: sampled again
                        self.resubmitted += 1
                        continue
                    self._dispatch(job, ref, pending, attempt=1)
                    if not waiting:
                        sampled_at = time.monotonic()
                    continue
                job, request_ref, w, attempt = pending.pop(ref)
                self._done(w)
                try:
                    results[job.key] = ray.get(ref)
                    images[w] += len(results[job.key])
                except ray.exceptions.RayActorError as e:  # the worker died holding it: dispatch again
                    if attempt >= self.max_attempts:
                        raise RuntimeError(
                            f"reward request {job.key} failed on {attempt} workers; last: {e}"
                        ) from e
                    self.redispatched += 1
                    self._dispatch(job, request_ref, pending, attempt + 1)
        wall = time.monotonic() - t0
        m = {
            "timing/reward_wait_s": time.monotonic() - sampled_at if sampled_at is not None else 0.0,
            "reward/pool/redispatched": float(self.redispatched),
            "rollout/resubmitted": float(self.resubmitted),
            "reward/pool/scores_per_s": sum(images) / max(wall, 1e-9),
        }
        for w in range(n_workers):
            m[f"reward/pool/worker_{w}/scores_per_s"] = images[w] / max(self._busy_s[w], 1e-9)
            m[f"reward/pool/worker_{w}/queue_depth_max"] = float(self._depth_max[w])
            m[f"reward/pool/worker_{w}/busy_s"] = self._busy_s[w]
        return results, m

    def poison(self, name: str, count: int) -> None:
        """Test hook: the reward ``name`` of the next ``count`` samples reward worker 0 scores is NaN."""
        import ray

        ray.get(self.group[0].poison.remote(name, count))

    def shutdown(self, grace_s: float = 0.0) -> None:
        self.group.shutdown(grace_s)
        if self.judge_app:  # the GenEval2 judge's app this run started
            delete_app(self.judge_app)


def take_sampled_call(
    waiting: dict[Any, Any], ref: Any, resubmit: Callable[[Any], Any] | None
) -> Any | None:
    """The job whose sampler call ``ref`` finished, taken out of ``waiting`` ({request ref: job}); None when
    its sampler died and the job was submitted again (``resubmit``; back in ``waiting`` under its new ref)."""
    job = waiting.pop(ref)
    if resubmit is not None and _source_failed(job):
        job = resubmit(job)
        waiting[job.request_ref] = job
        return None
    return job


def _source_failed(job: Any) -> bool:
    """True when the sampler call behind ``job`` failed because its actor died (not a sampling bug)."""
    import ray

    stats_ref = getattr(job, "stats_ref", None)
    if stats_ref is None:
        return False
    try:
        ray.get(stats_ref)
    except ray.exceptions.RayActorError:
        return True
    return False


def quarantine_warning(scored: ScoredBatch, epoch: int) -> str | None:
    """One line for an epoch with quarantined samples (which rewards were NaN/inf, how often), else None."""
    if scored.num_quarantined == 0:
        return None
    bad = {k: int((~torch.isfinite(scored.scores[k])).sum()) for k in scored.weights}
    names = ", ".join(f"{k}: {n}" for k, n in bad.items() if n)
    return (
        f"epoch {epoch}: {scored.num_quarantined}/{scored.count} samples quarantined (non-finite reward; "
        f"{names}); they get advantage 0 and stay out of the reward statistics"
    )


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


def tag_reward_metrics(scored: ScoredBatch, metadata: list[dict[str, Any]]) -> dict[str, float]:
    """``reward/by_tag/<tag>/total``: the mean trained reward (``scored.total``) of each prompt tag's valid
    samples, so a gain on the weak tags shows even when a dominant tag hides it in the overall mean;
    ``reward/by_tag/<tag>/share``: the tag's fraction of the epoch's samples. Records without a tag are
    left out (non-ShapeWorld prompt sets usually have none)."""
    if len(metadata) != len(scored):
        raise ValueError(f"{len(metadata)} prompt records for {len(scored)} scored samples")
    tags = [m.get("tag") for m in metadata]
    out: dict[str, float] = {}
    for tag in sorted({t for t in tags if t is not None}, key=str):
        pick = torch.tensor([t == tag for t in tags]) & scored.valid
        out[f"reward/by_tag/{tag}/share"] = float(sum(t == tag for t in tags)) / max(1, len(tags))
        if bool(pick.any()):
            out[f"reward/by_tag/{tag}/total"] = float(scored.total[pick].mean())
    return out

"""The RTDMD RL stage, end to end (spec algorithms.md §3.8): read this file first.

One epoch is SAMPLE -> SCORE -> ADVANTAGE + UPDATE -> SYNC WEIGHTS -> LOG / CHECKPOINT, each phase one call
into a role:

* ``SamplerGroup`` (roles/sampler.py): K-repeat prompt groups, 4-step CPS trajectories with log-probs, SubGRPO
  shared noise, decoded images; every ``RolloutBatch`` carries the policy version that sampled it.
* ``RewardPool`` (roles/reward_pool.py): each sampler call's images are scored the moment that call finishes,
  so scoring overlaps sampling.
* ``RLLearnerGroup`` (roles/learner.py, the update itself in stages/rl_step.py): per rank, the fake-score
  update, the advantages over all ranks, then the generator update (PPO on the selected steps + AC-DMD aux +
  reward BP), one optimiser step per epoch by default.
* weight sync (roles/weight_sync.py): the generator LoRA goes to every sampler as policy version
  ``epoch + 1``.

The Stage 1 loop is its peer ``cold_start.py``; the layers are drawn in docs/architecture.md.

A learner rank that dies ends the job: the group kills its ranks (the survivors may block in a collective),
``train`` stops the other roles and raises ``LearnerFailure`` naming the rank, the epoch and the checkpoint
that resubmitting the same command (``train.resume: auto``) continues from.

On-policy by default: epoch ``e`` is sampled with version ``e`` (the weights after ``e`` updates), so the PPO
ratio is 1. ``grpo.max_policy_lag: 1`` starts sampling epoch ``e + 1`` with version ``e`` before the learner
trains on epoch ``e``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

from rtdmd_ray.config import Config, ConfigError, to_dict


def check_rl_config(cfg: Config) -> Config:
    """Validate before any actor starts; returns the config."""
    if cfg.stage != "rtdmd":
        raise ConfigError(f"stage={cfg.stage!r}: rtdmd-ray train runs the RL stage; set stage: rtdmd")
    return cfg.validate()


def train(
    cfg: Config,
    *,
    ray_address: str | None = None,
    on_epoch: Callable[[int, dict[str, float], dict[str, Any]], None] | None = None,
    record_noise: bool = False,
) -> dict[str, Any]:
    """Run the RL stage of ``cfg``: start the roles, train ``train.iterations`` epochs, stop the roles.

    Args:
        cfg: a ``stage: rtdmd`` config.
        ray_address: the Ray cluster to join when Ray is not initialised (default ``$RAY_ADDRESS``, else a
            private local one).
        on_epoch: called after every epoch with ``(epoch, metrics, roles)`` (tests inspect the roles).
        record_noise: samplers keep their CPS noise in the rollouts (tests).

    Returns:
        ``{"output_dir", "epochs", "policy_version", "metrics": [this run's per-epoch metrics], "checkpoint",
        "final_lora"}`` (``final_lora``: the EMA RL LoRA, to stack on the cold-start LoRA at inference).
    """
    from rtdmd_ray.data.prompts import training_prompt_records
    from rtdmd_ray.roles.groups import STOP_GRACE_S, init_ray
    from rtdmd_ray.roles.learner import LearnerFailure, RLLearnerGroup
    from rtdmd_ray.roles.reward_pool import (
        quarantine_warning,
        reward_metrics,
        tag_reward_metrics,
    )
    from rtdmd_ray.roles.sampler import SamplerGroup, epoch_prompt_jobs, epoch_train_steps
    from rtdmd_ray.runs import checkpoint as ckpt
    from rtdmd_ray.runs.logger import MetricsLogger
    from rtdmd_ray.runs.metrics import RayMetrics, idle_fractions
    from rtdmd_ray.types import ScoredBatch

    check_rl_config(cfg)
    g, t = cfg.grpo, cfg.train
    out, resume_from = ckpt.prepare_run_dir(cfg)
    r = cfg.resources
    init_ray(ray_address, sum(x.count * x.cpus_per_actor for x in (r.sampler, r.learner)) + reward_cpus(cfg))
    records = training_prompt_records(cfg.data)
    eval_every = cfg.eval.every_iterations if cfg.eval.enabled else 0

    roles: dict[str, Any] = {}
    logger = None
    grace_s = 0.0  # a failure kills the roles at once (a rank may be stuck in a collective)
    try:
        # the reward models load while the learners and samplers do; a reward that fails is reported below
        roles["rewards"] = rewards = start_rewards(cfg, wait=False)
        roles["learners"] = learners = RLLearnerGroup(cfg)
        roles["samplers"] = samplers = SamplerGroup(cfg, record_noise=record_noise)
        rewards.wait_ready()
        # policy version = epochs (generator updates) done; samplers start from the learner's weights
        start = learners.load_checkpoint(str(resume_from)) if resume_from else 0
        version = start
        # a pipelined run sampled epoch `start` with the weights before the last update: so does its resume
        first = start - 1 if g.max_policy_lag and start > 0 else start
        connected = connect_weight_sync(cfg, learners, samplers, first, previous=first < start)
        logger = MetricsLogger(cfg=cfg.logging, output_dir=out, total_iterations=t.iterations, desc="rtdmd",
                               start_iteration=start, run_config=to_dict(cfg))
        dashboard = RayMetrics(enabled=cfg.logging.ray_metrics, run=cfg.logging.run_name or out.name)
        logger.write(f"rtdmd: {cfg.summary()}")
        logger.write(f"learner: {learners.info}; resumed from {resume_from or 'nothing (fresh start)'}")
        logger.write(f"weight sync: policy v{first} ({connected['sync/bytes']:.0f} bytes) reached "
                     f"{len(samplers)} sampler(s) in {connected['sync/seconds']:.2f} s")

        def sample(epoch: int, policy_version: int) -> tuple[list[Any], tuple[int, ...]]:
            steps = epoch_train_steps(g, t.seed, epoch)
            jobs = epoch_prompt_jobs(records, grpo=g, seed=t.seed, epoch=epoch, num_samplers=len(samplers),
                                     policy_version=policy_version)
            return samplers.sample_async(jobs, steps), steps

        def resync(want: int) -> None:  # a restarted sampler holds no weights: re-form the group, re-send
            if learners.call("policy_version")[0] != want:
                raise RuntimeError(f"a sampler died holding policy v{want} work but the learner moved on "
                                   "(grpo.max_policy_lag: 1); resubmit the job to resume from its checkpoint")
            logger.write(f"sampler restarted: re-syncing policy v{want} to every sampler")
            connect_weight_sync(cfg, learners, samplers, want)

        def evaluate(epoch: int) -> None:
            em = learners.evaluate(str(out / "eval" / f"epoch_{epoch:06d}.png"))
            logger.log(epoch, em)
            dashboard.record(em)

        history: list[dict[str, float]] = []
        last_ckpt = str(resume_from) if resume_from else None
        in_flight = sample(start, first) if start < t.iterations else None
        if first < start:
            sync_weights(learners, samplers, version)  # the samplers get it after sampling epoch `start`
        for epoch in range(start, t.iterations):
            t_epoch = time.perf_counter()
            if eval_every and epoch % eval_every == 0:
                evaluate(epoch)  # on the learners (EMA generator) while the samplers work
            # ---------------------------------------------------------------- SAMPLE + SCORE (overlapped)
            jobs, steps = in_flight
            scored_by_key, m = rewards.score(jobs, resubmit=lambda job: samplers.resubmit(job, resync))
            m["timing/sample_score_s"] = time.perf_counter() - t_epoch
            scored = ScoredBatch.cat([scored_by_key[j.key] for j in jobs])
            m |= reward_metrics(scored) | samplers.epoch_stats(jobs)
            m |= tag_reward_metrics(scored, [r for j in jobs for r in j.prompts.metadata])
            if warning := quarantine_warning(scored, epoch):  # once per epoch, never averaged in silently
                warnings.warn(warning, RuntimeWarning, stacklevel=1)
            if g.max_policy_lag and epoch + 1 < t.iterations:  # pipelined: next epoch on the current weights
                in_flight = sample(epoch + 1, version)
            # ---------------------------------------------------------------- ADVANTAGE + UPDATE
            t0 = time.perf_counter()
            m |= learners.update(epoch, jobs, scored)
            m["timing/update_s"] = time.perf_counter() - t0
            version = epoch + 1
            # ---------------------------------------------------------------- SYNC WEIGHTS
            if samplers.restarted_since_sync():  # died idle, e.g. during the update: re-form the group
                m |= connect_weight_sync(cfg, learners, samplers, version)
            else:
                m |= sync_weights(learners, samplers, version)
            m["rollout/sampler_restarts"] = float(samplers.restarts_seen)  # including any seen just now
            if not g.max_policy_lag and epoch + 1 < t.iterations:  # on-policy: sample with the new weights
                in_flight = sample(epoch + 1, version)
            # ---------------------------------------------------------------- LOG / CHECKPOINT
            m |= {"rollout/images": float(scored.count), "rollout/train_steps": float(len(steps)),
                  "rollout/policy_version": float(version), "timing/epoch_s": time.perf_counter() - t_epoch}
            m["rollout/images_per_s"] = m["rollout/images"] / max(m["timing/sample_score_s"], 1e-9)
            m |= idle_fractions(m, m["timing/epoch_s"])
            history.append(m)
            logger.log(epoch + 1, m, echo=(epoch + 1) % t.log_every_iterations == 0)
            dashboard.record(m)  # the same keys and values as the jsonl line (metrics.prometheus_series)
            logger.advance(1, m)
            if (epoch + 1) % t.save_every_iterations == 0 or epoch + 1 == t.iterations:
                last_ckpt = learners.save_checkpoint(str(out), t.keep_last_checkpoints)
            if on_epoch is not None:
                on_epoch(epoch, m, roles)
        if eval_every and t.iterations % eval_every:
            evaluate(t.iterations)
        final = str(ckpt.export_final(last_ckpt, out)) if last_ckpt else None  # the EMA RL LoRA
        if final:
            logger.write(f"final RL generator LoRA (stack it on the cold-start LoRA): {final}")
        grace_s = STOP_GRACE_S  # ended well: each actor exits on its own, no SIGTERM traceback
        return {"output_dir": str(out), "epochs": t.iterations, "policy_version": version, "metrics": history,
                "checkpoint": last_ckpt, "final_lora": final}
    except LearnerFailure as e:  # the group is already killed; the finally stops the other roles
        if logger is not None:
            logger.write(f"rtdmd stopped: {e}")
        raise
    finally:
        if logger is not None:
            logger.close()
        for key in ("rewards", "samplers", "learners"):  # the producers' consumers first
            if key in roles:
                roles[key].shutdown(grace_s)


# ---------------------------------------------------------------------------------------------- helpers
def start_rewards(cfg: Config, *, wait: bool = True) -> Any:
    """The reward role: one autoscaled Ray Serve deployment per reward (``rewards.serving: serve``, or
    attached to ``rewards.serve_app``), or the fixed actor pool (``actors``); both score with ``MultiScorer``
    semantics into ``ScoredBatch``es."""
    if cfg.rewards.serving == "serve":
        from rtdmd_ray.roles.reward_serve import RewardServePool

        return RewardServePool(rewards=cfg.rewards, wait=wait)
    from rtdmd_ray.roles.reward_pool import RewardPool

    return RewardPool(rewards=cfg.rewards, resources=cfg.resources.reward_worker, wait=wait)


def reward_cpus(cfg: Config) -> float:
    """The CPUs the reward role may hold at most (a local cluster is sized to fit them)."""
    if cfg.rewards.serving == "serve":
        from rtdmd_ray.roles.reward_serve import serve_cpus

        return serve_cpus(cfg.rewards, list(cfg.rewards.weights))
    r = cfg.resources.reward_worker
    return r.count * r.cpus_per_actor


def connect_weight_sync(
    cfg: Config, learners: Any, samplers: Any, version: int, previous: bool = False
) -> dict[str, float]:
    """Form the learner -> sampler sync group and send the starting weights as ``version`` (``previous``:
    the learner's weights before its last update)."""
    import torch

    transport = cfg.sync.transport
    if transport == "auto":
        transport = (
            "nccl" if cfg.resources.sampler.gpus_per_actor > 0 and torch.cuda.is_available() else "gloo"
        )
    endpoint = learners.call(
        "open_weight_sync", transport, len(samplers), float(cfg.sync.bucket_mib), float(cfg.sync.timeout_s)
    )[0]
    samplers.join_weight_sync(endpoint)
    return sync_weights(learners, samplers, version, previous)


def sync_weights(learners: Any, samplers: Any, version: int, previous: bool = False) -> dict[str, float]:
    """Learner rank 0 -> every sampler: the generator LoRA as policy ``version`` (samplers check the
    version)."""
    t0 = time.perf_counter()
    ticket = learners.call("send_weights", version, previous)[0]
    versions = samplers.recv_weights(ticket)
    learners.call("finish_send")
    if set(versions) != {version}:
        raise RuntimeError(f"samplers hold policy versions {versions} after syncing version {version}")
    return {
        "sync/seconds": time.perf_counter() - t0,
        "sync/bytes": float(ticket.nbytes),
        "sync/version": float(version),
    }



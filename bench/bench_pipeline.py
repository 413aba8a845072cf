"""P1 and P2 (issue 10): the Ray pipeline against the reference's sequential design, and reward-pool scaling.

Both use the synthetic ``latency`` scorer: a fixed service time per scoring call (``--service-s``), as a
served VLM judge has, and a deterministic score.

* **P1** (goal >= 1.5): epoch wall time of a single-process loop doing the same algorithm and work the way the
  reference does it (sample a batch, then score it, ..., then learn) divided by the Ray pipeline's epoch time
  (``driver.train``: 1 sampler, 2 reward workers, 1 learner rank; each sampler call's images are scored while
  the sampler goes on). Both run the tiny SD3 debug config with the same batches; the first epoch (warm-up) is
  dropped and the median of the rest is compared.
* **P2** (goal >= 3.2): reward-pool throughput (images/s) with 4 workers divided by 1 worker, on
  ``--requests`` ready requests of ``--images`` images each.

Not a timed test; on a shared 2-core machine the numbers move with the load, so compare ratios from one run.

    source scripts/env.sh && nice -n 15 .venv/bin/python bench/bench_pipeline.py --service-s 1.0
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def p1_config(service_s: float, epochs: int, out: str):
    from rtdmd_ray.config import load_config

    return load_config(REPO / "configs" / "debug" / "tiny_sd3.yaml", [
        "rewards.weights={latency: 1.0}", f"rewards.options={{latency: {{seconds_per_batch: {service_s}}}}}",
        "last_step_loss.bp.enabled=false", "eval.enabled=false", f"train.iterations={epochs}",
        f"train.output_dir={out}", "train.save_every_iterations=1000", "resources.learner.count=1",
        "resources.sampler.count=1", "resources.reward_worker.count=2", "grpo.sampler_micro_batch_images=4",
        "logging.stdout=false", "logging.jsonl=false"])


def sequential_epochs(cfg: Any) -> list[float]:
    """The reference's design in one process: every sampler call, then its scoring, then the learner
    update."""
    from rtdmd_ray.data.prompts import training_prompt_records
    from rtdmd_ray.models.lora import load_lora_state
    from rtdmd_ray.roles.reward_pool import RewardWorker
    from rtdmd_ray.roles.sampler import RolloutWorker, epoch_prompt_jobs, epoch_train_steps
    from rtdmd_ray.stages.rl_state import RLLearnerState
    from rtdmd_ray.stages.rl_step import RLUpdate, learner_sigmas
    from rtdmd_ray.types import RolloutBatch, ScoredBatch

    torch.set_num_threads(1)
    state = RLLearnerState(model=cfg.model, solver=cfg.solver, train=cfg.train, parallelism="ddp")
    rl = RLUpdate(state=state, grpo=cfg.grpo, last_step_loss=cfg.last_step_loss, sampling=cfg.sampling,
                  dmd=cfg.dmd, ac_dmd=cfg.ac_dmd, train=cfg.train, rewards=cfg.rewards,
                  micro_batches_per_epoch=cfg.micro_batches_per_rank_per_epoch,
                  micro_batches_per_step=cfg.micro_batches_per_optimizer_step,
                  sigmas=learner_sigmas(state, cfg.model, cfg.sampling))
    sampler = RolloutWorker(model=cfg.model, sampling=cfg.sampling, grpo=cfg.grpo, train=cfg.train,
                            sampler_id=0)
    scorer = RewardWorker(rewards=cfg.rewards, worker_id=0)
    records = training_prompt_records(cfg.data)
    times = []
    for epoch in range(cfg.train.iterations):
        t0 = time.perf_counter()
        load_lora_state(sampler.backbone.transformer, "generator", state.full_lora("generator"))
        sampler.version = epoch
        steps = epoch_train_steps(cfg.grpo, cfg.train.seed, epoch)
        jobs = epoch_prompt_jobs(records, grpo=cfg.grpo, seed=cfg.train.seed, epoch=epoch, num_samplers=1,
                                 policy_version=epoch)
        batches, scores = [], []
        for job in jobs:
            batch, request = sampler.sample(job.prompts, steps)
            batches.append(batch)
            scores.append(scorer.score(request))
        rl.run_epoch(RolloutBatch.cat(batches), ScoredBatch.cat(scores), epoch, max_policy_lag=0)
        times.append(time.perf_counter() - t0)
        print(f"  sequential epoch {epoch}: {times[-1]:.2f} s", flush=True)
    return times


def pipeline_epochs(cfg: Any) -> list[float]:
    from rtdmd_ray.driver import train

    res = train(cfg)
    times = [m["timing/epoch_s"] for m in res["metrics"]]
    for i, t in enumerate(times):
        print(f"  pipeline epoch {i}: {t:.2f} s", flush=True)
    return times


@dataclass
class _Job:
    key: int
    request_ref: Any


def pool_seconds(workers: int, *, service_s: float, requests: int, images: int) -> float:
    """Seconds for a pool of ``workers`` to score ``requests`` ready requests (pool start-up excluded)."""
    import ray

    from rtdmd_ray.config import RewardsConfig, RoleResourcesConfig
    from rtdmd_ray.roles.reward_pool import RewardPool
    from rtdmd_ray.roles.sampler import ScoreRequest

    rewards = RewardsConfig(weights={"latency": 1.0}, device="cpu",
                            options={"latency": {"seconds_per_batch": service_s}})
    pool = RewardPool(rewards=rewards, resources=RoleResourcesConfig(count=workers, cpus_per_actor=0.25))
    try:
        g = torch.Generator().manual_seed(0)
        jobs = [_Job(i, ray.put(ScoreRequest(torch.randint(0, 256, (images, 3, 32, 32), generator=g,
                                                           dtype=torch.uint8),
                                             [f"p{i}"] * images, [{}] * images))) for i in range(requests)]
        pool.score(jobs[:workers])  # warm-up: every worker has scored once
        t0 = time.perf_counter()
        results, _ = pool.score(jobs)
        seconds = time.perf_counter() - t0
        assert len(results) == requests
        return seconds
    finally:
        pool.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--service-s", type=float, default=1.0, help="latency scorer seconds per scoring call")
    ap.add_argument("--epochs", type=int, default=4, help="P1 epochs per side (the first is warm-up)")
    ap.add_argument("--requests", type=int, default=16, help="P2 scoring requests")
    ap.add_argument("--images", type=int, default=8, help="P2 images per request")
    ap.add_argument("--skip", choices=("p1", "p2"), action="append", default=[])
    args = ap.parse_args()

    import ray

    tmp = tempfile.mkdtemp(prefix="rtb-", dir="/tmp")
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    try:
        if "p2" not in args.skip:
            print(f"P2: reward pool, latency scorer {args.service_s} s/call, "
                  f"{args.requests} x {args.images} images")
            t1 = pool_seconds(1, service_s=args.service_s, requests=args.requests, images=args.images)
            t4 = pool_seconds(4, service_s=args.service_s, requests=args.requests, images=args.images)
            n = args.requests * args.images
            print(f"  1 worker: {n / t1:.1f} images/s; 4 workers: {n / t4:.1f} images/s; "
                  f"P2 = {t1 / t4:.2f} (goal >= 3.2)")
        if "p1" not in args.skip:
            out = tempfile.mkdtemp(prefix="rtb-p1-", dir="/tmp")
            cfg = p1_config(args.service_s, args.epochs, out)
            print(f"P1: {cfg.summary()}")
            seq = sequential_epochs(cfg)
            pipe = pipeline_epochs(cfg)
            s, p = statistics.median(seq[1:]), statistics.median(pipe[1:])
            print(f"  sequential {s:.2f} s/epoch, Ray pipeline {p:.2f} s/epoch; "
                  f"P1 = {s / p:.2f} (goal >= 1.5)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

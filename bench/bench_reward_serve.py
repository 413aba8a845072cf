"""Rewards on Ray Serve (``rewards.serving: serve``) against a fixed replica and the old actor pool.

One run on a private local Ray (logical CPUs, so several 0.25-CPU replicas fit on a small machine) measures:

* **Epoch time, fixed vs autoscaling** (goal >= 1.5): ``--epochs`` back-to-back scoring phases
  (``RewardServePool.score``) of ``--jobs`` sampler-call jobs x ``--images`` images on the latency-bound
  ``latency`` reward (it sleeps ``--seconds-per-batch`` per micro-batch of ``--batch-images``), once with one
  fixed replica (``min_replicas = max_replicas = 1``) and once autoscaled (``min_replicas = 1``,
  ``max_replicas = --max-replicas``, a short upscale delay, a downscale delay longer than the run). The ratio
  is the fixed configuration's steady-state mean epoch time over the autoscaled one's; steady state = the
  epochs that start after the autoscaled deployment reached its max replicas (same epoch indices on both
  sides).
* **Scale-up time** (goal <= 30 s): seconds from the first request of the autoscaled configuration's first
  epoch until ``replica_counts(app)["latency"]`` first reads ``--max-replicas`` (polled every 0.2 s).
* **Per-request overhead on a cheap reward**: median seconds per scoring phase of the same jobs with the
  essentially free ``brightness`` reward through ``RewardServePool`` (one replica, one request per image) and
  through ``RewardPool`` (one reward worker actor, one call per job), both from the tiny SD3 debug config and
  warmed up by one untimed phase; overhead per image = (serve - pool) / images.

Not a timed test; on a shared 2-core machine the numbers move with the load, so compare ratios from one run.

    source scripts/env.sh && RAY_worker_niceness=0 .venv/bin/python bench/bench_reward_serve.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
LOGICAL_CPUS = 8
POLL_S = 0.2


@dataclass
class Job:
    """What ``score`` needs of a sampler call: its key, image count and ``ScoreRequest`` ref."""

    key: int
    num_images: int
    request_ref: Any
    stats_ref: Any = None


def make_jobs(n_jobs: int, per_job: int, size: int, seed: int = 0) -> list[Job]:
    """``n_jobs`` ready sampler-call jobs of ``per_job`` random uint8 ``size`` x ``size`` images each."""
    import ray

    from rtdmd_ray.roles.sampler import ScoreRequest

    g = torch.Generator().manual_seed(seed)
    jobs = []
    for j in range(n_jobs):
        images = torch.randint(0, 256, (per_job, 3, size, size), generator=g, dtype=torch.uint8)
        req = ScoreRequest(images, [f"prompt {j}.{i}" for i in range(per_job)], [{} for _ in range(per_job)])
        jobs.append(Job(key=j, num_images=per_job, request_ref=ray.put(req)))
    return jobs


class ReplicaWatch:
    """Polls ``replica_counts(app)[reward]`` every ``POLL_S`` in a background thread; ``samples`` holds
    ``(monotonic time, running replicas)``."""

    def __init__(self, app: str, reward: str) -> None:
        self.app, self.reward = app, reward
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from rtdmd_ray.roles.reward_serve import replica_counts

        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), replica_counts(self.app).get(self.reward, 0)))
            except Exception:  # Serve busy or shutting down: skip this sample
                pass
            self._stop.wait(POLL_S)

    def __enter__(self) -> ReplicaWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def first_reaching(self, count: int, since: float) -> float | None:
        """Seconds from ``since`` until the count first read ``count`` or more, or None if it never did."""
        for t, n in self.samples:
            if t >= since and n >= count:
                return t - since
        return None


@dataclass
class EpochRun:
    """One configuration's epochs: wall seconds and replicas at the end of each, epoch start times."""

    seconds: list[float]
    replicas: list[int]
    starts: list[float]
    scale_up_s: float | None = None
    max_seen: int = 0


def latency_rewards(args: argparse.Namespace, max_replicas: int, app: str) -> Any:
    from rtdmd_ray.config import RewardsConfig

    return RewardsConfig(
        weights={"latency": 1.0}, device="cpu", batch_images={"latency": args.batch_images},
        options={"latency": {"seconds_per_batch": args.seconds_per_batch}}, serving="serve",
        serve={"cpus_per_replica": args.cpus_per_replica, "min_replicas": 1, "max_replicas": max_replicas,
               "target_ongoing_requests": args.target_ongoing, "upscale_delay_s": args.upscale_delay,
               "downscale_delay_s": args.downscale_delay, "app_name": app},
    )


def epochs_on(args: argparse.Namespace, jobs: list[Job], max_replicas: int, app: str) -> EpochRun:
    """``args.epochs`` back-to-back scoring phases of ``jobs`` on the latency reward (pool start excluded)."""
    from rtdmd_ray.roles.reward_serve import RewardServePool

    label = "fixed" if max_replicas == 1 else "autoscaled"
    pool = RewardServePool(rewards=latency_rewards(args, max_replicas, app))
    run = EpochRun([], [], [])
    try:
        with ReplicaWatch(app, "latency") as watch:
            first = time.monotonic()
            for epoch in range(args.epochs):
                t0 = time.monotonic()
                results, m = pool.score(jobs)
                run.seconds.append(time.monotonic() - t0)
                run.starts.append(t0)
                run.replicas.append(int(m.get("reward/serve/latency/replicas", 0)))
                assert len(results) == len(jobs)
                print(f"  {label:>10} epoch {epoch}: {run.seconds[-1]:6.2f} s, "
                      f"{run.replicas[-1]} replica(s) at its end", flush=True)
        run.scale_up_s = watch.first_reaching(max_replicas, first)
        run.max_seen = max((n for _, n in watch.samples), default=0)
    finally:
        pool.shutdown()
    return run


def overhead_phases(args: argparse.Namespace, jobs: list[Job]) -> tuple[list[float], list[float], str]:
    """Seconds per scoring phase of ``jobs`` on the ``brightness`` reward: (serve, actor pool, what ran)."""
    from rtdmd_ray.config import load_config
    from rtdmd_ray.roles.reward_pool import RewardPool
    from rtdmd_ray.roles.reward_serve import RewardServePool

    cfg = load_config(REPO / "configs" / "debug" / "tiny_sd3.yaml", [
        "rewards.weights={brightness: 1.0}", "rewards.serve.min_replicas=1", "rewards.serve.max_replicas=1",
        "rewards.serve.app_name=bench-brightness", "resources.reward_worker.count=1"])
    what = (f"brightness: serve 1 replica x {cfg.rewards.serve.cpus_per_replica} CPU, "
            f"pool 1 worker x {cfg.resources.reward_worker.cpus_per_actor} CPU")
    out: dict[str, list[float]] = {}
    for label in ("serve", "pool"):
        pool: Any = (RewardServePool(rewards=cfg.rewards) if label == "serve"
                     else RewardPool(rewards=cfg.rewards, resources=cfg.resources.reward_worker))
        try:
            pool.score(jobs)  # warm-up: first fetches, first scorer call, handle routing
            times = []
            for _ in range(args.phases):
                t0 = time.perf_counter()
                results, _ = pool.score(jobs)
                times.append(time.perf_counter() - t0)
                assert len(results) == len(jobs)
            out[label] = times
            ms = ", ".join(f"{t * 1e3:.0f}" for t in times)
            print(f"  {label:>5}: {ms} ms per phase", flush=True)
        finally:
            pool.shutdown()
    return out["serve"], out["pool"], what


def steady_from(auto: EpochRun, epochs: int) -> int:
    """The first epoch that starts with the autoscaled deployment at its max (>= 1: epoch 0 warms up)."""
    if auto.scale_up_s is None:  # never reached its max: all but the warm-up epoch
        return 1
    reached = auto.starts[0] + auto.scale_up_s
    return next((i for i, t in enumerate(auto.starts) if i >= 1 and t >= reached), epochs - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6, help="scoring phases per configuration")
    ap.add_argument("--jobs", type=int, default=8, help="sampler-call jobs per phase")
    ap.add_argument("--images", type=int, default=8, help="images per job")
    ap.add_argument("--size", type=int, default=64, help="image side (pixels)")
    ap.add_argument("--seconds-per-batch", type=float, default=0.5, help="latency reward seconds per call")
    ap.add_argument("--batch-images", type=int, default=4, help="latency reward micro-batch (images)")
    ap.add_argument("--max-replicas", type=int, default=4, help="autoscaled configuration's max replicas")
    ap.add_argument("--cpus-per-replica", type=float, default=0.25, help="logical CPUs per latency replica")
    ap.add_argument("--target-ongoing", type=float, default=0.0,
                    help="target_ongoing_requests per replica (0 = the micro-batch)")
    ap.add_argument("--upscale-delay", type=float, default=1.0, help="upscale_delay_s")
    ap.add_argument("--downscale-delay", type=float, default=120.0, help="downscale_delay_s (> the run)")
    ap.add_argument("--phases", type=int, default=5, help="timed overhead phases per pool (median)")
    args = ap.parse_args()
    if args.epochs < 2 or args.max_replicas < 2:
        ap.error("--epochs and --max-replicas must be >= 2")

    warnings.filterwarnings("ignore", message="Using extra keyword arguments on `Field` is deprecated")
    import ray
    from ray import serve

    t_start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="rtb-serve-", dir="/tmp")
    ray.init(address="local", num_cpus=LOGICAL_CPUS, include_dashboard=False, _temp_dir=tmp,
             log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        jobs = make_jobs(args.jobs, args.images, args.size)
        n = args.jobs * args.images
        print(f"1) latency reward {args.seconds_per_batch} s per {args.batch_images}-image call, "
              f"{args.epochs} epochs of {args.jobs} jobs x {args.images} images, "
              f"replicas of {args.cpus_per_replica} CPU",
              flush=True)
        fixed = epochs_on(args, jobs, 1, "bench-fixed")
        auto = epochs_on(args, jobs, args.max_replicas, "bench-autoscaled")
        print(f"3) per-request overhead, {args.phases} phases of {args.jobs} jobs x {args.images} images",
              flush=True)
        serve_s, pool_s, what = overhead_phases(args, jobs)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    wall = time.monotonic() - t_start

    k = steady_from(auto, args.epochs)
    f_steady, a_steady = statistics.mean(fixed.seconds[k:]), statistics.mean(auto.seconds[k:])
    ratio, ratio_all = f_steady / a_steady, sum(fixed.seconds) / sum(auto.seconds)
    s_med, p_med = statistics.median(serve_s), statistics.median(pool_s)
    per_image_ms = (s_med - p_med) / n * 1e3

    print()
    print(f"{'epoch':>6} | {'fixed 1 replica':>16} | {f'autoscaled 1..{args.max_replicas}':>16} | "
          "replicas at end (fixed / autoscaled)")
    for i in range(args.epochs):
        mark = " *" if i >= k else ""
        print(f"{i:>6} | {fixed.seconds[i]:14.2f} s | {auto.seconds[i]:14.2f} s | "
              f"{fixed.replicas[i]} / {auto.replicas[i]}{mark}")
    print(f"{'steady':>6} | {f_steady:14.2f} s | {a_steady:14.2f} s | epochs {k}..{args.epochs - 1} (*)")
    print(f"{'total':>6} | {sum(fixed.seconds):14.2f} s | {sum(auto.seconds):14.2f} s |")
    print(f"epoch-time ratio fixed/autoscaled (steady): {ratio:.2f}x (goal >= 1.5); "
          f"all epochs: {ratio_all:.2f}x")
    # one replica is busy the whole epoch: its mean micro-batch is the images over its scorer calls
    fill = n * args.seconds_per_batch / f_steady
    print(f"fixed replica's mean micro-batch ~{fill:.1f} of {args.batch_images} images "
          f"(images x seconds-per-batch / steady epoch time)")
    up = f"{auto.scale_up_s:.1f} s" if auto.scale_up_s is not None else f"never (max seen {auto.max_seen})"
    print(f"scale-up 1 -> {args.max_replicas} replicas: {up} (goal <= 30 s)")
    print(f"overhead ({what}), median of {args.phases}:")
    print(f"  serve {s_med * 1e3:.1f} ms/phase, actor pool {p_med * 1e3:.1f} ms/phase, "
          f"overhead {per_image_ms:.2f} ms/image ({n} images)")
    print(f"wall time {wall:.0f} s")
    print(json.dumps({
        "fixed_epoch_s": [round(t, 3) for t in fixed.seconds],
        "autoscaled_epoch_s": [round(t, 3) for t in auto.seconds],
        "steady_from_epoch": k, "fixed_steady_s": round(f_steady, 3),
        "autoscaled_steady_s": round(a_steady, 3),
        "ratio_steady": round(ratio, 3), "ratio_all": round(ratio_all, 3),
        "scale_up_s": None if auto.scale_up_s is None else round(auto.scale_up_s, 2),
        "serve_phase_s": round(s_med, 4), "pool_phase_s": round(p_med, 4),
        "fixed_mean_batch": round(fill, 2), "overhead_ms_per_image": round(per_image_ms, 3), "images": n,
        "wall_s": round(wall, 1),
    }))


if __name__ == "__main__":
    main()

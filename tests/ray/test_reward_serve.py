"""Rewards on Ray Serve (``rewards.serving: serve``) on the local CPU cluster: one deployment per reward gives
the actor pool's scores to the last bit, grows replicas while its queue is backed up, replaces a killed
replica without losing an image, names a reward that fails to load, and is shared by name."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from rtdmd_ray.config import RewardsConfig

pytestmark = pytest.mark.ray


@pytest.fixture()
def serve_on(ray_local):
    from ray import serve

    yield serve
    serve.shutdown()


def shapes_jobs(n_jobs: int, per_job: int, seed: int = 0) -> list:
    """Sampler-call-like jobs over ShapeWorld renders (images with captions and GenEval metadata)."""
    import ray

    from rtdmd_ray.roles.sampler import ScoreRequest
    from rtdmd_ray.shapes.prompts import eval_captions
    from rtdmd_ray.shapes.render import render_batch
    from rtdmd_ray.types import quantize_images

    metas = eval_captions("test", n_jobs * per_job, seed)[: n_jobs * per_job]
    images = quantize_images(render_batch(metas, np.random.default_rng(seed)))
    images[::3] = 255 - images[::3]  # some wrong images too, so the scores are not all 1
    jobs = []
    for j in range(n_jobs):
        sl = slice(j * per_job, (j + 1) * per_job)
        req = ScoreRequest(images[sl].clone(), [m["prompt"] for m in metas[sl]], list(metas[sl]))
        jobs.append(type("Job", (), {"key": j, "num_images": per_job, "request_ref": ray.put(req),
                                     "stats_ref": None})())
    return jobs


def direct(job, rewards: RewardsConfig):
    """What the actor pool's worker computes for ``job``: MultiScorer on the whole call, then ScoredBatch."""
    import ray

    from rtdmd_ray.rewards.multi import MultiScorer, resolve_scorer_options
    from rtdmd_ray.types import ScoredBatch

    req = ray.get(job.request_ref)
    ms = MultiScorer(dict(rewards.weights), batch_images=dict(rewards.batch_images),
                     options=resolve_scorer_options(rewards.options, rewards.weights))
    out = ms(req.images.float() / 255.0, list(req.prompts), list(req.metadata))
    out.pop("mean")
    return ScoredBatch.from_scores(out, ms.weights)


def test_serve_scores_equal_the_actor_pool_to_the_last_bit(serve_on):
    from rtdmd_ray.roles.reward_serve import RewardServePool

    rewards = RewardsConfig(
        weights={"shapes_geneval": 1.0, "brightness": 0.5}, device="cpu",
        batch_images={"shapes_geneval": 4, "brightness": 3},
        options={"shapes_geneval": {"score": "strict"}},
        serving="serve", serve={"cpus_per_replica": 0.25, "app_name": "t-bits"},
    )
    pool = RewardServePool(rewards=rewards)
    try:
        jobs = shapes_jobs(3, 6)
        got, m = pool.score(jobs)
        assert sorted(got) == [0, 1, 2] and m["reward/serve/shapes_geneval/replicas"] == 1.0
        for job in jobs:
            want, have = direct(job, rewards), got[job.key]
            assert list(have.scores) == list(want.scores)  # same keys (extras renamed as MultiScorer does)
            for k in want.scores:
                assert torch.equal(have.scores[k], want.scores[k]), k
            assert torch.equal(have.total, want.total) and torch.equal(have.valid, want.valid)
        assert 0 < float(torch.cat([got[j].scores["shapes_geneval"] for j in got]).mean()) < 1
    finally:
        pool.shutdown()
    from ray import serve

    assert "t-bits" not in serve.status().applications  # a run deletes the application it started


def test_replicas_grow_while_the_queue_is_backed_up(serve_on):
    from rtdmd_ray.roles.reward_serve import RewardServePool, replica_counts

    rewards = RewardsConfig(
        weights={"latency": 1.0}, device="cpu", batch_images={"latency": 2},
        options={"latency": {"seconds_per_batch": 0.5}}, serving="serve",
        serve={"cpus_per_replica": 0.25, "min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 0.5,
               "downscale_delay_s": 2.0, "app_name": "t-scale"},
    )
    pool = RewardServePool(rewards=rewards)
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(replica_counts("t-scale").get("latency", 0))
            time.sleep(0.25)

    th = threading.Thread(target=watch)
    th.start()
    try:
        jobs = shapes_jobs(8, 6, seed=1)  # 48 images = 24 micro-batches of 0.5 s: 12 s on one replica
        got, _ = pool.score(jobs)
    finally:
        done.set()
        th.join()
    try:
        assert max(seen) > 1, f"replicas never grew: {seen}"
        assert seen[0] == 1
        for job in jobs:  # every sample scored once, with its own score
            assert torch.equal(got[job.key].scores["latency"], direct(job, rewards).scores["latency"])
        deadline = time.monotonic() + 30  # and shrink back when it idles
        while replica_counts("t-scale")["latency"] > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert replica_counts("t-scale")["latency"] == 1
    finally:
        pool.shutdown()


def test_a_killed_replica_loses_no_image(serve_on):
    import ray

    from rtdmd_ray.roles.reward_serve import RewardServePool

    rewards = RewardsConfig(
        weights={"latency": 1.0}, device="cpu", batch_images={"latency": 2},
        options={"latency": {"seconds_per_batch": 0.4}}, serving="serve",
        serve={"cpus_per_replica": 0.25, "app_name": "t-kill"},
    )
    pool = RewardServePool(rewards=rewards)
    try:
        jobs = shapes_jobs(3, 6, seed=2)
        box: dict = {}
        th = threading.Thread(target=lambda: box.setdefault("out", pool.score(jobs)))
        th.start()
        time.sleep(1.5)  # mid-scoring: a batch is running, more are queued
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if "reward_latency" in a["name"] and a["namespace"] == "serve"]
        assert names, "no replica actor found"
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        th.join(timeout=120)
        got, m = box["out"]
        assert m["reward/pool/redispatched"] >= 1  # the dead replica's requests were sent again
        for job in jobs:
            assert torch.equal(got[job.key].scores["latency"], direct(job, rewards).scores["latency"])
    finally:
        pool.shutdown()


def test_a_reward_that_fails_to_load_names_itself(serve_on, tmp_path):
    from rtdmd_ray.roles.reward_serve import RewardLoadError, RewardServePool

    rewards = RewardsConfig(
        weights={"brightness": 1.0, "clipscore": 1.0}, device="cpu", serving="serve",
        options={"clipscore": {"model": str(tmp_path / "no_such_clip")}},
        serve={"cpus_per_replica": 0.25, "app_name": "t-fail"},
    )
    with pytest.raises(RewardLoadError) as err:
        RewardServePool(rewards=rewards)
    msg = str(err.value)
    assert "\n" not in msg and "clipscore" in msg and "no_such_clip" in msg, msg


def test_a_run_attaches_to_a_shared_application(serve_on):
    from ray import serve

    from rtdmd_ray.roles.reward_serve import RewardLoadError, RewardServePool, start_reward_app

    shared = RewardsConfig(weights={"brightness": 1.0, "latency": 1.0}, device="cpu",
                           options={"latency": {"seconds_per_batch": 0.0}},
                           serve={"cpus_per_replica": 0.25})
    start_reward_app(shared, list(shared.weights), "t-shared")
    try:
        mine = RewardsConfig(weights={"brightness": 2.0}, device="cpu", serving="serve", serve_app="t-shared")
        pool = RewardServePool(rewards=mine)
        jobs = shapes_jobs(1, 4, seed=3)
        got, _ = pool.score(jobs)
        assert torch.equal(got[0].total, 2.0 * direct(jobs[0], mine).scores["brightness"])
        pool.shutdown()  # attached: the shared application keeps running
        assert "t-shared" in serve.status().applications
        with pytest.raises(RewardLoadError, match="no running deployment for reward"):
            RewardServePool(rewards=RewardsConfig(weights={"aesthetic": 1.0}, serving="serve",
                                                  serve_app="t-shared"))
    finally:
        serve.delete("t-shared")


def test_serve_rewards_cli_then_a_training_run_attaches(serve_on, tmp_path, capsys):
    """`rtdmd-ray serve-rewards CONFIG` leaves the training and eval rewards running as a named application;
    an RL run with ``rewards.serve_app`` scores on it (starting no reward replica of its own) and leaves it
    running; ``--delete`` removes it."""
    from rtdmd_ray.cli import main
    from rtdmd_ray.driver import train
    from rtdmd_ray.roles.reward_serve import replica_counts
    from tests.ray.tiny import TINY_CONFIG, tiny_rl_config

    app = ["rewards.serve.app_name=cli-shared", "eval.reward_weights={brightness: 1.0, latency: 1.0}"]
    assert main(["serve-rewards", str(TINY_CONFIG), *app]) == 0
    out = capsys.readouterr().out
    assert "application cli-shared running (brightness x1, latency x1)" in out
    assert "rewards.serve_app=cli-shared" in out
    try:
        result = train(tiny_rl_config(tmp_path, 1, "rewards.serve_app=cli-shared"))
        m = result["metrics"][0]
        assert result["epochs"] == 1 and m["reward/serve/brightness/replicas"] == 1.0
        assert replica_counts("cli-shared") == {"brightness": 1, "latency": 1}  # still serving
        assert not [a for a in serve_on.status().applications if a.startswith("rtdmd-rewards")]
    finally:
        assert main(["serve-rewards", str(TINY_CONFIG), *app, "--delete"]) == 0
    assert "cli-shared" not in serve_on.status().applications


def test_a_judge_cannot_start_on_a_serve_without_http_proxies(serve_on):
    """Reward applications start Serve without HTTP proxies; a judge app (reached over HTTP) asked for after
    that is refused with one line saying how to order or restart, instead of deploying an unreachable app."""
    from rtdmd_ray.roles.judge_serve import JudgeAppMissing, ensure_judge_app
    from rtdmd_ray.roles.reward_serve import start_reward_app

    start_reward_app(RewardsConfig(weights={"brightness": 1.0}, serve={"cpus_per_replica": 0.25}),
                     ["brightness"], "t-noproxy")
    rewards = RewardsConfig(weights={"geneval2": 1.0}, options={"geneval2": {"serve_app": "judge-x"}})
    with pytest.raises(JudgeAppMissing, match="without HTTP proxies") as err:
        ensure_judge_app(rewards, ["geneval2"])
    assert "\n" not in str(err.value) and "judge-x" not in serve_on.status().applications
    assert ensure_judge_app(rewards, ["brightness"]) is None  # no geneval2: nothing to start


def test_train_with_a_reward_that_fails_to_load_exits_2_with_one_line(serve_on, tmp_path, capsys):
    from rtdmd_ray.cli import main
    from tests.ray.tiny import TINY_CONFIG

    rc = main(["train", str(TINY_CONFIG), f"train.output_dir={tmp_path}", "train.iterations=1",
               "rewards.weights={brightness: 1.0, clipscore: 1.0}",
               f"rewards.options={{clipscore: {{model: {tmp_path / 'no_such_clip'}}}}}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("train: reward clipscore failed to load") and "no_such_clip" in err[0]
    assert not [a for a in serve_on.status().applications if a.startswith("rtdmd-rewards")]

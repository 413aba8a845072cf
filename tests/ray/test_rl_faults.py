"""RL fault tolerance end to end through the driver on local CPU Ray (tiny SD3, brightness reward).

One 4-epoch run with 2 samplers, the rewards on Ray Serve and 1 learner rank; the epoch callbacks arm three
faults:

* after epoch 0, the reward pool is told to return NaN for the next sample's brightness: epoch 1 must
  quarantine exactly that sample (advantage 0, counted in ``reward/total/quarantined``, one warning), never
  average it in;
* after epoch 0, sampler 0 is told to kill its process in its next call (epoch 2's; epoch 1's calls were
  queued before): Ray restarts it (``max_restarts``), the driver re-syncs it to the current policy and samples
  the lost call again, and epoch 2 trains on every prompt group exactly once;
* after epoch 2, sampler 1 is killed once its epoch-3 call is done, i.e. it dies idle during the update: epoch
  3's sync sees the restart and re-forms the weight-sync group instead of failing.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch

from tests.ray.tiny import tiny_rl_config

pytestmark = pytest.mark.ray

EPOCHS = 4


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    import ray

    from rtdmd_ray.driver import train

    out = tmp_path_factory.mktemp("rl_faults")
    # 2 prompts x 4 images per epoch: one call of 4 per sampler
    cfg = tiny_rl_config(
        out, EPOCHS, "resources.sampler.count=2", "resources.sampler.max_restarts=1",
        "rewards.serve.max_replicas=1", "resources.learner.count=1",
    )
    seen: dict = {}

    def on_epoch(epoch: int, metrics: dict, roles: dict) -> None:
        learners, samplers, rewards = roles["learners"], roles["samplers"], roles["rewards"]
        seen.setdefault("advantages", []).append(learners.call("last_advantages")[0])
        if epoch == 0:
            rewards.poison("brightness", 1)
            ray.get(samplers.group[0].crash_on_next_sample.remote())
        if epoch == 2:
            # sampler 1 dies idle: after its epoch-3 call (queued before this callback) and before epoch 3's
            # sync; Ray restarts it holding no weights
            ray.get(samplers.group[1].policy_version.remote())
            ray.kill(samplers.group[1], no_restart=False)
        if epoch == EPOCHS - 1:
            seen["learner_lora"] = learners.call("lora", "generator")[0]
            seen["sampler_loras"] = samplers.call("lora")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg, on_epoch=on_epoch)
    seen["warnings"] = [str(w.message) for w in caught if "quarantined" in str(w.message)]
    return {"result": result, "seen": seen, "cfg": cfg}


def test_nan_reward_is_quarantined_counted_and_warned(run):
    metrics = run["result"]["metrics"]
    assert [m["reward/total/quarantined"] for m in metrics] == [0.0, 1.0, 0.0, 0.0]
    assert len(run["seen"]["warnings"]) == 1 and run["seen"]["warnings"][0].startswith("epoch 1: 1/8")
    prompts, adv = run["seen"]["advantages"][1]
    assert int((adv == 0).sum()) == 1  # the quarantined sample, and only it, gets advantage exactly 0
    for key in ("reward/total/mean", "reward/brightness/mean", "learner/ppo/loss",
                "learner/generator/grad_norm"):
        assert math.isfinite(metrics[1][key]), key  # nothing NaN leaked into the statistics or the update


def test_sampler_that_died_idle_is_resynced_at_the_next_sync(run):
    """Sampler 1 killed between its epoch-3 call and epoch 3's weight sync: the sync re-forms the group and
    the restarted sampler ends at the learner's weights (checked bit for bit in the test below)."""
    m = run["result"]["metrics"]
    assert m[3]["rollout/sampler_restarts"] == 2  # counters are per run
    assert m[3]["rollout/resubmitted"] == m[2]["rollout/resubmitted"] == 1  # its call was not sampled again
    assert m[3]["rollout/images"] == 8 and m[3]["sync/version"] == EPOCHS


def test_killed_sampler_is_restarted_resynced_and_the_epoch_completes(run):
    from rtdmd_ray.data.prompts import training_prompt_records
    from rtdmd_ray.roles.sampler import epoch_prompt_jobs

    cfg, res = run["cfg"], run["result"]
    assert res["epochs"] == EPOCHS and res["policy_version"] == EPOCHS
    m = res["metrics"][2]
    assert m["rollout/sampler_restarts"] == 1 and m["rollout/resubmitted"] == 1
    assert res["metrics"][1]["rollout/resubmitted"] == 0
    # every prompt group of epoch 2 was trained on exactly once (the lost call sampled again, not twice)
    jobs = epoch_prompt_jobs(training_prompt_records(cfg.data), grpo=cfg.grpo, seed=cfg.train.seed, epoch=2,
                             num_samplers=2, policy_version=2)
    want = Counter(p for j in jobs for p in j.prompts.prompts)
    prompts, _ = run["seen"]["advantages"][2]
    assert m["rollout/images"] == 8 and Counter(prompts) == want
    # both samplers, the restarted one included, hold the learner's weights bit for bit at the current version
    learner = run["seen"]["learner_lora"]
    assert len(run["seen"]["sampler_loras"]) == 2
    for lora, version in run["seen"]["sampler_loras"]:
        assert version == EPOCHS and lora.keys() == learner.keys()
        for k, v in learner.items():
            assert torch.equal(lora[k], v), k

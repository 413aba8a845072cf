"""A learner rank that dies ends the RL job cleanly, and resubmitting resumes (local CPU Ray, tiny SD3).

One 2-epoch job (1 sampler, 1 reward worker, 2 gloo learner ranks): after epoch 0 (checkpoint 1 written),
learner rank 1 is told to kill its process in its next ``update``; rank 0 then blocks in a gloo collective
waiting for it. ``train`` must raise ``LearnerFailure`` promptly (not after the 300 s gloo timeout) naming
the rank, the epoch, the checkpoint and the fix, with every role actor of the job dead. The same command
with ``train.resume: auto`` then continues from checkpoint 1 to the end. The CLI prints the message without
a traceback and exits 3.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.ray.tiny import TINY_CONFIG, tiny_rl_config

EPOCHS = 2
CRASH_EPOCH = 1
DETECT_S = 60.0  # the surviving rank's gloo timeout is 300 s: a hang shows up as a much longer wait


def config(out: Path):
    return tiny_rl_config(
        out, EPOCHS, "train.resume=auto", "rewards.serve.max_replicas=1",
        "grpo.micro_batch_images_per_rank=2",
    )


@pytest.mark.ray
def test_dead_learner_rank_ends_the_job_and_resume_auto_continues(ray_local, tmp_path):
    import ray

    from rtdmd_ray.driver import train
    from rtdmd_ray.roles.learner import LearnerFailure
    from rtdmd_ray.runs import checkpoint as ckpt

    actors: list = []
    armed: list[float] = []
    reward_apps: list[str] = []

    def kill_rank_1(epoch: int, metrics: dict, roles: dict) -> None:
        if epoch == CRASH_EPOCH - 1:
            for role in roles.values():
                if hasattr(role, "group"):
                    actors.extend(role.group.actors)
                else:  # rewards on Ray Serve (the default): the run's own application
                    reward_apps.append(role.app_name)
            ray.get(roles["learners"].group[1].crash_on_next_update.remote())
            armed.append(time.monotonic())

    with pytest.raises(LearnerFailure) as info:
        train(config(tmp_path), on_epoch=kill_rank_1)
    waited = time.monotonic() - armed[0]
    assert waited < DETECT_S, f"the job took {waited:.0f} s to notice the dead rank"

    last = tmp_path / ckpt.checkpoint_name(CRASH_EPOCH)
    err = info.value
    assert err.rank == 1 and err.checkpoint == last and err.progress == f"epoch {CRASH_EPOCH}"
    msg = str(err)
    assert msg.startswith(f"learner rank 1 died during epoch {CRASH_EPOCH} (learner update {CRASH_EPOCH})")
    assert f"Last complete checkpoint: {last}" in msg
    assert f"resubmit the same command; train.resume: auto continues from {last}" in msg

    # no role actor of the job is left: the sampler and both learner ranks (rank 0 was blocked), and the
    # run's reward application is deleted with its replicas
    from ray import serve

    assert len(actors) == 3 and len(reward_apps) == 1
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=60)
    assert reward_apps[0] not in serve.status().applications

    resumed = train(config(tmp_path))  # the same command again
    assert resumed["epochs"] == EPOCHS and resumed["policy_version"] == EPOCHS
    versions = [m["rollout/policy_version"] for m in resumed["metrics"]]
    assert versions == list(range(CRASH_EPOCH + 1, EPOCHS + 1))
    assert Path(resumed["checkpoint"]).name == ckpt.checkpoint_name(EPOCHS)


def test_cli_prints_the_learner_failure_without_traceback_and_exits_3(monkeypatch, capsys):
    from rtdmd_ray import driver
    from rtdmd_ray.cli import main
    from rtdmd_ray.roles.learner import LearnerFailure

    def dead_rank(cfg, **kwargs):
        raise LearnerFailure(rank=1, progress="epoch 4", what="learner update 4", cause=RuntimeError("gone"),
                             checkpoint=Path("/runs/x/checkpoint-00000004"), resume="auto")

    monkeypatch.setattr(driver, "train", dead_rank)
    assert main(["train", str(TINY_CONFIG)]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("train: learner rank 1 died during epoch 4")
    assert "train.resume: auto continues from /runs/x/checkpoint-00000004" in err


@pytest.mark.ray
def test_gather_ranks_blames_the_dead_rank_not_the_survivors_collective_error(ray_local):
    """The survivor's collective often fails first (its peer's socket closed); the dead rank is the cause."""
    import os

    import ray

    from rtdmd_ray.roles.learner import gather_ranks

    @ray.remote(num_cpus=0)
    class Rank:
        def run(self, die: bool) -> None:
            if die:
                time.sleep(1.0)  # Ray learns of this death after the survivor's error is in
                os._exit(1)
            raise RuntimeError("gloo: connection closed by peer")

    class Group:
        actors = [Rank.remote(), Rank.remote()]
        killed = 0

        def shutdown(self) -> None:
            for a in self.actors:
                ray.kill(a, no_restart=True)
            Group.killed += 1

    class Died(Exception):
        pass

    def on_death(rank: int, what: str, error: BaseException):
        raise Died(rank, what, type(error).__name__)

    group = Group()
    with pytest.raises(Died) as info:
        gather_ranks(group, [a.run.remote(die=r == 1) for r, a in enumerate(group.actors)], timeout_s=60,
                     what="update 3", on_death=on_death)
    assert info.value.args == (1, "update 3", "ActorDiedError") and Group.killed >= 1

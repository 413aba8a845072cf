"""RL resume is bit-exact on CPU: a job killed after N epochs and resubmitted with ``train.resume: auto`` ends
where an uninterrupted 2N-epoch job ends, bit for bit (generator and fake-score LoRA, EMA, optimiser states,
RNG states, and every epoch's rewards and losses, so sampler noise and dataset position line up too).

Three driver runs of the tiny config (1 sampler, 1 reward worker, 2 gloo learner ranks): 2N epochs straight;
2N epochs killed (an exception from the epoch callback, after checkpoint N is written); the same command again
with ``resume: auto``; on-policy and pipelined (``grpo.max_policy_lag: 1``: the resumed job samples its
first epoch with the weights before the last update, which the checkpoint keeps).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.ray.tiny import tiny_rl_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # three RL jobs: ~2-5 min on 2 busy cores

N = 2
# wall-clock and throughput numbers differ between runs; everything else must be identical
VOLATILE = ("timing/", "_per_s", "busy_s", "idle_frac", "queue_depth", "sync/seconds")


class Killed(Exception):
    pass


def config(out: Path, resume: str, lag: int):
    return tiny_rl_config(
        out, 2 * N, f"grpo.max_policy_lag={lag}", f"train.resume={resume}", "resources.reward_worker.count=1",
        "grpo.micro_batch_images_per_rank=2", "solver.generator.lr=5.0e-2",
    )


def stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(s in k for s in VOLATILE)}


def checkpoint_state(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        out |= {f"{f.relative_to(ckpt)}:{k}": v for k, v in load_file(str(f)).items()}
    for f in sorted(ckpt.glob("rank*/state.pt")):
        out[str(f.relative_to(ckpt))] = torch.load(f, weights_only=True)
    return out


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("lag", [0, 1], ids=["on_policy", "pipelined"])
def test_rl_resume_n_plus_n_equals_2n_bit_exactly(ray_local, tmp_path, lag):
    from rtdmd_ray.driver import train
    from rtdmd_ray.runs import checkpoint as ckpt

    straight = train(config(tmp_path / "straight", "never", lag))

    def kill_after_n(epoch: int, metrics: dict, roles: dict) -> None:
        if epoch + 1 == N:
            raise Killed  # after checkpoint N was written: what a crash or a cancelled job leaves behind

    with pytest.raises(Killed):
        train(config(tmp_path / "resumed", "auto", lag), on_epoch=kill_after_n)
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path / "resumed")][-1] == N
    start = checkpoint_state(ckpt.latest_checkpoint(tmp_path / "resumed"))
    resumed = train(config(tmp_path / "resumed", "auto", lag))

    assert [m["rollout/policy_version"] for m in resumed["metrics"]] == list(range(N + 1, 2 * N + 1))
    assert all(m["rollout/policy_lag"] == lag for m in resumed["metrics"])  # a pipelined resume stays so
    for a, b in zip(straight["metrics"][N:], resumed["metrics"], strict=True):
        assert_same(stable(a), stable(b), "metrics")
    a_ckpt, b_ckpt = Path(straight["checkpoint"]), Path(resumed["checkpoint"])
    assert a_ckpt.name == b_ckpt.name == ckpt.checkpoint_name(2 * N)
    state_a, state_b = checkpoint_state(a_ckpt), checkpoint_state(b_ckpt)
    assert any("generator_ema" in k for k in state_a) and any("state.pt" in k for k in state_a)
    assert_same(state_a, state_b, "checkpoint")
    # and the resumed epochs did train: the end differs from the checkpoint the job resumed from
    key = next(k for k in state_b if k.startswith("generator.safetensors:"))
    assert not torch.equal(start[key], state_b[key])

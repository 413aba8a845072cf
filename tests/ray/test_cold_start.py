"""Stage 1 on a local Ray: a 2-rank gloo learner group trains the tiny SD3 backbone with AC-DMD.

One group trains 2N iterations (checkpoint at N, then on); its actors are killed; a second group resumes
from the checkpoint at N with ``resume: auto`` and must reach the same 2N state bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from rtdmd_ray.config import ConfigError, load_config
from rtdmd_ray.runs import checkpoint as ckpt

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
# the tiny SD3's last joint block is context_pre_only: its text-query adapter gets no gradient
UNUSED_LORA = "transformer_blocks.1.attn.add_q_proj."
N = 2  # iterations per half; fake_update_ratio 2 -> 1 generator update per half


def _overrides(out: Path, *extra: str) -> list[str]:
    return [
        "stage=cold_start",
        f"train.output_dir={out}",
        f"train.iterations={2 * N}",
        f"train.save_every_iterations={N}",
        "train.keep_last_checkpoints=5",
        "dmd.prompts_per_step=4",
        "dmd.fake_update_ratio=2",
        "resources.learner.count=2",
        "resources.learner.cpus_per_actor=1",
        "logging.wandb=disabled",
        "logging.stdout=false",
        *extra,
    ]


def _cfg(out: Path, *extra: str):
    return load_config(REPO / "configs/debug/tiny_sd3.yaml", _overrides(out, *extra))


def _state(group) -> dict[str, torch.Tensor]:
    """Full LoRAs (live + EMA) as one flat dict, from rank 0."""
    out = {}
    for role in ("generator", "fake_score"):
        out |= {f"{role}/{k}": v for k, v in group.call("lora", role)[0].items()}
    out |= {f"ema/{k}": v for k, v in group.call("lora", "generator", True)[0].items()}
    return out


def test_two_ranks_train_kill_and_resume_bit_exact(ray_local, tmp_path):
    import ray

    from rtdmd_ray.roles.learner import LearnerGroup

    cfg = _cfg(tmp_path / "a")
    group = LearnerGroup(cfg)
    try:
        assert group.info["trainable_params"]["generator"] > 0
        lora0 = _state(group)
        frozen0 = group.call("frozen_checksum")
        eval0 = group.evaluate()
        m1 = group.run_cold_start(0, N)
        first_ckpt = group.save_checkpoint(cfg.train.output_dir, 5)
        m2 = group.run_cold_start(N, N)
        final = _state(group)
        counts = group.call("update_counts")
        frozen1 = group.call("frozen_checksum")
    finally:
        # a hard kill, not a graceful shutdown: the resumed run must not depend on anything left in memory
        for actor in group.group.actors:
            ray.kill(actor, no_restart=True)
        group.shutdown()

    # eval: the (EMA) generator's images scored by the configured reward, identical on both ranks
    assert (
        0.0 <= eval0["eval/brightness/brightness"] <= 1.0
        and eval0["eval/mean"] == eval0["eval/brightness/brightness"]
    )
    metrics = m1 + m2
    for m in metrics:
        for k, v in m.items():
            assert torch.isfinite(torch.tensor(v)), f"{k}={v} at iteration {m['learner/iteration']}"
    assert [m["learner/fake_updates"] for m in metrics] == [1, 2, 3, 4]
    assert [m["learner/generator_updates"] for m in metrics] == [0, 1, 1, 2]  # TTUR 2:1
    assert counts == [{"generator": 2, "fake_score": 4}] * 2
    assert "learner/generator/loss_dmd" in metrics[1] and "learner/generator/loss_dmd" not in metrics[0]
    # every LoRA tensor of both roles moved (B from zero, A by Adam); the base (teacher) did not
    for key in lora0:
        if not key.startswith("ema/") and UNUSED_LORA not in key:
            assert not torch.equal(lora0[key], final[key]), key
    assert frozen0 == frozen1 and frozen0[0] == frozen0[1]

    # resume: a fresh run directory holding only the checkpoint at N, then `resume: auto` to 2N
    resumed_dir = tmp_path / "b"
    resumed_dir.mkdir()
    shutil.copytree(first_ckpt, resumed_dir / Path(first_ckpt).name)
    from rtdmd_ray.cli import main

    assert main(["cold-start", str(REPO / "configs/debug/tiny_sd3.yaml"), *_overrides(resumed_dir)]) == 0
    from rtdmd_ray.models.lora import load_lora_file

    latest = ckpt.latest_checkpoint(resumed_dir)
    assert latest is not None and latest.name == ckpt.checkpoint_name(2 * N)
    for role, prefix in (
        ("generator", "generator/"),
        ("fake_score", "fake_score/"),
        ("generator_ema", "ema/"),
    ):
        resumed = load_lora_file(latest / f"{role}.safetensors").tensors
        for k, v in resumed.items():
            assert torch.equal(v, final[prefix + k]), f"{role} {k} differs after resume"
    assert (resumed_dir / "final" / "adapter_model.safetensors").is_file()
    assert (resumed_dir / "metrics.jsonl").read_text().count('"iteration": 4') >= 1


def test_batch_not_divisible_by_world_size_fails_before_any_actor(ray_local, tmp_path, monkeypatch):
    from rtdmd_ray import cold_start

    with pytest.raises(
        ConfigError, match=r"dmd.prompts_per_step=3 is not divisible by resources.learner.count=2"
    ):
        _cfg(tmp_path, "dmd.prompts_per_step=3")
    # a config that skipped validation is re-checked by the driver before the group is created
    bad = load_config(
        REPO / "configs/debug/tiny_sd3.yaml",
        ["stage=cold_start", "dmd.prompts_per_step=3", "resources.learner.count=2"],
        validate=False,
    )

    def no_actors(*args, **kwargs):
        raise AssertionError("a learner actor was started for an invalid config")

    monkeypatch.setattr(cold_start, "LearnerGroup", no_actors)
    with pytest.raises(ConfigError, match=r"3/2 = 1.5 prompts per rank"):
        cold_start.run_cold_start(bad)

"""The RL driver's entry checks (no Ray): `rtdmd-ray train` refuses a config of another stage before any actor
starts, and the shipped RL configs pass the check."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtdmd_ray.config import ConfigError, load_config
from rtdmd_ray.driver import check_rl_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_train_refuses_another_stage_before_starting_ray(monkeypatch, capsys):
    import ray

    from rtdmd_ray.cli import main
    from rtdmd_ray.driver import train

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init must not run for a bad config"))
    cfg = load_config(CONFIGS / "debug" / "tiny_sd3.yaml", ["stage=cold_start"])
    with pytest.raises(ConfigError, match="stage: rtdmd"):
        train(cfg)
    # the CLI prints it as one line (no traceback) and exits 2, like any config error
    assert main(["train", str(CONFIGS / "debug" / "tiny_sd3.yaml"), "stage=cold_start"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train: stage='cold_start'") and "set stage: rtdmd" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name", ["debug/tiny_sd3.yaml", "rtdmd/shapes.yaml", "rtdmd/sd35m.yaml"])
def test_shipped_rl_configs_pass_the_driver_check(name):
    cfg = check_rl_config(load_config(CONFIGS / name))
    assert cfg.images_per_rank_per_epoch % cfg.grpo.micro_batch_images_per_rank == 0


def test_reward_metrics_skip_quarantined_and_not_applicable():
    import math

    import torch

    from rtdmd_ray.roles.reward_pool import reward_metrics
    from rtdmd_ray.types import ScoredBatch

    scores = {"a": torch.tensor([1.0, float("nan"), 3.0]), "a_colors": torch.tensor([-10.0, 0.5, 1.0])}
    scored = ScoredBatch.from_scores(scores, {"a": 2.0})
    m = reward_metrics(scored)
    assert m["reward/total/quarantined"] == 1 and m["reward/total/mean"] == 4.0  # (2 + 6) / 2
    assert m["reward/a/mean"] == 2.0 and m["reward/a_colors/mean"] == 0.75
    assert all(not math.isnan(v) for v in m.values())

"""`rtdmd-ray plot`: reward curves from a metrics.jsonl, drawn (pixels checked), resumed records merged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rtdmd_ray.cli import main
from rtdmd_ray.eval.plots import BAND_COLOR, moving_average, moving_band, plot_rewards, read_metrics


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_plot_rewards_draws_train_and_eval_curves(tmp_path):
    recs = [{"iteration": i, "reward/clipscore/mean": 0.1 + 0.01 * i, "reward/shapes_geneval/mean": 0.3}
            for i in range(30)]
    recs[0].update({"eval/shapes_geneval/shapes_geneval": 0.3, "eval/shapes_geneval/strict_accuracy": 0.2})
    recs[20].update({"eval/shapes_geneval/shapes_geneval": 0.5, "eval/shapes_geneval/strict_accuracy": 0.4})
    _write(tmp_path / "metrics.jsonl", recs)
    assert main(["plot", str(tmp_path)]) == 0
    paths = sorted((tmp_path / "plots").glob("*.png"))
    assert [p.name for p in paths] == ["reward_clipscore.png", "reward_shapes_geneval.png"]
    px = np.asarray(Image.open(paths[0]).convert("RGB")).astype(int)
    blue = (abs(px - np.array([31, 119, 180])).sum(-1) < 30).sum()
    assert blue > 300  # the rising train curve is drawn, not only the frame
    px2 = np.asarray(Image.open(paths[1]).convert("RGB")).astype(int)
    red = (abs(px2 - np.array([214, 39, 40])).sum(-1) < 30).sum()
    assert red > 20  # eval markers


def test_read_metrics_merges_resumed_iterations(tmp_path):
    _write(tmp_path / "metrics.jsonl", [{"iteration": 0, "a": 1.0}, {"iteration": 1, "a": 2.0},
                                         {"iteration": 1, "a": 3.0, "b": 1.0}])
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"iteration": 0, "a": 1.0},
                                                         {"iteration": 1, "a": 3.0, "b": 1.0}]
    assert moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


def test_plot_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.output_dir"):
        plot_rewards(tmp_path)
    _write(tmp_path / "metrics.jsonl", [{"iteration": 0, "learner/fake/loss": 1.0}])
    with pytest.raises(ValueError, match="RL"):
        plot_rewards(tmp_path)
    assert main(["plot", str(tmp_path)]) == 2


def test_plot_only_configured_rewards_when_config_is_there(tmp_path):
    recs = [{"iteration": i, "reward/total/mean": 0.1 * i, "reward/clipscore/mean": 0.2,
             "reward/strict_accuracy/mean": 0.3} for i in range(3)]
    _write(tmp_path / "metrics.jsonl", recs)
    (tmp_path / "config.yaml").write_text("rewards:\n  weights: {clipscore: 1.0}\n")
    assert [p.name for p in plot_rewards(tmp_path)] == ["reward_clipscore.png", "reward_total.png"]


def test_band_and_training_strict_curve(tmp_path):
    lo, hi = moving_band([1.0, 3.0, 1.0, 3.0], 2)
    assert lo[0] == hi[0] == 1.0 and hi[1] - lo[1] == pytest.approx(4 * 1.0)  # se of (1, 3) is 1
    recs = [{"iteration": i, "reward/shapes_geneval/mean": 0.5 + 0.05 * (i % 3),
             "reward/strict_accuracy/mean": 0.3 + 0.01 * i} for i in range(40)]
    _write(tmp_path / "metrics.jsonl", recs)
    (tmp_path / "config.yaml").write_text("rewards:\n  weights: {shapes_geneval: 1.0}\n")
    (path,) = plot_rewards(tmp_path, window=8)
    px = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert (abs(px - np.array(BAND_COLOR)).sum(-1) < 6).sum() > 500  # the shaded band
    red = (abs(px - np.array([214, 39, 40])).sum(-1) < 30).sum()
    assert red > 100  # the training strict-accuracy curve (third series colour)

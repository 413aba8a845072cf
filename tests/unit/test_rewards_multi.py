"""Reward combination, routing and eval reduction (spec rewards-inference.md §7.1, §7.2) and the registry."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from rtdmd_ray.rewards import KNOWN_REWARDS, UnknownReward, build_scorer, validate_reward_names
from rtdmd_ray.rewards.multi import (
    MultiScorer,
    aggregate_across_ranks,
    combine_eval_means,
    reduce_scores,
    route_rewards_to_datasets,
)
from rtdmd_ray.rewards.synthetic import BrightnessScorer, LatencyScorer


class FixedScorer:
    """Returns given per-sample values (indexed by a 'idx' pixel so batching can be checked)."""

    differentiable = False

    def __init__(self, name: str, values: list[float], extra: dict[str, list[float]] | None = None):
        self.name, self.values, self.extra = name, values, extra or {}
        self.calls: list[int] = []

    def __call__(self, images, prompts, metadata=None):
        idx = images[:, 0, 0, 0].round().long().tolist()
        self.calls.append(len(idx))
        out = {self.name: torch.tensor([self.values[i] for i in idx])}
        for k, v in self.extra.items():
            out[k] = torch.tensor([v[i] for i in idx])
        return out


def _indexed_images(n: int) -> torch.Tensor:
    x = torch.zeros(n, 3, 4, 4)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)  # sample index hidden in one pixel
    return x


def test_mean_is_weighted_sum_not_average():
    ms = MultiScorer(
        {"pickscore": 1.0, "hpsv2": 0.5},
        scorers={
            "pickscore": FixedScorer("pickscore", [0.8, 0.9]),
            "hpsv2": FixedScorer("hpsv2", [0.3, 0.2]),
        },
    )
    out = ms(_indexed_images(2), ["a", "b"])
    assert torch.allclose(out["mean"], torch.tensor([0.95, 1.00]))
    assert list(out)[:2] == ["pickscore", "hpsv2"]  # dict order is call order
    assert torch.allclose(out["pickscore"], torch.tensor([0.8, 0.9]))


def test_single_reward_is_w_times_s_and_batch_size_splits_calls():
    fs = FixedScorer("clipscore", [0.1, 0.2, 0.3, 0.4, 0.5])
    ms = MultiScorer({"clipscore": 2.0}, scorers={"clipscore": fs}, batch_images={"clipscore": 2})
    out = ms(_indexed_images(5), ["p"] * 5)
    assert fs.calls == [2, 2, 1]
    assert torch.allclose(out["mean"], 2.0 * torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))


def test_extra_keys_copied_and_clashes_prefixed():
    a = FixedScorer("geneval", [0.5, 1.0], extra={"accuracy": [0.0, 1.0], "mean": [9.0, 9.0]})
    b = FixedScorer("geneval2", [0.2, 0.4], extra={"accuracy": [1.0, 1.0]})
    ms = MultiScorer({"geneval": 1.0, "geneval2": 1.0}, scorers={"geneval": a, "geneval2": b})
    out = ms(_indexed_images(2), ["x", "y"])
    assert torch.equal(out["accuracy"], torch.tensor([0.0, 1.0]))
    assert torch.equal(out["geneval2_accuracy"], torch.tensor([1.0, 1.0]))
    assert torch.equal(out["geneval_mean"], torch.tensor([9.0, 9.0]))
    assert torch.allclose(out["mean"], torch.tensor([0.7, 1.4]))


def test_unknown_reward_raises_even_with_allow_unavailable():
    with pytest.raises(UnknownReward, match="nosuchreward"):
        MultiScorer({"nosuchreward": 1.0}, allow_unavailable=True)
    with pytest.raises(UnknownReward, match="rewards.batch_images"):
        MultiScorer({"brightness": 1.0}, batch_images={"typo": 2})
    validate_reward_names(KNOWN_REWARDS)


def test_failing_factory_is_skipped_when_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("RTDMD_REWARD_CKPT_PATH", str(tmp_path))  # empty root: aesthetic weights are missing
    ms = MultiScorer({"aesthetic": 1.0, "brightness": 1.0}, allow_unavailable=True)
    assert ms.active_reward_names == ["brightness"]
    assert "aesthetic" in ms.unavailable and "RewardWeightsMissing" in ms.unavailable["aesthetic"]
    out = ms(torch.full((2, 3, 4, 4), 0.25), ["a", "b"])
    assert set(out) == {"brightness", "mean"}


def test_per_reward_device_and_options_reach_the_scorer():
    opts = {"latency": {"seconds_per_batch": 0}}
    ms = MultiScorer({"latency": 1.0}, devices={"latency": "meta"}, options=opts)
    assert ms.scorers["latency"].device.type == "meta" and ms.scorers["latency"].seconds_per_batch == 0.0
    with pytest.raises(UnknownReward, match="rewards.devices"):
        MultiScorer({"latency": 1.0}, devices={"typo": "cpu"})


def test_metadata_length_checked():
    ms = MultiScorer({"brightness": 1.0})
    with pytest.raises(ValueError, match="metadata"):
        ms(torch.zeros(2, 3, 4, 4), ["a", "b"], [{}])


def test_brightness_is_mean_and_differentiable():
    s = build_scorer("brightness")
    x = torch.rand(3, 3, 8, 8, requires_grad=True)
    y = s.score_differentiable(x, ["a"] * 3)
    assert torch.allclose(y, x.mean(dim=(1, 2, 3)))
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 1.0 / (3 * 8 * 8)))
    assert torch.allclose(s(x.detach(), ["a"] * 3)["brightness"], y.detach())
    assert isinstance(s, BrightnessScorer)


def test_multiscorer_differentiable_sum():
    ms = MultiScorer({"brightness": 3.0, "latency": 1.0}, options={"latency": {"seconds_per_batch": 0.0}})
    assert ms.differentiable_names == ["brightness"]
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    ms.score_differentiable(x, ["a", "b"]).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 3.0 / 48))


def test_latency_sleeps_per_call_and_is_deterministic():
    s = LatencyScorer(seconds_per_batch=0.05)
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0] = 1.0  # fully red image -> +1
    x[1, 2] = 1.0  # fully blue image -> -1
    t0 = time.perf_counter()
    a = s(x, ["p", "q"])["latency"]
    b = s(x, ["p", "q"])["latency"]
    assert time.perf_counter() - t0 >= 0.1
    assert torch.equal(a, b) and torch.equal(a, torch.tensor([1.0, -1.0]))
    assert s.calls == 2


def test_route_rewards_to_datasets_groups_in_order():
    names = ["pickscore", "geneval", "clipscore", "ocr", "hpsv3"]
    m = {"pickscore": "drawbench", "clipscore": "drawbench", "geneval": "geneval", "ocr": "", "hpsv3": 3}
    assert route_rewards_to_datasets(names, m, "prompt_file") == {
        "drawbench": ["pickscore", "clipscore"],
        "geneval": ["geneval"],
        "prompt_file": ["ocr", "hpsv3"],
    }


def test_reduce_ignores_sentinel_and_combines_with_prefix():
    red = reduce_scores(
        {"geneval": [0.5, 1.0], "counting_accuracy": [-10.0, 1.0], "colors_accuracy": [-10, -10]}
    )
    assert red == {"geneval": 0.75, "counting_accuracy": 1.0}
    combined = combine_eval_means(
        {"geneval": 1.0, "pickscore": 2.0},
        {"geneval": {"geneval": 0.75, "accuracy": 0.5}, "pickscore": {"pickscore": 0.9, "accuracy": 0.1}},
    )
    assert combined["mean"] == pytest.approx(0.75 + 1.8)
    assert combined["accuracy"] == 0.5 and combined["pickscore_accuracy"] == 0.1


def test_two_rank_aggregation():
    assert aggregate_across_ranks([({"r": 0.5}, 3), ({"r": 1.0}, 1)]) == {"r": 0.625}
    # a key only one rank has averages over that rank alone
    assert aggregate_across_ranks([({"r": 0.5, "x": 2.0}, 3), ({"r": 1.0}, 1)])["x"] == 2.0


def test_import_is_cheap():
    code = "import sys, rtdmd_ray.rewards, rtdmd_ray.rewards.multi; print('transformers' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"

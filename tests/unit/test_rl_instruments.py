"""The RL stage's instruments (issue: RL that measurably improves the student): per-term gradient norms,
zero-variance groups, per-tag training reward, the LoRA update size, and the tag-balanced prompt pool."""

from __future__ import annotations

import pytest
import torch

from rtdmd_ray.algorithms.grpo import zero_variance_group_fraction
from rtdmd_ray.config import ConfigError, DataConfig, load_config
from rtdmd_ray.data.prompts import balance_by_tag, training_prompt_records
from rtdmd_ray.roles.reward_pool import tag_reward_metrics
from rtdmd_ray.stages.learner_state import DistContext
from rtdmd_ray.stages.rl_step import TermGradients
from rtdmd_ray.types import ScoredBatch
from tests.unit.test_rl_step import TINY_CONFIG


def test_term_gradients_split_the_summed_gradient_exactly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    params = list(lin.parameters())
    xs = [torch.randn(4, 5) for _ in range(3)]

    def losses(x):
        y = lin(x)
        return [("subgrpo", y.square().mean()), ("aux_dmd", (y * 3.0).sin().sum()), ("bp", y.abs().mean())]

    # the reference: one backward of the sum per micro-batch, and each term's own gradient alone
    own = {}
    for k in ("subgrpo", "aux_dmd", "bp"):
        lin.zero_grad()
        for x in xs:
            (dict(losses(x))[k] / 3).backward()
        own[k] = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    lin.zero_grad(set_to_none=True)
    for x in xs:
        sum(v for _, v in losses(x)).div(3).backward()
    total = [p.grad.clone() for p in params]
    lin.zero_grad(set_to_none=True)

    tracker = TermGradients(params, DistContext(0, 1), averaged=True)
    for x in xs:
        tracker.backward(losses(x), 1.0 / 3)
        assert all(p.grad is None for p in params)  # the terms live in their own buffers until merge
    m = tracker.merge()
    for k, g in own.items():
        assert m[f"learner/grad_norm/{k}"] == pytest.approx(float(g.double().norm()), rel=1e-5)
    for p, t in zip(params, total, strict=True):
        torch.testing.assert_close(p.grad, t, rtol=1e-5, atol=1e-7)
    assert not any(k.startswith("learner/grad_cos_prev") for k in m)  # no previous step yet
    # a term with no gradient path (a zero loss) is skipped, not an error; the cosine compares steps
    lin.zero_grad(set_to_none=True)
    tracker.backward([("subgrpo", losses(xs[0])[0][1]), ("bp", torch.zeros(()))], 1.0)
    m2 = tracker.merge()
    assert "learner/grad_norm/bp" not in m2 and -1.0 <= m2["learner/grad_cos_prev/subgrpo"] <= 1.0
    # the same gradient twice: cosine 1
    lin.zero_grad(set_to_none=True)
    tracker.backward([("subgrpo", losses(xs[0])[0][1])], 1.0)
    assert tracker.merge()["learner/grad_cos_prev/subgrpo"] == pytest.approx(1.0, abs=1e-9)


def test_zero_variance_group_fraction():
    r = {"a": torch.tensor([1.0, 1, 0, 1, 2, 2]), "b": torch.tensor([0.0, 0, 0, 0, 0, 1])}
    prompts = ["x", "x", "y", "y", "z", "z"]
    assert zero_variance_group_fraction(r, {"a": 1.0}, prompts) == pytest.approx(2 / 3)
    assert zero_variance_group_fraction(r, {"a": 1.0, "b": 1.0}, prompts) == pytest.approx(1 / 3)
    # a reward at weight 0 is not trained, so its variance does not count
    assert zero_variance_group_fraction(r, {"a": 1.0, "b": 0.0}, prompts) == pytest.approx(2 / 3)
    valid = torch.tensor([True, True, False, True, True, True])  # y keeps one member: constant
    assert zero_variance_group_fraction(r, {"a": 1.0}, prompts, valid=valid) == 1.0


def test_tag_reward_metrics():
    scored = ScoredBatch.from_scores({"r": torch.tensor([1.0, 0.0, 0.5, float("nan")])}, {"r": 2.0})
    meta = [{"tag": "counting"}, {"tag": "counting"}, {"tag": "position"}, {"tag": "position"}]
    m = tag_reward_metrics(scored, meta)
    assert m["reward/by_tag/counting/total"] == pytest.approx(1.0)  # (2 + 0) / 2
    assert m["reward/by_tag/position/total"] == pytest.approx(1.0)  # the NaN one is quarantined
    assert m["reward/by_tag/position/share"] == 0.5
    assert tag_reward_metrics(scored, [{}] * 4) == {}
    with pytest.raises(ValueError, match="prompt records"):
        tag_reward_metrics(scored, meta[:3])


def test_balanced_pool_draws_every_tag_equally():
    pool = training_prompt_records(DataConfig(kind="shapes"))
    balanced = training_prompt_records(DataConfig(kind="shapes", balance_tags=True))
    counts: dict[str, int] = {}
    for r in balanced:
        counts[r["tag"]] = counts.get(r["tag"], 0) + 1
    biggest = max(sum(r["tag"] == t for r in pool) for t in counts)
    assert set(counts.values()) == {biggest} and len(counts) == 6
    assert {r["prompt"] for r in balanced} == {r["prompt"] for r in pool}  # repeats, nothing new
    a, b, c = {"prompt": "a", "tag": "x"}, {"prompt": "b", "tag": "y"}, {"prompt": "c", "tag": "y"}
    assert balance_by_tag([a, b, c]) == [a, a, b, c]
    with pytest.raises(ValueError, match="has no \"tag\""):
        balance_by_tag([{"prompt": "a"}])
    with pytest.raises(ConfigError, match="data.balance_tags"):
        load_config(TINY_CONFIG, ["data.balance_tags=true"]).validate()

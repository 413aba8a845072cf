"""Typed batches: shape checks name the field, index/split/cat round-trip, quarantine, metric namespaces."""

from __future__ import annotations

import math

import pytest
import torch

from rtdmd_ray.models.base import Conditioning
from rtdmd_ray.types import (
    BatchShapeError,
    PromptBatch,
    RolloutBatch,
    ScoredBatch,
    TrainMetrics,
    conditioning_key,
    quantize_images,
)

T, C, H, W, IMG = 4, 2, 3, 3, 8


def make_rollout(
    n: int = 4, *, version: int = 3, sampler: int = 0, seed: int = 0, **overrides
) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    fields = dict(
        latents=torch.randn(n, T, C, H, W, generator=g),
        next_latents=torch.randn(n, T, C, H, W, generator=g),
        log_probs=torch.randn(n, T, generator=g),
        sigmas=torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]),
        selected_steps=(0, 2),
        images=torch.randint(0, 256, (n, 3, IMG, IMG), dtype=torch.uint8, generator=g),
        prompts=[f"p{i // 2}" for i in range(n)],
        metadata=[{"i": i} for i in range(n)],
        seeds=torch.arange(n, dtype=torch.int64) + 100 * seed,
        group_ids=torch.arange(n, dtype=torch.int64) // 2,
        sampler_ids=torch.full((n,), sampler, dtype=torch.int64),
        epoch=1,
        policy_version=version,
        conditioning=Conditioning(
            {"prompt_embeds": torch.randn(n, 5, 6, generator=g), "pooled": torch.randn(n, 6, generator=g)}
        ),
        extras={"noise_preds": torch.randn(n, T, C, H, W, generator=g)},
    )
    fields.update(overrides)
    return RolloutBatch(**fields)


def test_prompt_batch_checks_groups_and_lengths():
    pb = PromptBatch(
        prompts=["a", "a", "b", "b"],
        metadata=[{}] * 4,
        group_ids=torch.tensor([0, 0, 1, 1]),
        seeds=torch.arange(4),
        epoch=0,
        policy_version=0,
    )
    assert len(pb) == 4
    assert [b.prompts for b in pb.split(2)] == [["a", "a"], ["b", "b"]]
    assert pb.index(torch.tensor([False, True, True, False])).prompts == ["a", "b"]
    with pytest.raises(BatchShapeError, match="group id 0 holds two different prompts"):
        PromptBatch(
            prompts=["a", "b"],
            metadata=[{}] * 2,
            group_ids=torch.tensor([0, 0]),
            seeds=torch.arange(2),
            epoch=0,
            policy_version=0,
        )
    with pytest.raises(BatchShapeError, match="`seeds`"):
        PromptBatch(
            prompts=["a", "b"],
            metadata=[{}] * 2,
            group_ids=torch.tensor([0, 1]),
            seeds=torch.arange(3),
            epoch=0,
            policy_version=0,
        )
    with pytest.raises(BatchShapeError, match="`metadata` has 1 entries"):
        PromptBatch(
            prompts=["a", "b"],
            metadata=[{}],
            group_ids=torch.tensor([0, 1]),
            seeds=torch.arange(2),
            epoch=0,
            policy_version=0,
        )


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("next_latents", torch.zeros(4, T, C, H, W + 1), "`next_latents`"),
        ("log_probs", torch.zeros(4, T + 1), "has T=4 steps"),
        ("sigmas", torch.zeros(T), r"`sigmas` must be \[T\+1\]"),
        ("images", torch.zeros(4, 3, IMG, IMG), "`images` must be torch.uint8"),
        ("images", torch.zeros(4, 4, IMG, IMG, dtype=torch.uint8), r"\[N, 3, H, W\]"),
        ("selected_steps", (2, 0), "`selected_steps`"),
        ("selected_steps", (4,), "`selected_steps`"),
        ("seeds", torch.zeros(3, dtype=torch.int64), "`seeds` has 3 rows"),
        ("sampler_ids", torch.zeros(4, dtype=torch.int32), "`sampler_ids` must be torch.int64"),
        ("extras", {"noise_preds": torch.zeros(5, T)}, "`extras.noise_preds`"),
    ],
)
def test_rollout_check_names_the_bad_field(field, value, match):
    with pytest.raises(BatchShapeError, match=match):
        make_rollout(**{field: value})


def test_rollout_needs_conditioning_or_key():
    with pytest.raises(BatchShapeError, match="conditioning_key"):
        make_rollout(conditioning=None)
    rb = make_rollout(conditioning=None, conditioning_key=conditioning_key(["p0"], "tiny-sd3"))
    assert rb.conditioning is None and rb.conditioning_key.startswith("tiny-sd3:")
    assert conditioning_key(["a", "b"], "e") != conditioning_key(["ab"], "e")  # separator matters


def test_rollout_split_cat_roundtrip_and_index():
    a, b = make_rollout(4, sampler=0, seed=1), make_rollout(2, sampler=1, seed=2)
    cat = RolloutBatch.cat([a, b])
    assert len(cat) == 6 and cat.num_steps == T
    assert cat.sampler_ids.tolist() == [0, 0, 0, 0, 1, 1]
    parts = cat.split([4, 2])
    for part, orig in zip(parts, [a, b], strict=True):
        assert torch.equal(part.latents, orig.latents) and torch.equal(part.images, orig.images)
        assert torch.equal(part.conditioning.tensors["pooled"], orig.conditioning.tensors["pooled"])
        assert torch.equal(part.extras["noise_preds"], orig.extras["noise_preds"])
        assert part.prompts == orig.prompts and part.metadata == orig.metadata
    assert [len(p) for p in cat.split(4)] == [4, 2]
    picked = cat.index(torch.tensor([5, 0]))
    assert picked.prompts == [b.prompts[1], a.prompts[0]]
    assert torch.equal(picked.log_probs[0], b.log_probs[1])
    mask = torch.tensor([True, False, False, False, False, True])
    assert torch.equal(cat.index(mask).seeds, torch.stack([a.seeds[0], b.seeds[1]]))


def test_rollout_cat_refuses_mixed_versions_and_schedules():
    with pytest.raises(BatchShapeError, match="policy_version"):
        RolloutBatch.cat([make_rollout(version=1), make_rollout(version=2)])
    other_sigmas = make_rollout(sigmas=torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0]))
    with pytest.raises(BatchShapeError, match="sigma schedule"):
        RolloutBatch.cat([make_rollout(), other_sigmas])
    with pytest.raises(BatchShapeError, match="optional fields"):
        RolloutBatch.cat([make_rollout(), make_rollout(extras={})])


def test_images_uint8_on_the_wire_float_view():
    x = torch.rand(2, 3, IMG, IMG)
    q = quantize_images(x)
    assert q.dtype == torch.uint8
    rb = make_rollout(2, images=q)
    assert rb.images_float.dtype == torch.float32
    assert float((rb.images_float - x).abs().max()) <= 0.5 / 255 + 1e-6
    assert quantize_images(torch.tensor([-1.0, 2.0, 0.5])).tolist() == [0, 255, 128]


def test_scored_batch_weighted_total_and_quarantine():
    scores = {
        "clip": torch.tensor([1.0, 2.0, float("nan"), 4.0]),
        "pick": torch.tensor([0.5, math.inf, 1.0, 1.0]),
        "strict_accuracy": torch.tensor([float("nan"), 1.0, 0.0, 1.0]),
    }  # unweighted: no quarantine
    sb = ScoredBatch.from_scores(scores, {"clip": 1.0, "pick": 2.0})
    assert sb.valid.tolist() == [True, False, False, True]
    assert sb.num_quarantined == 2 and sb.count == 4
    assert sb.total[0].item() == 2.0 and sb.total[3].item() == 6.0  # Σ w·r, not divided by Σw
    assert torch.isnan(sb.total[~sb.valid]).all()  # a quarantined sample poisons any silent average
    both = ScoredBatch.cat([sb, sb.index(slice(0, 1))])
    assert len(both) == 5 and both.valid.tolist() == [True, False, False, True, True]
    with pytest.raises(BatchShapeError, match=r"weighted rewards \['geneval'\] have no scores"):
        ScoredBatch.from_scores(scores, {"geneval": 1.0})
    with pytest.raises(BatchShapeError, match="marked valid"):
        ScoredBatch(
            scores={"a": torch.tensor([float("nan")])},
            weights={"a": 1.0},
            total=torch.tensor([float("nan")]),
            valid=torch.tensor([True]),
        )
    with pytest.raises(BatchShapeError, match="scores\\['a'\\]"):
        ScoredBatch(
            scores={"a": torch.zeros(3)}, weights={}, total=torch.zeros(2), valid=torch.ones(2, dtype=bool)
        )


def test_train_metrics_namespaces():
    m = TrainMetrics()
    m.add("timing/sample", 1.5)
    m.update("reward/pickscore", {"mean": torch.tensor(0.25), "std": 0.1})
    m.merge({"sync/bytes": 1024})
    assert m.as_dict() == {
        "timing/sample": 1.5,
        "reward/pickscore/mean": 0.25,
        "reward/pickscore/std": 0.1,
        "sync/bytes": 1024.0,
    }
    for bad in ["loss", "reward/mean", "learner/", "timing//x", "foo/bar"]:
        with pytest.raises(ValueError, match="metric key"):
            m.add(bad, 1.0)
    with pytest.raises(ValueError, match="scalar"):
        m.add("learner/loss", torch.zeros(2))
    with pytest.raises(ValueError, match="namespace"):
        TrainMetrics({"bad": 1.0})

"""ShapeWorld renderer, grammar, metadata and prompt sets (no model, no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rtdmd_ray.shapes import prompts as P
from rtdmd_ray.shapes import render as R

GENEVAL_TAGS = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}


def test_render_is_deterministic_from_the_seed():
    metas = P.balanced_eval_prompts(P.test_prompts(0), 5, seed=0)
    a = R.render_batch(metas, np.random.default_rng(7))
    b = R.render_batch(metas, np.random.default_rng(7))
    c = R.render_batch(metas, np.random.default_rng(8))
    assert a.shape == (30, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # pure palette colours on black: every channel is exactly 0 or 1
    assert set(a.unique().tolist()) == {0.0, 1.0}


def test_train_test_sets_are_disjoint_deterministic_and_cover_every_tag():
    train, test = P.split_prompts(0)
    train2, test2 = P.split_prompts(0)
    assert [m["prompt"] for m in train] == [m["prompt"] for m in train2]
    assert [m["prompt"] for m in test] == [m["prompt"] for m in test2]
    tr, te = {m["prompt"] for m in train}, {m["prompt"] for m in test}
    assert not tr & te
    assert len(tr) == len(train) and len(te) == len(test)  # no duplicate captions
    assert {m["tag"] for m in train} == {m["tag"] for m in test} == GENEVAL_TAGS
    other_train, _ = P.split_prompts(1)
    assert {m["prompt"] for m in other_train} != tr


def test_metadata_follows_the_geneval_schema():
    for m in P.all_prompts():
        assert set(m) <= {"tag", "include", "exclude", "prompt"}
        assert m["tag"] in GENEVAL_TAGS
        json.dumps(m)
        for inc in m["include"]:
            assert inc["class"] in P.SHAPES and inc["count"] >= 1
            assert set(inc) <= {"class", "count", "color", "position"}
            if "color" in inc:
                assert inc["color"] in P.COLORS and inc["color"] in m["prompt"]
            if "position" in inc:
                rel, ref = inc["position"]
                assert rel in P.RELATIONS and rel in m["prompt"] and 0 <= ref < len(m["include"])
        if m["tag"] == "counting":
            inc = m["include"][0]
            assert m["exclude"] == [{"class": inc["class"], "count": inc["count"] + 1}]
        n_words = len(m["prompt"].split())
        assert n_words + 2 <= P.MAX_TEXT_TOKENS, m["prompt"]


def test_layouts_respect_sizes_gaps_and_relations():
    rng = np.random.default_rng(0)
    for m in P.balanced_eval_prompts(P.all_prompts(), 30, seed=1):
        layout = R.sample_layout(m, rng)
        assert len(layout) == sum(inc["count"] for inc in m["include"])
        for o in layout:
            assert R.MIN_SIZE_PX <= o["size"] <= R.MAX_SIZE_PX
            x1, y1, x2, y2 = o["bbox"]
            assert 0 < x1 and 0 < y1 and x2 < 32 and y2 < 32
        for i, a in enumerate(layout):
            for b in layout[i + 1:]:
                assert R._separated(a["bbox"], b["bbox"])
        for j, inc in enumerate(m["include"]):
            if "position" in inc:
                rel, ref = inc["position"]
                assert rel in R.relations(layout[j]["bbox"], layout[ref]["bbox"])


def test_latent_codec_is_exactly_invertible():
    x = R.render_batch(P.balanced_eval_prompts(P.all_prompts(), 2, seed=0), np.random.default_rng(0))
    z = R.encode_latents(x)
    assert z.shape == (12, 12, 16, 16) and z.min() >= -1 and z.max() <= 1
    assert torch.equal(R.decode_latents(z), x)


def test_relations_follow_geneval_rule():
    a, b = (2, 10, 10, 18), (20, 10, 28, 18)
    assert R.relations(a, b) == {"left of"}
    assert R.relations(b, a) == {"right of"}
    assert R.relations((10, 2, 18, 10), (10, 20, 18, 28)) == {"above"}
    assert R.relations(a, a) == set()


@pytest.mark.parametrize("tag", sorted(GENEVAL_TAGS))
def test_training_sampler_covers_tag(tag):
    rng = np.random.default_rng(0)
    tags = {P.sample_training_prompt(rng)["tag"] for _ in range(300)}
    assert tag in tags

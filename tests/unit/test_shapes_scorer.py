"""The ``shapes_geneval`` scorer: ground truth passes, perturbed ground truth passes, wrong images fail."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rtdmd_ray.rewards.shapes_geneval import SENTINEL, ShapesGenevalScorer, classify_shape, label_components
from rtdmd_ray.shapes import prompts as P
from rtdmd_ray.shapes import render as R

N_PER_TAG = 30  # 180 test captions


@pytest.fixture(scope="module")
def truth():
    metas = P.balanced_eval_prompts(P.test_prompts(0), N_PER_TAG, seed=0)
    rng = np.random.default_rng(123)
    layouts = [R.sample_layout(m, rng) for m in metas]
    images = torch.stack([torch.from_numpy(R.draw(lay)).permute(2, 0, 1).float() / 255 for lay in layouts])
    return metas, layouts, images


def _score(images, metas):
    return ShapesGenevalScorer()(images, [m["prompt"] for m in metas], metas)


def _images(layouts):
    return torch.stack([torch.from_numpy(R.draw(lay)).permute(2, 0, 1).float() / 255 for lay in layouts])


def test_ground_truth_passes(truth):
    metas, _, images = truth
    out = _score(images, metas)
    assert out["strict_accuracy"].mean() >= 0.98
    assert out["exact_accuracy"].mean() >= 0.98
    assert out["accuracy"].mean() >= 0.98
    assert out["shapes_geneval"].mean() >= 0.98
    for tag in P.TAGS:
        v = out[f"{tag}_strict_accuracy"]
        is_tag = torch.tensor([m["tag"] == tag for m in metas])
        assert (v[~is_tag] == SENTINEL).all()
        assert v[is_tag].mean() >= 0.95


@pytest.mark.parametrize("noise_std", [20.0, 40.0])
def test_pixel_noise_is_tolerated(truth, noise_std):
    metas, _, images = truth
    g = torch.Generator().manual_seed(0)
    noisy = (images + torch.randn(images.shape, generator=g) * noise_std / 255).clamp(0, 1)
    assert _score(noisy, metas)["strict_accuracy"].mean() >= 0.98


def _ragged(img: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """Flip each edge pixel (an object pixel next to background, or background next to an object) with
    probability ``p``: erodes or dilates objects by one pixel at random places, like a generator's edges."""
    fg = img.any(-1)
    pad = np.pad(img, ((1, 1), (1, 1), (0, 0)))
    pfg = np.pad(fg, 1)
    out = img.copy()
    flip = rng.random(fg.shape) < p
    # background pixel next to an object: take that neighbour's colour
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        nb_fg = pfg[1 + dy:33 + dy, 1 + dx:33 + dx]
        nb_col = pad[1 + dy:33 + dy, 1 + dx:33 + dx]
        grow = flip & ~fg & nb_fg & ~out.any(-1)
        out[grow] = nb_col[grow]
    edge = fg & ~(pfg[:-2, 1:-1] & pfg[2:, 1:-1] & pfg[1:-1, :-2] & pfg[1:-1, 2:])
    out[flip & edge] = 0
    return out


def test_ragged_edges_and_jitter_are_tolerated(truth):
    metas, layouts, _ = truth
    rng = np.random.default_rng(0)
    ragged = [_ragged(R.draw(lay), rng, 0.2) for lay in layouts]
    images = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in ragged])
    assert _score(images, metas)["strict_accuracy"].mean() >= 0.9
    # 1-px jitter of each object's position keeps the composition
    jittered = copy.deepcopy(layouts)
    for lay in jittered:
        for o in lay:
            d = rng.integers(-1, 2, size=2)
            o["bbox"] = [int(o["bbox"][0] + d[0]), int(o["bbox"][1] + d[1]), int(o["bbox"][2] + d[0]),
                         int(o["bbox"][3] + d[1])]
    assert _score(_images(jittered), metas)["strict_accuracy"].mean() >= 0.95


def test_shape_templates_do_not_confuse_shapes():
    for shape in P.SHAPES:
        for size in range(7, 15):
            assert classify_shape(R.shape_mask(shape, size))[0] == shape
    # a 1-px erosion of a 12 px object keeps its class
    for shape in P.SHAPES:
        m = R.shape_mask(shape, 12)
        er = m.copy()
        er[1:-1, 1:-1] &= m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        er[0, :] = er[-1, :] = False
        er[:, 0] = er[:, -1] = False
        ys, xs = np.nonzero(er)
        assert classify_shape(er[ys.min():ys.max() + 1, xs.min():xs.max() + 1])[0] == shape


def _mutate(metas, layouts, fn):
    """Apply ``fn(meta, layout) -> layout | None`` and keep the captions where it applies."""
    keep_m, keep_l = [], []
    for m, lay in zip(metas, layouts, strict=True):
        new = fn(m, copy.deepcopy(lay))
        if new is not None:
            keep_m.append(m)
            keep_l.append(new)
    assert len(keep_m) >= 20
    return keep_m, _images(keep_l)


def test_wrong_colour_fails(truth):
    def recolour(m, lay):
        if not any("color" in inc for inc in m["include"]):
            return None
        want = next(inc["color"] for inc in m["include"] if "color" in inc)
        o = next(o for o in lay if o["color"] == want)
        o["color"] = P.COLORS[(P.COLORS.index(want) + 1) % len(P.COLORS)]
        if any(inc.get("color") == o["color"] and inc["class"] == o["shape"] for inc in m["include"]):
            return None
        return lay
    metas, images = _mutate(*truth[:2], recolour)
    assert _score(images, metas)["strict_accuracy"].max() == 0


def test_wrong_shape_fails(truth):
    def reshape(m, lay):
        o = lay[0]
        named = {inc["class"] for inc in m["include"]} | {o["shape"]}
        o["shape"] = next(s for s in P.SHAPES if s not in named)
        return lay
    metas, images = _mutate(*truth[:2], reshape)
    assert _score(images, metas)["strict_accuracy"].max() == 0


def test_wrong_count_fails(truth):
    def drop_one(m, lay):
        return lay[1:]
    metas, images = _mutate(*truth[:2], drop_one)
    assert _score(images, metas)["strict_accuracy"].max() == 0

    rng = np.random.default_rng(0)

    def add_one(m, lay):
        if m["tag"] != "counting":
            return None
        for _ in range(200):
            extra = R.sample_layout({"include": [{"class": lay[0]["shape"], "count": 1}]}, rng)
            if all(R._separated(extra[0]["bbox"], o["bbox"]) for o in lay):
                return lay + extra
        return None
    count_metas = [m for m in P.test_prompts(0) if m["tag"] == "counting"] * 6
    layouts = [R.sample_layout(m, rng) for m in count_metas]
    metas, images = _mutate(count_metas, layouts, add_one)
    out = _score(images, metas)
    assert out["strict_accuracy"].max() == 0 and out["accuracy"].max() == 0  # lenient: the exclude rule


def test_wrong_relation_fails(truth):
    def mirror(m, lay):
        if m["tag"] != "position":
            return None
        rel = m["include"][1]["position"][0]
        for o in lay:
            x1, y1, x2, y2 = o["bbox"]
            if rel in ("left of", "right of"):
                o["bbox"] = [32 - x2, y1, 32 - x1, y2]
            else:  # flip vertically (shapes are drawn upright again, only positions move)
                o["bbox"] = [x1, 32 - y2, x2, 32 - y1]
        return lay
    metas, images = _mutate(*truth[:2], mirror)
    out = _score(images, metas)
    assert out["strict_accuracy"].max() == 0
    assert out["position_strict_accuracy"].max() == 0


def test_components_are_4_connected():
    idx = np.zeros((6, 6), dtype=np.int64)
    idx[0:2, 0:2] = 1
    idx[2:4, 2:4] = 1  # touches the first block only diagonally: a separate component
    idx[0:2, 4:6] = 2
    lab = label_components(idx)
    assert len(np.unique(lab[lab >= 0])) == 3


def test_missing_metadata_teaches():
    with pytest.raises(ValueError, match="metadata"):
        ShapesGenevalScorer()(torch.zeros(2, 3, 32, 32), ["a", "b"], None)


def test_score_option_puts_strict_accuracy_in_the_main_key(truth):
    metas, layouts, _ = truth
    broken = copy.deepcopy(layouts)
    for lay in broken[::2]:  # every other image loses an object: strict fails, partial credit stays partial
        if len(lay) > 1:
            lay.pop()
    images = _images(broken)
    prompts = [m["prompt"] for m in metas]
    partial = ShapesGenevalScorer()(images, prompts, metas)
    strict = ShapesGenevalScorer(score="strict")(images, prompts, metas)
    assert torch.equal(strict["shapes_geneval"], partial["strict_accuracy"])
    assert torch.equal(strict["strict_accuracy"], partial["strict_accuracy"])
    assert not torch.equal(partial["shapes_geneval"], partial["strict_accuracy"])  # the option matters here
    with pytest.raises(ValueError, match="rewards.options.shapes_geneval.score"):
        ShapesGenevalScorer(score="lenient")

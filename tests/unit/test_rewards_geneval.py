"""GenEval rules on synthetic detections (spec §7.3) and the full scorer path on a tiny Mask2Former + CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdmd_ray.rewards._common import array_split_slices
from rtdmd_ray.rewards.geneval import (
    OBJECT_NAMES,
    TAGS,
    Detection,
    GenEvalScorer,
    compute_geneval,
    evaluate,
    evaluate_reward,
    instance_postprocess,
    mask_to_boxes,
    relative_position,
    select_detections,
)

torch.set_num_threads(1)


def raw_with(dets: dict[str, list[tuple[float, float, float, float, float]]]):
    """Raw detector output (per class: boxes [M, 5], no masks) from {class: [(x1, y1, x2, y2, score)]}."""
    raw = []
    for name in OBJECT_NAMES:
        rows = dets.get(name, [])
        raw.append((np.array(rows, dtype=np.float32).reshape(-1, 5), None))
    return raw


def colors_from(table: dict[str, list[str]]):
    def fn(image, objects, class_name):
        return table[class_name][: len(objects)]

    return fn


def no_colors(image, objects, class_name):
    raise AssertionError("colour classification must not run here")


def run(md, dets, colors=no_colors):
    objs = select_detections(raw_with(dets), md["tag"])
    return evaluate(None, objs, md, colors), *evaluate_reward(None, objs, md, colors)


COUNT_MD = {
    "tag": "counting",
    "prompt": "a photo of two wine glasses",
    "include": [{"class": "wine glass", "count": 2}],
    "exclude": [{"class": "wine glass", "count": 3}],
}
POS_MD = {
    "tag": "position",
    "prompt": "a photo of a cow right of a laptop",
    "include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": ["right of", 0]}],
}


def test_counting_exclude_and_threshold():
    three = [(0, 0, 10, 10, 0.95), (20, 0, 30, 10, 0.93), (40, 0, 50, 10, 0.91)]
    lenient, strict, score = run(COUNT_MD, {"wine glass": three})
    assert (lenient, strict) == (False, False) and score == pytest.approx(0.5)
    # one of the three at 0.85 is dropped by the 0.9 counting threshold
    lenient, strict, score = run(COUNT_MD, {"wine glass": three[:2] + [(40, 0, 50, 10, 0.85)]})
    assert (lenient, strict, score) == (True, True, 1.0)


def test_non_counting_threshold_is_0_3():
    md = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    assert run(md, {"dog": [(0, 0, 5, 5, 0.35)]}) == (True, True, 1.0)
    assert run(md, {"dog": [(0, 0, 5, 5, 0.25)]}) == (False, False, 0.0)


def test_position_right_and_left():
    laptop, cow_right, cow_left = (0, 0, 100, 100, 0.9), (300, 0, 400, 100, 0.9), (-300, 0, -200, 100, 0.9)
    objs = select_detections(raw_with({"laptop": [laptop], "cow": [cow_right]}), "position")
    assert relative_position(objs["cow"][0], objs["laptop"][0]) == {"right of"}
    assert run(POS_MD, {"laptop": [laptop], "cow": [cow_right]}) == (True, True, 1.0)
    lenient, strict, score = run(POS_MD, {"laptop": [laptop], "cow": [cow_left]})
    assert (lenient, strict) == (False, False) and score == pytest.approx(0.75)  # [1, 1, 0, 1]


def test_relative_position_edge_cases():
    a, b = Detection((0, 0, 10, 10), 1.0), Detection((1, 1, 11, 11), 1.0)
    assert relative_position(a, b) == set()  # shrunk offset < 1e-3
    c = Detection((100, 100, 110, 110), 1.0)
    assert relative_position(c, a) == {"right of", "below"}  # (100 - 2) / 141.4 = 0.693 on both axes
    assert relative_position(a, c) == {"left of", "above"}


def test_color_attr_partial_credit():
    md = {
        "tag": "color_attr",
        "include": [
            {"class": "handbag", "count": 1, "color": "pink"},
            {"class": "scissors", "count": 1, "color": "black"},
        ],
    }
    lenient, strict, score = run(md, {"handbag": [(0, 0, 9, 9, 0.8)]}, colors_from({"handbag": ["pink"]}))
    assert (lenient, strict) == (False, False) and score == pytest.approx(0.5)  # [1, 1, 0, 0]


def test_overcount_gives_negative_credit_and_no_nms():
    md = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    same = (0, 0, 10, 10, 0.8)
    lenient, strict, score = run(md, {"cat": [same, same, same]})  # duplicates are all kept: no NMS
    assert score == pytest.approx(-1.0) and not strict and lenient  # lenient only looks at the top one


def test_top16_cap_and_absent_classes():
    many = [(i, 0, i + 1, 1, 0.5 + i / 100) for i in range(20)]
    objs = select_detections(raw_with({"person": many}), "single_object")
    assert len(objs["person"]) == 16 and set(objs) == {"person"}
    assert [d.score for d in objs["person"]] == sorted((d.score for d in objs["person"]), reverse=True)


def test_compute_geneval_only_strict_and_per_tag_sentinels():
    mds = [dict(COUNT_MD), {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}]
    dets = [
        select_detections(raw_with({"wine glass": [(0, 0, 1, 1, 0.95), (5, 0, 6, 1, 0.95)]}), "counting"),
        select_detections(raw_with({}), "single_object"),
    ]
    out = compute_geneval([None, None], dets, mds, no_colors, only_strict=True)
    assert out["accuracy"] == [0.0, 0.0] and out["strict_accuracy"] == [1.0, 0.0]
    assert out["geneval"] == [1.0, 0.0]
    assert len([k for k in out if k.endswith("_strict_accuracy") and k != "strict_accuracy"]) == 6
    assert out["counting_strict_accuracy"] == [1.0, -10.0] and out["single_object_accuracy"] == [-10.0, 0.0]
    lenient = compute_geneval([None, None], dets, mds, no_colors, only_strict=False)
    assert lenient["accuracy"] == [1.0, 0.0] and lenient["counting_accuracy"] == [1.0, -10.0]
    assert set(TAGS) == {
        k[: -len("_accuracy")]
        for k in out
        if k.endswith("_accuracy") and "strict" not in k and k != "accuracy"
    }


def test_batch_split_is_array_split():
    assert [s.stop - s.start for s in array_split_slices(130, 64)] == [44, 43, 43]
    assert [(s.start, s.stop) for s in array_split_slices(64, 64)] == [(0, 64)]


class FakeDetector:
    def __init__(self, raws):
        self.raws, self.calls = raws, []

    def detect(self, images_rgb):
        self.calls.append(len(images_rgb))
        return [self.raws[i % len(self.raws)] for i in range(len(images_rgb))]


def test_scorer_metadata_checks_and_keys():
    det = FakeDetector([raw_with({"dog": [(0, 0, 5, 5, 0.9)]})])
    s = GenEvalScorer(detector_obj=det, color_fn=no_colors, batch_images=2)
    md = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    x = torch.zeros(3, 3, 8, 8)
    for bad in (None, [], [md]):
        with pytest.raises(ValueError, match="metadata"):
            s(x, ["p"] * 3, bad)
    with pytest.raises(KeyError, match="tag"):
        s(x, ["p"] * 3, [{"include": []}] * 3)
    out = s(x, ["ignored"] * 3, [md] * 3)
    assert det.calls == [2, 1]
    assert torch.equal(out["geneval"], torch.ones(3)) and torch.equal(out["accuracy"], torch.ones(3))
    assert len(out) == 3 + 12


def test_instance_postprocess_and_mask_boxes():
    masks = torch.zeros(1, 6, 8, dtype=torch.bool)
    masks[0, 2:5, 1:6] = True
    assert mask_to_boxes(masks).tolist() == [[1.0, 2.0, 6.0, 5.0]]
    assert mask_to_boxes(torch.zeros(1, 4, 4, dtype=torch.bool)).tolist() == [[0.0, 0.0, 0.0, 0.0]]
    cls = torch.tensor([[0.0, 8.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])  # query 1 is "no object"
    logits = torch.full((2, 6, 8), -4.0)
    logits[0, 2:5, 1:6] = 3.0
    raw = instance_postprocess(cls, logits, num_classes=3, max_per_image=6)
    boxes1 = raw[1][0]
    best = boxes1[boxes1[:, 4].argmax()]
    p = torch.softmax(cls[0], -1)[1].item() * torch.sigmoid(torch.tensor(3.0)).item()
    assert best[:4].tolist() == [1.0, 2.0, 6.0, 5.0] and best[4] == pytest.approx(p, rel=1e-5)
    assert sum(len(r[0]) for r in raw) == 6 and raw[1][1].shape[1:] == (6, 8)


def test_tiny_mask2former_and_clip_full_path(tmp_path):
    from rtdmd_ray.rewards.tiny import save_tiny_clip, save_tiny_mask2former

    m2f = save_tiny_mask2former(tmp_path / "m2f")
    clip = save_tiny_clip(tmp_path / "clip")
    s = GenEvalScorer(detector_model=str(m2f), clip_model=str(clip))
    # the random detector is confident about nothing: force every detection through with a low threshold
    raw = s.detector.detect([np.zeros((40, 56, 3), np.uint8)])[0]
    assert len(raw) == 80 and all(b.shape[1] == 5 for b, _ in raw)
    assert all(m.shape[1:] == (40, 56) for b, m in raw if len(b))
    dets = {
        OBJECT_NAMES[c]: [Detection(tuple(b[i, :4]), float(b[i, 4]), m[i]) for i in range(len(b))]
        for c, (b, m) in enumerate(raw)
        if len(b)
    }
    name = next(iter(dets))
    from PIL import Image

    colors = s.colors(Image.new("RGB", (56, 40), (200, 30, 30)), dets[name][:3], name)
    assert len(colors) == min(3, len(dets[name])) and all(
        c in ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
        for c in colors
    )
    md = {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}]}
    out = s(torch.rand(2, 3, 40, 56), ["a red dog"] * 2, [md, md])
    assert out["geneval"].shape == (2,) and out["colors_accuracy"].shape == (2,)

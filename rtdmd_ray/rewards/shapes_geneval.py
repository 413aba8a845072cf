"""``shapes_geneval``: the GenEval analogue for ShapeWorld images (non-differentiable).

Detection replaces Mask2Former + CLIP colour classification with exact tools for this world:

1. Each pixel goes to the nearest of the palette's six colours or the black background (RGB distance);
   pixels farther than ``max_color_dist`` from every entry count as background.
2. Objects are 4-connected components of one colour, at least ``min_area_px`` pixels.
3. A component's class is the shape whose template (circle/square/triangle masks at sizes around the
   component's bbox, placed at offsets around it) reaches the best IoU with it; below ``min_iou`` the
   component is an object of no class (``"blob"``). IoU tolerates ragged edges a generator makes, and a
   wrong shape loses to its own template (tests/unit/test_shapes_scorer.py checks both).
4. Relations use GenEval's rule on component bboxes (``rtdmd_ray.shapes.render.relations``).

The rules on top are the reference's (spec rewards-inference.md §1.8): the strict check + partial credit of
``evaluate_reward`` (main key ``shapes_geneval`` = partial credit, ``strict_accuracy``), the lenient
``evaluate`` (``accuracy``; extra objects allowed), and per-tag ``{tag}_accuracy``/``{tag}_strict_accuracy``
with the −10 sentinel for images of other tags. GenEval ignores objects of classes the caption does not
name; ``exact_accuracy`` additionally requires that no other object is present (the stricter ShapeWorld view).
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rtdmd_ray.shapes.prompts import COLORS, SHAPES, TAGS
from rtdmd_ray.shapes.render import PALETTE_RGB, RESOLUTION_PX, relations, shape_mask

SENTINEL = -10.0
_PALETTE = np.array([(0, 0, 0)] + [PALETTE_RGB[c] for c in COLORS], dtype=np.float32)  # [7, 3], 0 = bg


def label_components(color_index: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-zero colour index (breadth-first search; images are tiny).

    Args:
        color_index: ``int [H, W]``, 0 = background, k > 0 = palette colour k.
    Returns:
        ``int64 [H, W]`` labels: -1 on background, else the component number 0, 1, ...
    """
    h, w = color_index.shape
    col = color_index.ravel().tolist()
    lab = [-1] * (h * w)
    n = 0
    for start in np.flatnonzero(color_index).tolist():
        if lab[start] >= 0:
            continue
        c = col[start]
        lab[start] = n
        stack = [start]
        while stack:
            p = stack.pop()
            y, x = divmod(p, w)
            for q, ok in ((p - w, y > 0), (p + w, y < h - 1), (p - 1, x > 0), (p + 1, x < w - 1)):
                if ok and lab[q] < 0 and col[q] == c:
                    lab[q] = n
                    stack.append(q)
        n += 1
    return np.array(lab, dtype=np.int64).reshape(h, w)


@cache
def _template_bank(side_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Kernels ``int32 [3 * 5, S, S]`` (every shape at sizes ``side - 2 .. side + 2``, top-left aligned,
    S = side + 2) and their areas ``[15]``. The max over positions of a valid correlation then equals the max
    over template placements, so one product scores every shape, size and position."""
    sizes = range(max(3, side_px - 2), side_px + 3)
    big = side_px + 2
    k = np.zeros((len(SHAPES) * len(sizes), big, big), dtype=np.int32)
    for i, (shape, s) in enumerate((sh, s) for sh in SHAPES for s in sizes):
        k[i, :s, :s] = shape_mask(shape, s)
    return k, k.sum((1, 2))


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best-IoU shape of a component mask cropped to its bbox (``bool [h, w]``): ``(shape, iou)``.

    Templates of every shape at sizes ``max(h, w) - 2 .. + 2`` are tried at every placement overlapping the
    component; the IoU of a placement is ``inter / (area + template_area - inter)``. Numpy only: torch's
    thread pool stalls badly on a loaded machine for such tiny ops.
    """
    h, w = mask.shape
    kernels, t_area = _template_bank(max(h, w))
    big = kernels.shape[-1]
    canvas = np.zeros((h + 2 * big, w + 2 * big), dtype=np.int32)
    canvas[big:big + h, big:big + w] = mask
    windows = np.lib.stride_tricks.sliding_window_view(canvas, (big, big))  # [nh, nw, S, S]
    inter = np.einsum("ijkl,ckl->cij", windows, kernels).reshape(len(kernels), -1).max(1)  # [15]
    iou = inter / (float(mask.sum()) + t_area - inter)
    k = int(iou.argmax())
    return SHAPES[k // (len(kernels) // len(SHAPES))], float(iou[k])


def detect_objects(image_u8: np.ndarray, *, max_color_dist: float = 110.0, min_area_px: int = 15,
                   min_iou: float = 0.6) -> list[dict[str, Any]]:
    """Objects in one ``uint8 [H, W, 3]`` image, largest first.

    Returns ``[{class, color, bbox (x1, y1, x2, y2 exclusive), area, iou}]``.
    """
    px = image_u8.astype(np.float32)
    dist = np.linalg.norm(px[:, :, None, :] - _PALETTE[None, None], axis=-1)  # [H, W, 7]
    idx = dist.argmin(-1)
    idx[dist.min(-1) > max_color_dist] = 0
    lab = label_components(idx)
    objs = []
    for comp in np.unique(lab[lab >= 0]):
        m = lab == comp
        area = int(m.sum())
        if area < min_area_px:
            continue
        ys, xs = np.nonzero(m)
        y1, y2, x1, x2 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        shape, iou = classify_shape(m[y1:y2, x1:x2])
        color = COLORS[int(idx[ys[0], xs[0]]) - 1]
        objs.append({"class": shape if iou >= min_iou else "blob", "color": color,
                     "bbox": (x1, y1, x2, y2), "area": area, "iou": round(iou, 3)})
    # largest first: the lenient rule takes the "top count" detections (GenEval sorts by confidence)
    objs.sort(key=lambda o: -o["area"])
    return objs


def _holds(objs_a: list[dict[str, Any]], objs_b: list[dict[str, Any]], relation: str) -> bool:
    return all(relation in relations(a["bbox"], b["bbox"]) for a in objs_a for b in objs_b)


def evaluate_strict(objs: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[bool, float]:
    """GenEval's ``evaluate_reward``: ``(strict_correct, partial_credit)``; exclude entries ignored."""
    correct, scores = True, []
    groups: list[list[dict[str, Any]] | None] = []
    for inc in meta["include"]:
        count = int(inc["count"])
        found = [o for o in objs if o["class"] == inc["class"]]
        scores.append(1 - abs(count - len(found)) / count)
        if len(found) != count:
            correct = False
            if "color" in inc or "position" in inc:
                scores.append(0.0)
            groups.append(None)
            continue
        if "color" in inc:
            n_color = sum(o["color"] == inc["color"] for o in found)
            scores.append(1 - abs(count - n_color) / count)
            if n_color != count:
                correct = False
        if "position" in inc and correct:
            rel, ref = inc["position"]
            target = groups[ref]
            if target is None:
                correct = False
                scores.append(0.0)
            else:
                for a in found:
                    if not _holds([a], target, rel):
                        scores.append(0.0)
                        correct = False
                        break
                scores.append(1.0)  # appended after the loop even on failure (reference quirk, spec §1.8)
        groups.append(found)
    return correct, float(np.mean(scores)) if scores else 0.0


def evaluate_lenient(objs: list[dict[str, Any]], meta: dict[str, Any]) -> bool:
    """GenEval's official ``evaluate``: top-``count`` detections per class; extra objects allowed."""
    groups: list[list[dict[str, Any]] | None] = []
    for inc in meta["include"]:
        count = int(inc["count"])
        found = [o for o in objs if o["class"] == inc["class"]][:count]
        if len(found) < count:
            return False
        if "color" in inc and sum(o["color"] == inc["color"] for o in found) < count:
            return False
        if "position" in inc:
            rel, ref = inc["position"]
            if groups[ref] is None or not _holds(found, groups[ref], rel):
                return False
        groups.append(found)
    for exc in meta.get("exclude", []):
        if sum(o["class"] == exc["class"] for o in objs) >= int(exc["count"]):
            return False
    return True


def evaluate_exact(objs: list[dict[str, Any]], meta: dict[str, Any]) -> bool:
    """Strict, and no object beyond the caption's (no other class, no blob)."""
    return (evaluate_strict(objs, meta)[0]
            and len(objs) == sum(int(inc["count"]) for inc in meta["include"]))


class ShapesGenevalScorer:
    """GenEval rules on ShapeWorld images (palette + connected components + shape templates).

    Args:
        ckpt_dir, device: accepted for the registry's uniform constructor; unused (no weights, CPU numpy).
        max_color_dist: RGB distance (0-255 units) beyond which a pixel is background.
        min_area_px: smaller components are ignored (generator speckle).
        min_iou: a component whose best template IoU is lower has no shape class.
        score: what the main key ``shapes_geneval`` (the trained reward) holds: ``"partial"`` (GenEval's
            partial credit, the reference) or ``"strict"`` (strict accuracy, what the tables judge; a wrong
            relation then costs the whole reward instead of a quarter). ``strict_accuracy`` and the other keys
            are returned either way. Set it with ``rewards.options: {shapes_geneval: {score: strict}}``.
    """

    name = "shapes_geneval"
    differentiable = False

    def __init__(self, *, ckpt_dir: str | os.PathLike[str] | None = None, device: str = "cpu",
                 max_color_dist: float = 110.0, min_area_px: int = 15, min_iou: float = 0.6,
                 score: str = "partial") -> None:
        if score not in ("partial", "strict"):
            raise ValueError(f"rewards.options.shapes_geneval.score={score!r}: use 'partial' or 'strict'")
        self.max_color_dist, self.min_area_px, self.min_iou = max_color_dist, min_area_px, min_iou
        self.score = score

    def detect(self, images: torch.Tensor) -> list[list[dict[str, Any]]]:
        """Objects per image of ``images [B, 3, H, W]`` in [0, 1] (resized to 32 px by area if needed)."""
        x = images.detach().float().cpu()
        if x.shape[-1] != RESOLUTION_PX or x.shape[-2] != RESOLUTION_PX:
            x = F.adaptive_avg_pool2d(x, RESOLUTION_PX)
        u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [detect_objects(im, max_color_dist=self.max_color_dist, min_area_px=self.min_area_px,
                               min_iou=self.min_iou) for im in u8]

    def __call__(self, images: torch.Tensor, prompts: list[str],
                 metadata: list[dict[str, Any]] | None = None) -> dict[str, torch.Tensor]:
        if metadata is None or len(metadata) != images.shape[0]:
            n = None if metadata is None else len(metadata)
            raise ValueError(f"shapes_geneval needs one metadata dict per image (got {n} for "
                             f"{images.shape[0]} images); pass the prompt set's jsonl rows "
                             "(rtdmd_ray.shapes.prompts)")
        detections = self.detect(images)
        partial, strict, lenient, exact = [], [], [], []
        for objs, meta in zip(detections, metadata, strict=True):
            ok, score = evaluate_strict(objs, meta)
            partial.append(score)
            strict.append(float(ok))
            lenient.append(float(evaluate_lenient(objs, meta)))
            exact.append(float(evaluate_exact(objs, meta)))
        out = {self.name: torch.tensor(partial if self.score == "partial" else strict, dtype=torch.float32),
               "strict_accuracy": torch.tensor(strict, dtype=torch.float32),
               "accuracy": torch.tensor(lenient, dtype=torch.float32),
               "exact_accuracy": torch.tensor(exact, dtype=torch.float32)}
        for tag in TAGS:
            is_tag = [m["tag"] == tag for m in metadata]
            out[f"{tag}_accuracy"] = torch.tensor(
                [v if t else SENTINEL for v, t in zip(lenient, is_tag, strict=True)], dtype=torch.float32)
            out[f"{tag}_strict_accuracy"] = torch.tensor(
                [v if t else SENTINEL for v, t in zip(strict, is_tag, strict=True)], dtype=torch.float32)
        return out

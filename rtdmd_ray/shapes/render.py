"""ShapeWorld renderer: flat-coloured circles, squares and triangles on a black 32×32 canvas.

Lessons of the feasibility run applied: objects are 8–12 px (6 px triangles do not read as triangles at
32 px) and bounding boxes keep a gap of at least 3 px (touching objects merged into one blob). Colours are
the six pure RGB corners, so every pixel channel of a clean image is exactly 0 or 255.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import torch

from rtdmd_ray.shapes.prompts import COLORS, SHAPES

RESOLUTION_PX = 32
MIN_SIZE_PX = 8
MAX_SIZE_PX = 12
MIN_GAP_PX = 3
BORDER_PX = 1
# the renderer asks more of a relation than the checker does (0.5), so ground truth passes with a margin
RENDER_RELATION_THRESHOLD = 0.7

PALETTE_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
assert tuple(PALETTE_RGB) == COLORS


@cache
def shape_mask(shape: str, size_px: int) -> np.ndarray:
    """Boolean ``[size_px, size_px]`` mask of a shape filling its square box (sampled at pixel centres)."""
    c = (np.arange(size_px) + 0.5) / size_px  # pixel centres in [0, 1]
    yy, xx = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        m = np.ones((size_px, size_px), dtype=bool)
    elif shape == "circle":
        m = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= 0.25 + 1e-9
    elif shape == "triangle":
        # upward isosceles: apex at the top centre, base along the bottom row; each row's half-width is
        # taken at its lower edge so the apex row is never empty (tight bbox == the box)
        m = np.abs(xx - 0.5) <= 0.5 * (yy + 0.5 / size_px) + 1e-9
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    m.setflags(write=False)
    return m


def relations(box_a: tuple[float, float, float, float], box_b: tuple[float, float, float, float],
              threshold: float = 0.5) -> set[str]:
    """GenEval's relative position of A with respect to B (spec rewards-inference.md §1.8).

    Boxes are ``(x1, y1, x2, y2)`` in pixels; y grows downward. Returns a subset of
    {"left of", "right of", "above", "below"}.
    """
    ca = np.array([(box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2])
    cb = np.array([(box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2])
    dim_a = np.array([abs(box_a[2] - box_a[0]), abs(box_a[3] - box_a[1])])
    dim_b = np.array([abs(box_b[2] - box_b[0]), abs(box_b[3] - box_b[1])])
    offset = ca - cb
    r = np.maximum(np.abs(offset) - 0.1 * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(r) < 1e-3):
        return set()
    dx, dy = r / np.linalg.norm(offset)
    out = set()
    if dx < -threshold:
        out.add("left of")
    if dx > threshold:
        out.add("right of")
    if dy < -threshold:
        out.add("above")
    if dy > threshold:
        out.add("below")
    return out


def _objects_for(meta: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Expand the metadata's include entries into objects; unnamed colours are drawn at random."""
    objs = []
    for i, inc in enumerate(meta["include"]):
        for _ in range(int(inc["count"])):
            color = inc.get("color") or COLORS[int(rng.integers(len(COLORS)))]
            objs.append({"shape": inc["class"], "color": color, "include_index": i})
    return objs


def _separated(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    # boxes (x1, y1, x2, y2) with exclusive x2/y2: separated by >= MIN_GAP_PX along some axis
    return (b[0] - a[2] >= MIN_GAP_PX or a[0] - b[2] >= MIN_GAP_PX
            or b[1] - a[3] >= MIN_GAP_PX or a[1] - b[3] >= MIN_GAP_PX)


def sample_layout(
    meta: dict[str, Any], rng: np.random.Generator, max_tries: int = 2000
) -> list[dict[str, Any]]:
    """Objects with ``shape, color, size, bbox (x1, y1, x2, y2 exclusive), center`` satisfying ``meta``.

    Rejection sampling of sizes and positions; position captions also require the GenEval relation with
    margin (``RENDER_RELATION_THRESHOLD``).
    """
    objs = _objects_for(meta, rng)
    rel_req = [(j, inc["position"]) for j, inc in enumerate(meta["include"]) if inc.get("position")]
    max_size = MAX_SIZE_PX if len(objs) <= 2 else (11 if len(objs) == 3 else 10)
    for _ in range(max_tries):
        boxes: list[tuple[int, int, int, int]] = []
        ok = True
        for _o in objs:
            s = int(rng.integers(MIN_SIZE_PX, max_size + 1))
            for _t in range(50):
                x = int(rng.integers(BORDER_PX, RESOLUTION_PX - BORDER_PX - s + 1))
                y = int(rng.integers(BORDER_PX, RESOLUTION_PX - BORDER_PX - s + 1))
                box = (x, y, x + s, y + s)
                if all(_separated(box, b) for b in boxes):
                    boxes.append(box)
                    break
            else:
                ok = False
                break
        if not ok:
            continue
        for j, (rel, ref) in rel_req:
            a = next(k for k, o in enumerate(objs) if o["include_index"] == j)
            b = next(k for k, o in enumerate(objs) if o["include_index"] == ref)
            if rel not in relations(boxes[a], boxes[b], RENDER_RELATION_THRESHOLD):
                ok = False
        if ok:
            out = []
            for o, (x1, y1, x2, y2) in zip(objs, boxes, strict=True):
                out.append({"shape": o["shape"], "color": o["color"], "size": x2 - x1,
                            "bbox": [x1, y1, x2, y2], "center": [(x1 + x2) / 2, (y1 + y2) / 2]})
            return out
    raise RuntimeError(f"could not place the objects of {meta.get('prompt')!r} in {max_tries} tries")


def draw(layout: list[dict[str, Any]], resolution_px: int = RESOLUTION_PX) -> np.ndarray:
    """``uint8 [H, W, 3]`` image of a layout on a black background."""
    img = np.zeros((resolution_px, resolution_px, 3), dtype=np.uint8)
    for o in layout:
        x1, y1, x2, y2 = o["bbox"]
        m = shape_mask(o["shape"], x2 - x1)
        img[y1:y2, x1:x2][m] = PALETTE_RGB[o["color"]]
    return img


def render(meta: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image ``uint8 [32, 32, 3]`` for a caption's metadata, and its layout."""
    layout = sample_layout(meta, rng)
    return draw(layout), layout


def render_batch(metas: list[dict[str, Any]], rng: np.random.Generator) -> torch.Tensor:
    """Images ``float32 [B, 3, 32, 32]`` in [0, 1] for a list of caption metadata."""
    imgs = np.stack([render(m, rng)[0] for m in metas])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255.0)


def encode_latents(images: torch.Tensor) -> torch.Tensor:
    """The exact invertible latent map: ``[B, 3, 32, 32]`` in [0, 1] -> ``[B, 12, 16, 16]`` in [-1, 1]."""
    return torch.nn.functional.pixel_unshuffle(images * 2.0 - 1.0, 2)


def decode_latents(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of ``encode_latents`` (differentiable): ``[B, 12, 16, 16]`` -> ``[B, 3, 32, 32]`` in [0, 1]."""
    return (torch.nn.functional.pixel_shuffle(latents, 2) / 2 + 0.5).clamp(0, 1)

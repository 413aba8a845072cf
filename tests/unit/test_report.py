"""The eval report (rtdmd_ray/report.py): HTML structure, bar geometry, and a headless-Chromium rendering
whose screenshot must show the image grid and the chart bars where the metadata says (pixel statistics)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rtdmd_ray.eval.report import (
    ROW_COLORS,
    THUMB_PX,
    find_chromium,
    render_report,
    screenshot,
    write_report,
)

# solid image colours per row, far from every bar colour (tab10) and from the page's greys
IMAGE_RGB = {"teacher-50": (0, 255, 0), "AC-DMD-4": (255, 0, 255)}
VALUES = {  # reward -> (teacher-50, AC-DMD-4)
    "brightness": (0.8, 0.4),
    "shapes_geneval": (0.3, 0.6),
}
GRID = 6


def _metadata(root: Path) -> dict:
    grid = [{"dataset": "shapes_test", "index": i, "prompt": f"a photo of {i} circles <b>", "seed": 42 + i,
             "file": f"shapes_test_{i:06d}.png"} for i in range(GRID)]
    rows = []
    for k, (name, rgb) in enumerate(IMAGE_RGB.items()):
        (root / name / "images").mkdir(parents=True, exist_ok=True)
        for g in grid:
            Image.fromarray(np.full((16, 16, 3), rgb, np.uint8)).save(root / name / "images" / g["file"])
        scores = {r: v[k] for r, v in VALUES.items()}
        scores["mean"] = sum(scores.values())
        rows.append({
            "name": name, "dir": name, "overrides": [], "config_hash": f"hash{k}", "skipped": None,
            "sampler": {"mode": "teacher", "num_steps": 50, "guidance_scale": 5.0} if k == 0 else
            {"mode": "distilled", "num_steps": 4, "eta": 0.9},
            "lora_paths": [] if k == 0 else ["rtdmd_ray/shapes/assets/acdmd/generator_ema.safetensors"],
            "num_images": GRID, "scores": scores,
            "per_tag": {"shapes_geneval": {
                "colors": {"accuracy": 0.75 - 0.5 * k, "strict_accuracy": 0.5, "count": 4.0},
                "counting": {"accuracy": 0.25, "strict_accuracy": 0.125, "count": 2.0},
                "overall": {"accuracy": 0.5 - 0.25 * k, "strict_accuracy": 0.3125, "count": 6.0}}},
        })
    rows.append({"name": "RTDMD-4", "dir": "RTDMD-4", "skipped": "LoRA file(s) not found: rtdmd.safetensors",
                 "sampler": {"mode": "distilled", "num_steps": 4, "eta": 0.9}, "lora_paths": ["a", "b"],
                 "config_hash": "hash2"})
    return {"seed": 42, "reward_weights": {"brightness": 1.0, "shapes_geneval": 1.0},
            "prompt_sets": [{"name": "shapes_test", "num_prompts": GRID, "rewards": list(VALUES)}],
            "grid": grid, "rows": rows}


def test_report_html_structure(tmp_path):
    md = _metadata(tmp_path)
    html = render_report(md, "eval <test>")
    assert "<title>eval &lt;test&gt;</title>" in html and "<b>" not in html  # prompts are escaped
    assert html.count("<svg") == 3  # brightness, shapes_geneval, mean (2 rewards)
    assert 'class="placeholder">skipped' in html and "LoRA file(s) not found" in html
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 2 * GRID and all((tmp_path / s).is_file() for s in srcs)
    assert "0.75 / 0.5" in html and "0.25 / 0.125" in html and "n=6" in html
    # bar heights within a chart are proportional to the values (the axis starts at 0)
    for chart in re.findall(r"<svg.*?</svg>", html, flags=re.S)[:2]:
        title = re.search(r'aria-label="([^"]+)"', chart).group(1)
        heights = [float(h) for h in re.findall(r'class="bar"[^>]*height="([0-9.]+)"', chart)]
        want = VALUES[title]
        assert heights[0] / heights[1] == pytest.approx(want[0] / want[1], rel=0.02)
    path = write_report(tmp_path, md)
    assert path == tmp_path / "report.html"
    assert path.read_text() == render_report(md, f"rtdmd-ray eval: {tmp_path.name}")


def test_negative_values_share_the_zero_line():
    from rtdmd_ray.eval.report import bar_chart_svg

    svg = bar_chart_svg("r", ["a", "b"], [-1.0, 3.0], ["#000000", "#111111"])
    ys = [float(v) for v in re.findall(r'class="bar"[^>]*y="([0-9.]+)"', svg)]
    hs = [float(v) for v in re.findall(r'class="bar"[^>]*height="([0-9.]+)"', svg)]
    # the negative bar hangs from the zero line where the positive one stands
    assert ys[0] == pytest.approx(ys[1] + hs[1], abs=0.11) and hs[1] / hs[0] == pytest.approx(3.0, rel=0.02)


def _components(mask: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """(top, left, height, width, pixel count) of each 8-connected component of a boolean mask."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        out.append((sl[0].start, sl[1].start, sl[0].stop - sl[0].start, sl[1].stop - sl[1].start,
                    int((lab[sl] == i).sum())))
    return out


def _hex(c: str) -> tuple[int, int, int]:
    return tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))


@pytest.mark.skipif(
    find_chromium() is None,
    reason="no Chromium: run scripts/install_chromium.sh to render the report in a headless browser",
)
def test_report_screenshot_shows_images_and_bars(tmp_path):
    md = _metadata(tmp_path)
    page = write_report(tmp_path, md)
    width, height = 1100, 1500
    png = screenshot(page, tmp_path / "shot.png", width=width, height=height)
    shot = np.asarray(Image.open(png).convert("RGB"))
    assert shot.shape == (height, width, 3)
    # mostly white: a page, not a blank or error render
    assert (shot.reshape(-1, 3) == 255).all(axis=1).mean() > 0.3

    # the grid: each row's images are drawn as THUMB_PX squares, one per prompt, in one horizontal line
    tops = {}
    for name, rgb in IMAGE_RGB.items():
        comps = _components((shot == rgb).all(axis=2))
        assert len(comps) == GRID, f"{name}: expected {GRID} images drawn, found {len(comps)}"
        assert all(h == THUMB_PX and w == THUMB_PX and n == THUMB_PX**2 for _, _, h, w, n in comps)
        assert len({t for t, *_ in comps}) == 1
        tops[name] = comps[0][0]
    assert tops["AC-DMD-4"] > tops["teacher-50"]  # rows in metadata order, same columns (prompts) above

    # the charts: one bar per (chart, row) in the row's colour; swatches (10 px) are excluded by size
    bars = []
    for k, name in enumerate(IMAGE_RGB):
        comps = [c for c in _components((shot == _hex(ROW_COLORS[k])).all(axis=2)) if c[2] > 12]
        assert len(comps) == 3, f"{name}: expected 3 bars (2 rewards + mean), found {len(comps)}"
        bars += [(top + h, left, h, name) for top, left, h, _, _ in comps]
    # charts fill the page left to right, then down; within a chart the rows' bars stand left to right
    bars.sort()
    for i, reward in enumerate([*VALUES, "mean"]):
        a, b = bars[2 * i], bars[2 * i + 1]
        assert (a[3], b[3]) == tuple(IMAGE_RGB), f"chart {reward}: bars out of row order"
        assert a[0] == b[0], "bars of one chart share the zero line"
        if reward in VALUES:
            assert a[2] / b[2] == pytest.approx(VALUES[reward][0] / VALUES[reward][1], rel=0.05), reward
    # the images sit below the charts
    assert min(tops.values()) > max(base for base, *_ in bars)

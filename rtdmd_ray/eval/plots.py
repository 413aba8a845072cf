"""Reward curves as PNG from a run's ``metrics.jsonl`` (PIL only: the CPU stack ships no matplotlib).

``rtdmd-ray plot RUN_DIR`` writes one PNG per reward name: the per-epoch training mean (thin), its moving
average (thick) inside a band of +-2 standard errors of that window's mean (shaded: a rise that leaves the
early band is more than epoch-to-epoch noise), for GenEval-like rewards the training strict accuracy's moving
average, and, when the run evaluated, the eval mean on fixed captions (markers), against the epoch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

TRAIN_KEY = re.compile(r"^reward/(?P<name>[^/]+)/mean$")
EVAL_KEY = re.compile(r"^eval/(?P<name>[^/]+)/(?P=name)$")
PALETTE = [(31, 119, 180), (14, 60, 120), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
BAND_COLOR = (205, 222, 240)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Records of a ``metrics.jsonl``; a later record for the same iteration (a resumed run) replaces it."""
    by_it: dict[int, dict[str, float]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_it.setdefault(int(rec.get("iteration", len(by_it))), {}).update(rec)
    return [by_it[k] for k in sorted(by_it)]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def moving_band(values: Sequence[float], window: int) -> tuple[list[float], list[float]]:
    """Per point, the moving average's ``mean -+ 2 x standard error`` over the same trailing window."""
    lo, hi, acc = [], [], []
    for v in values:
        acc = [*acc, v][-window:]
        m = sum(acc) / len(acc)
        se = (sum((a - m) ** 2 for a in acc) / max(1, len(acc) - 1)) ** 0.5 / len(acc) ** 0.5
        lo.append(m - 2 * se)
        hi.append(m + 2 * se)
    return lo, hi


def line_chart(series: dict[str, tuple[list[float], list[float]]], *, title: str, xlabel: str,
               size: tuple[int, int] = (640, 360),
               band: tuple[list[float], list[float], list[float]] | None = None) -> Image.Image:
    """A line chart: ``series`` maps a label to ``(xs, ys)``; label ``eval*`` is drawn with markers, ``band``
    ``(xs, lows, highs)`` is shaded under the lines."""
    w, h = size
    left, right, top, bottom = 62, 16, 30, 42
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
    if band is not None:
        pts += [(x, y) for x, lo, hi in zip(*band, strict=True) for y in (lo, hi) if math.isfinite(y)]
    if not pts:
        d.text((left, h // 2), f"{title}: no finite values", fill="black")
        return img
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    pad = (y1 - y0) * 0.05 or max(abs(y0) * 0.05, 1e-3)
    y0, y1 = y0 - pad, y1 + pad
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline=(80, 80, 80))
    for i in range(5):  # y grid with labels
        yv = y0 + (y1 - y0) * i / 4
        _, yp = px(x0, yv)
        d.line([left, yp, w - right, yp], fill=(225, 225, 225))
        d.text((4, yp - 6), f"{yv:.3g}", fill="black")
    for i in range(5):
        xv = x0 + (x1 - x0) * i / 4
        xp, _ = px(xv, y0)
        d.text((xp - 8, h - bottom + 6), f"{xv:.0f}", fill="black")
    d.text((w // 2 - 20, h - 18), xlabel, fill="black")
    d.text((left, 8), title, fill="black")
    if band is not None and len(band[0]) > 1:
        upper = [px(x, y) for x, y in zip(band[0], band[2], strict=True)]
        lower = [px(x, y) for x, y in zip(band[0], band[1], strict=True)]
        d.polygon(upper + lower[::-1], fill=BAND_COLOR)
    lx = w - right - 150
    for k, (label, (xs, ys)) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        xy = [px(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
        if label.startswith("eval"):
            for cx, cy in xy:
                d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
            if len(xy) > 1:
                d.line(xy, fill=color, width=1)
        elif len(xy) > 1:
            d.line(xy, fill=color, width=3 if label.startswith("smooth") else 1)
        d.rectangle([lx, top + 6 + 14 * k, lx + 10, top + 14 + 14 * k], fill=color)
        d.text((lx + 14, top + 4 + 14 * k), label, fill="black")
    return img


def plot_rewards(run_dir: str | Path, out_dir: str | Path | None = None, *, window: int = 10) -> list[Path]:
    """One ``reward_<name>.png`` per reward in ``run_dir/metrics.jsonl`` (the run's configured rewards and the
    weighted total when its ``config.yaml`` is there); returns the written paths."""
    run = Path(run_dir)
    src = run / "metrics.jsonl"
    if not src.is_file():
        raise FileNotFoundError(f"no {src}: pass the run's train.output_dir")
    recs = read_metrics(src)
    out = Path(out_dir) if out_dir else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    names = sorted({m["name"] for r in recs for k in r if (m := TRAIN_KEY.match(k))})
    if (run / "config.yaml").is_file():  # the configured rewards and their weighted total, not every sub-key
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        weights = cfg.get("rewards", {}).get("weights", {})
        names = [n for n in names if n in weights or n == "total"] or names
    written = []
    for name in names:
        tr = [(r["iteration"], r[f"reward/{name}/mean"]) for r in recs if f"reward/{name}/mean" in r]
        ev = [(r["iteration"], r[f"eval/{name}/{name}"]) for r in recs if f"eval/{name}/{name}" in r]
        xs, ys = [t[0] for t in tr], [t[1] for t in tr]
        series = {"train mean": (xs, ys), f"smooth ({window})": (xs, moving_average(ys, window))}
        strict_tr = [(r["iteration"], r["reward/strict_accuracy/mean"]) for r in recs
                     if name != "total" and f"reward/{name}/mean" in r and "reward/strict_accuracy/mean" in r]
        if strict_tr and name not in ("strict_accuracy", "total"):  # what the tables judge, while training
            series[f"train strict ({window})"] = (
                [t[0] for t in strict_tr], moving_average([t[1] for t in strict_tr], window))
        if ev:
            series["eval (fixed captions)"] = ([e[0] for e in ev], [e[1] for e in ev])
        strict = [(r["iteration"], r[f"eval/{name}/strict_accuracy"]) for r in recs
                  if f"eval/{name}/strict_accuracy" in r]
        if strict:  # GenEval-like rewards: the accuracy people quote
            series["eval strict accuracy"] = ([e[0] for e in strict], [e[1] for e in strict])
        path = out / f"reward_{name}.png"
        line_chart(series, title=f"{name} reward", xlabel="epoch",
                   band=(xs, *moving_band(ys, window))).save(path)
        written.append(path)
    if not names:
        raise ValueError(f"{src} has no reward/<name>/mean keys: is it an RL (rtdmd-ray train) run?")
    return written

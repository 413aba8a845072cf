"""One static HTML page per eval (no server, no JavaScript): the model rows' images on the same prompts and
seeds, bar charts of the rewards (inline SVG), and the per-tag accuracy table of GenEval-style rewards.

``write_report(eval_dir)`` renders ``eval_dir/metadata.json`` (written by ``rtdmd_ray.eval.evaluate``) to
``eval_dir/report.html``; images are linked relatively, so the folder can be copied or served as is.
``screenshot(html, png)`` renders a page with headless Chromium (``scripts/install_chromium.sh``).

    python -m rtdmd_ray.eval.report outputs/inference/shapes [--screenshot docs/img/eval_report.png]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

# one colour per model row (bars and the row's label swatch); matplotlib's tab10
ROW_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
GRID_COLUMNS = 8
THUMB_PX = 96
CHART_W, CHART_H = 260, 170
REPORT_FILE = "report.html"

_CSS = (
    """
body { font-family: DejaVu Sans, Helvetica, Arial, sans-serif; margin: 16px; color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px 0; } h2 { font-size: 16px; margin: 18px 0 6px 0; }
p.meta { font-size: 12px; color: #555; margin: 2px 0; }
table { border-collapse: collapse; font-size: 12px; }
td, th { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; vertical-align: middle; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; }
.charts svg { border: 1px solid #ddd; background: #fff; }
table.grid td { border: none; padding: 2px; }
table.grid td.prompt { width: THUMBpx; font-size: 10px; color: #444; height: 36px; overflow: hidden; }
table.grid td.rowname { font-size: 11px; white-space: nowrap; vertical-align: middle; padding-right: 6px; }
table.grid img { width: THUMBpx; height: THUMBpx; image-rendering: pixelated; display: block; }
.placeholder { width: THUMBpx; height: THUMBpx; background: repeating-linear-gradient(45deg, #eee,
  #eee 6px, #ddd 6px, #ddd 12px); font-size: 10px; color: #666; display: flex; align-items: center;
  justify-content: center; }
.skipped { color: #a33; }
"""
).replace("THUMB", str(THUMB_PX))


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return escape(str(v))


def row_color(i: int) -> str:
    return ROW_COLORS[i % len(ROW_COLORS)]


def bar_chart_svg(
    title: str, names: Sequence[str], values: Sequence[float | None], colors: Sequence[str]
) -> str:
    """An inline SVG bar chart ``CHART_W`` x ``CHART_H``: one bar per row (value label above it), the axis
    spanning 0 and every value, so bars of different signs share one zero line."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    lo, hi = min([0.0, *vals]), max([0.0, *vals])
    if hi - lo < 1e-12:
        hi = lo + 1.0
    top, bottom, left, right = 28, 38, 8, 8
    plot_h = CHART_H - top - bottom
    n = max(1, len(names))
    slot = (CHART_W - left - right) / n
    bar_w = max(4.0, slot * 0.6)

    def y(v: float) -> float:
        return top + (hi - v) / (hi - lo) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}" '
        f'viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{escape(title)}">',
        f'<text x="{CHART_W / 2:.1f}" y="16" font-size="12" text-anchor="middle" '
        f'font-weight="bold">{escape(title)}</text>',
    ]
    for i, (name, v) in enumerate(zip(names, values, strict=True)):
        cx = left + slot * (i + 0.5)
        label = escape(name if len(name) <= 14 else name[:13] + "…")
        parts.append(
            f'<text x="{cx:.1f}" y="{CHART_H - 22}" font-size="10" text-anchor="middle">{label}</text>'
        )
        if v is None or math.isnan(v):
            parts.append(
                f'<text x="{cx:.1f}" y="{y(0) - 4:.1f}" font-size="10" text-anchor="middle" '
                'fill="#999">n/a</text>'
            )
            continue
        y0, y1 = sorted((y(0.0), y(v)))
        parts.append(
            f'<rect class="bar" x="{cx - bar_w / 2:.1f}" y="{y0:.1f}" width="{bar_w:.1f}" '
            f'height="{max(y1 - y0, 0.5):.1f}" fill="{colors[i]}"><title>{escape(name)}: {v:.6g}'
            "</title></rect>"
        )
        ty = y0 - 3 if v >= 0 else y1 + 11
        parts.append(f'<text x="{cx:.1f}" y="{ty:.1f}" font-size="10" text-anchor="middle">{v:.4g}</text>')
    parts.append(
        f'<line x1="{left}" x2="{CHART_W - right}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#444" '
        'stroke-width="1"/>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _chart_keys(metadata: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The reward main keys (in weight order), the "accuracy" keys of GenEval-style rewards, and "mean"."""
    keys = list(metadata.get("reward_weights", {}))
    extra = []
    for r in rows:
        for k in r.get("scores", {}):
            if k in ("accuracy", "strict_accuracy") and k not in extra:
                extra.append(k)
    if len(keys) > 1:
        extra.append("mean")
    return keys + extra


def render_report(metadata: Mapping[str, Any], title: str = "rtdmd-ray eval") -> str:
    """The report's HTML for an eval's ``metadata.json`` content."""
    rows = list(metadata.get("rows", []))
    active = [(i, r) for i, r in enumerate(rows) if not r.get("skipped")]
    names = [r["name"] for _, r in active]
    colors = [row_color(i) for i, _ in active]
    h: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
    ]
    sets = metadata.get("prompt_sets", [])
    h.append(
        '<p class="meta">'
        + escape(
            f"base seed {metadata.get('seed')}; prompt sets: "
            + ", ".join(f"{s['name']} ({s['num_prompts']} prompts: {', '.join(s['rewards'])})" for s in sets)
        )
        + "</p>"
    )
    h.append(
        '<p class="meta">Every row draws image i of a prompt set from seed(base, i): rows differ only in '
        "their weights and sampler.</p>"
    )

    # ---- models
    h.append(
        '<h2>Models</h2><table id="models"><tr><th>row</th><th>sampler</th><th>LoRA stack</th>'
        "<th>images</th><th>config hash</th></tr>"
    )
    for i, r in enumerate(rows):
        s = r.get("sampler", {})
        sampler = f"{s.get('mode')}, {s.get('num_steps')} steps"
        if s.get("mode") == "distilled":
            sampler += f", eta {s.get('eta')}"
        else:
            sampler += f", CFG {s.get('guidance_scale')}"
        loras = "<br>".join(escape(p) for p in r.get("lora_paths", [])) or "none (base)"
        n = (
            r.get("num_images", 0)
            if not r.get("skipped")
            else f'<span class="skipped">skipped: {escape(str(r["skipped"]))}</span>'
        )
        h.append(
            f'<tr><td><span class="swatch" style="background:{row_color(i)}"></span>{escape(r["name"])}'
            f"</td><td>{escape(sampler)}</td><td>{loras}</td><td>{n}</td>"
            f"<td><code>{escape(r.get('config_hash', ''))}</code></td></tr>"
        )
    h.append("</table>")

    # ---- reward charts
    h.append('<h2>Rewards</h2><div class="charts" id="charts">')
    for key in _chart_keys(metadata, [r for _, r in active]):
        vals = [r.get("scores", {}).get(key) for _, r in active]
        if all(v is None for v in vals):
            continue
        h.append(bar_chart_svg(key, names, vals, colors))
    h.append("</div>")

    # ---- per-tag table
    tag_rewards: list[str] = []
    for _, r in active:
        for reward in r.get("per_tag", {}):
            if reward not in tag_rewards:
                tag_rewards.append(reward)
    for reward in tag_rewards:
        tags: list[str] = []
        for _, r in active:
            for t in r.get("per_tag", {}).get(reward, {}):
                if t not in tags and t != "overall":
                    tags.append(t)
        tags.append("overall")
        h.append(
            f"<h2>{escape(reward)}: accuracy per tag (lenient / strict)</h2>"
            f'<table class="tags" id="tags-{escape(reward)}"><tr><th>row</th>'
            + "".join(f"<th>{escape(t)}</th>" for t in tags)
            + "</tr>"
        )
        for i, r in active:
            table = r.get("per_tag", {}).get(reward, {})
            cells = []
            for t in tags:
                c = table.get(t)
                cells.append(
                    "<td class=num>–</td>"
                    if c is None
                    else f'<td class="num">{_fmt(c.get("accuracy"), 3)} / {_fmt(c.get("strict_accuracy"), 3)}'
                    f'<br><span style="color:#888">n={int(c.get("count", 0))}</span></td>'
                )
            h.append(
                f'<tr><td><span class="swatch" style="background:{row_color(i)}"></span>'
                f"{escape(r['name'])}</td>{''.join(cells)}</tr>"
            )
        h.append("</table>")

    # ---- image grid
    grid = list(metadata.get("grid", []))
    h.append(f"<h2>Images ({len(grid)} prompts, same seeds in every row)</h2>")
    for start in range(0, len(grid), GRID_COLUMNS):
        chunk = grid[start : start + GRID_COLUMNS]
        h.append('<table class="grid"><tr><td class="rowname"></td>')
        for g in chunk:
            p = g["prompt"]
            h.append(
                f'<td class="prompt" title="{escape(p)} (seed {g["seed"]})">'
                f"{escape(p if len(p) <= 60 else p[:59] + '…')}</td>"
            )
        h.append("</tr>")
        for i, r in enumerate(rows):
            h.append(
                f'<tr><td class="rowname"><span class="swatch" style="background:{row_color(i)}"></span>'
                f"{escape(r['name'])}</td>"
            )
            for g in chunk:
                if r.get("skipped"):
                    h.append('<td><div class="placeholder">skipped</div></td>')
                    continue
                src = f"{r['dir']}/images/{g['file']}"
                h.append(
                    f'<td><img src="{escape(src)}" alt="{escape(r["name"])}: {escape(g["prompt"])}" '
                    f'loading="eager"></td>'
                )
            h.append("</tr>")
        h.append("</table>")
    h.append("</body></html>")
    return "\n".join(h)


def write_report(
    eval_dir: str | Path, metadata: Mapping[str, Any] | None = None, title: str | None = None
) -> Path:
    """Write ``eval_dir/report.html`` from ``metadata`` (default: ``eval_dir/metadata.json``)."""
    d = Path(eval_dir)
    if metadata is None:
        path = d / "metadata.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: run `rtdmd-ray eval CONFIG` first (it writes the report)"
            )
        metadata = json.loads(path.read_text())
    out = d / REPORT_FILE
    out.write_text(render_report(metadata, title or f"rtdmd-ray eval: {d.name}"))
    return out


# --------------------------------------------------------------------------------------- screenshots
def find_chromium() -> str | None:
    """Path of a Chromium binary ($CHROMIUM, /usr/bin/chromium, chromium-browser, google-chrome), or None."""
    for cand in (
        os.environ.get("CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        shutil.which("google-chrome"),
    ):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def screenshot(
    html: str | Path, png: str | Path, *, width: int = 1400, height: int = 1800, timeout_s: float = 120.0
) -> Path:
    """Render ``html`` (a file path) with headless Chromium into ``png`` (``width`` x ``height`` pixels).

    Raises:
        FileNotFoundError: no Chromium (run scripts/install_chromium.sh).
        RuntimeError: Chromium exited without writing the screenshot (its output is in the message).
    """
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found: run scripts/install_chromium.sh (or set $CHROMIUM)")
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="rtdmd-chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            Path(html).resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rtdmd_ray.eval.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("eval_dir", help="an eval output dir (holds metadata.json)")
    p.add_argument(
        "--screenshot", default=None, help="also render the page to this PNG with headless Chromium"
    )
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1800)
    args = p.parse_args(argv)
    path = write_report(args.eval_dir)
    print(f"wrote {path}")
    if args.screenshot:
        print(f"wrote {screenshot(path, args.screenshot, width=args.width, height=args.height)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

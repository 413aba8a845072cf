"""`rtdmd-ray shapes eval`: the ShapeWorld results table (miniature of the paper's Table 1 baselines).

Rows: the teacher at 50 NFE (Euler, shift 3, CFG), at 4 NFE Euler and at 4 NFE CPS (eta 0.9), both with the
same CFG and the 4-step schedule ``(1000, 750, 500, 250)`` shifted by 3. Columns: ``shapes_geneval`` strict
and partial, per tag, colour level, count level, tiny-CLIP score, and diversity (distinct layouts per
prompt over 4 seeds). CFG is picked on a validation set drawn from the *train* prompts, never on test.

Colour level: for captions naming colours, the strict check with shapes ignored (each named colour appears on
exactly the requested number of objects). Count level: the number of detected objects equals the number the
caption asks for. A layout is the multiset of (class, colour, 8-px grid cell of the centre) of the detected
objects; diversity is the mean number of distinct layouts among a prompt's 4 seeds.

One evaluation path: captions come from ``shapes.prompts.eval_captions(split, n, seed)``, images from
``stages.inference.sample_images`` (image ``i`` seeded by ``image_seed(seed, i)``) and are scored as 8-bit
images, exactly as the in-run validation (``stages/validation.py``) and ``rtdmd-ray eval`` do; so a row here
and the in-run figure of the same adapter, captions and seed agree (tests/unit/test_shapes_eval_path.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtdmd_ray.models.shapes import SHIPPED_CLIP, ShapesBackbone
from rtdmd_ray.rewards.shapes_geneval import ShapesGenevalScorer
from rtdmd_ray.shapes.prompts import TAGS, balanced_eval_prompts, eval_captions, split_prompts
from rtdmd_ray.shapes.render import RESOLUTION_PX
from rtdmd_ray.stages.inference import eight_bit, image_seed, sample_images

# bump when generation or scoring changes: rows cached in results.json by another version are recomputed
EVAL_VERSION = 2
FOUR_STEPS = (1000, 750, 500, 250)
# (CFG scale, guidance_max_sigma): CFG on every step, or only below sigma 0.8 (a limited guidance interval)
DEFAULT_CFG_GRID = ((3.0, 1.0), (4.5, 1.0), (6.0, 1.0), (4.5, 0.8), (6.0, 0.8))


def fifty_step_sigmas(backbone: ShapesBackbone) -> list[float]:
    return backbone.sigma_schedule(tuple(range(1000, 0, -20)), 32)


def generate(backbone: ShapesBackbone, metas: list[dict[str, Any]], sigmas: list[float], *, cfg: float,
             eta: float = 0.0, seed: int = 0, batch_size: int = 250, cfg_max_sigma: float = 1.0,
             ) -> torch.Tensor:
    """Images ``[N, 3, 32, 32]`` by ``sample_images``: Euler for ``eta = 0``, else CPS; image ``i`` has seed
    ``image_seed(seed, i)``, so rows share noise and the batch size changes nothing."""
    out = []
    for start in range(0, len(metas), batch_size):
        chunk = metas[start:start + batch_size]
        out.append(sample_images(
            backbone, [m["prompt"] for m in chunk], [image_seed(seed, start + i) for i in range(len(chunk))],
            sigmas, eta=eta if eta > 0 else None, guidance=cfg, guidance_max_sigma=cfg_max_sigma,
            resolution_px=RESOLUTION_PX))
    return torch.cat(out)


def _color_level(objs: list[dict[str, Any]], meta: dict[str, Any]) -> float | None:
    named = [inc for inc in meta["include"] if "color" in inc]
    if not named:
        return None
    return float(all(sum(o["color"] == inc["color"] for o in objs) == inc["count"] for inc in named))


def _layout_key(objs: list[dict[str, Any]]) -> tuple:
    return tuple(sorted((o["class"], o["color"], int((o["bbox"][0] + o["bbox"][2]) / 2 // 8),
                         int((o["bbox"][1] + o["bbox"][3]) / 2 // 8)) for o in objs))


def score_images(images: torch.Tensor, metas: list[dict[str, Any]], scorer: ShapesGenevalScorer,
                 ) -> dict[str, Any]:
    """Aggregate metrics of one row, scored on the 8-bit images (as every evaluation and training reward)."""
    images = eight_bit(images)
    prompts = [m["prompt"] for m in metas]
    out = scorer(images, prompts, metas)
    dets = scorer.detect(images)
    strict = out["strict_accuracy"].numpy().astype(np.float64)
    res: dict[str, Any] = {
        "n": len(metas), "strict": float(strict.mean()), "partial": float(out["shapes_geneval"].mean()),
        "lenient": float(out["accuracy"].mean()), "exact": float(out["exact_accuracy"].mean()),
        "strict_se": float(strict.std() / np.sqrt(len(strict))),
        # kept for paired comparisons between rows (same captions and initial noise)
        "strict_per_caption": [int(v) for v in strict],
    }
    for tag in TAGS:
        v = out[f"{tag}_strict_accuracy"].numpy()
        res[f"strict_{tag}"] = float(v[v != -10].mean()) if (v != -10).any() else float("nan")
    cl = [c for c in (_color_level(o, m) for o, m in zip(dets, metas, strict=True)) if c is not None]
    res["color_level"] = float(np.mean(cl)) if cl else float("nan")
    res["count_level"] = float(np.mean([len(o) == sum(i["count"] for i in m["include"])
                                        for o, m in zip(dets, metas, strict=True)]))
    return res


def diversity(backbone: ShapesBackbone, metas: list[dict[str, Any]], sigmas: list[float], *, cfg: float,
              eta: float, scorer: ShapesGenevalScorer, n_seeds: int = 4, cfg_max_sigma: float = 1.0) -> float:
    """Mean number of distinct detected layouts per prompt over ``n_seeds`` seeds (1 = mode collapse)."""
    keys = []
    for s in range(n_seeds):
        imgs = generate(backbone, metas, sigmas, cfg=cfg, eta=eta, seed=100 + s, cfg_max_sigma=cfg_max_sigma)
        keys.append([_layout_key(o) for o in scorer.detect(imgs)])
    return float(np.mean([len({keys[s][i] for s in range(n_seeds)}) for i in range(len(metas))]))


def guidance_label(cfg: float, cfg_max_sigma: float) -> str:
    return f"CFG {cfg:g}" + (f" on σ ≤ {cfg_max_sigma:g}" if cfg_max_sigma < 1.0 else "")


def pick_cfg(backbone: ShapesBackbone, scorer: ShapesGenevalScorer, *, grid=DEFAULT_CFG_GRID,
             n_per_tag: int = 50, seed: int = 0) -> tuple[tuple[float, float], dict[str, float]]:
    """``(CFG scale, guidance_max_sigma)`` with the best 50-NFE strict accuracy on validation captions from
    the *train* prompts (never test), and every setting's score by its label."""
    train, _ = split_prompts(0)
    val = balanced_eval_prompts(train, n_per_tag, seed=seed + 999)
    sig = fifty_step_sigmas(backbone)
    scores: dict[tuple[float, float], float] = {}
    for cfg, max_sigma in grid:
        imgs = generate(backbone, val, sig, cfg=cfg, seed=seed + 999, cfg_max_sigma=max_sigma)
        scores[(cfg, max_sigma)] = float(
            scorer(imgs, [m["prompt"] for m in val], val)["strict_accuracy"].mean())
        print(f"  validation {guidance_label(cfg, max_sigma)}: strict {scores[(cfg, max_sigma)]:.3f}",
              flush=True)
    best = max(scores, key=lambda c: scores[c])
    return best, {guidance_label(*k): v for k, v in scores.items()}


def paired_differences(rows: dict[str, dict[str, Any]],
                       model_base: str | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    """Each model row (not a teacher or the ground truth) minus each teacher 4-NFE row, and minus the model
    row ``model_base`` (e.g. the RL row against its AC-DMD start), caption by caption:
    ``{model: {base_row: (mean difference, its standard error)}}``. Rows share captions and initial noise,
    so the paired error is the right one for "does the student beat teacher-4" and "did RL improve its
    start"; rows without per-caption scores (cached by an older version) are left out."""
    base = {n: np.asarray(r["strict_per_caption"], dtype=float) for n, r in rows.items()
            if (n.startswith("teacher 4 NFE") or n == model_base) and "strict_per_caption" in r}
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name, row in rows.items():
        if name.startswith("teacher") or name == "ground-truth renders" or "strict_per_caption" not in row:
            continue
        mine = np.asarray(row["strict_per_caption"], dtype=float)
        for bname, b in base.items():
            if bname == name:
                continue
            d = mine - b
            out.setdefault(name, {})[bname] = (float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))))
    return out


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    cols = ["strict", "partial", *[f"strict_{t}" for t in TAGS], "color_level", "count_level", "tiny_clip",
            "diversity"]
    short = {"strict_single_object": "single", "strict_two_object": "two obj", "strict_counting": "count",
             "strict_colors": "colors", "strict_position": "position", "strict_color_attr": "colour attr",
             "color_level": "colour lvl", "count_level": "count lvl", "tiny_clip": "tiny-CLIP"}
    head = "| row | " + " | ".join(short.get(c, c) for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name, r in rows.items():
        cells = []
        for c in cols:
            v = r.get(c)
            if v is None:
                cells.append("—")
            elif c == "strict":
                cells.append(f"{v:.3f} ± {r['strict_se']:.3f}")
            else:
                cells.append(f"{v:.3f}" if c != "diversity" else f"{v:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_grid(path: Path, rows: dict[str, torch.Tensor], n_cols: int = 12, scale: int = 3) -> None:
    """PNG: one band per row name, the first ``n_cols`` images, nearest-upscaled ``scale``×."""
    from PIL import Image

    bands = []
    for imgs in rows.values():
        x = imgs[:n_cols]
        x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=0.5)
        band = torch.cat(list(x), dim=2)  # [3, 34, 34 * n]
        bands.append(band)
    grid = torch.cat(bands, dim=1)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")[:80]


def run_eval(*, teacher_dir: str | None, clip_dir: str | None, out_dir: str, n_captions: int = 1002,
             cfg_scale: float | None = None, cfg_max_sigma: float | None = None, threads: int = 2,
             seed: int = 0,
             n_diversity_prompts: int = 60, lora_rows: dict[str, list[str]] | None = None,
             teacher_rows: bool = True, recompute: bool = False, split: str = "test") -> dict[str, Any]:
    """Write ``results.md``, ``results.json`` and ``grid.png`` under ``out_dir``; returns the results.

    ``split="test"`` scores held-out test captions (the results table); ``split="validation"`` scores captions
    of the *train* split (the ones the cold start and RL sample from), drawn with another seed than the CFG
    pick's, for choosing a checkpoint or a setting without looking at test.

    ``lora_rows`` maps a label to LoRA files merged into the teacher in order (cold start first, then RL);
    each gives the row ``"<label>, 4 NFE CPS η=0.9"``: no CFG, the 4-step CPS sampler the generator was
    trained with.
    The teacher rows use ``cfg_scale`` on steps at ``sigma <= cfg_max_sigma``; both default to the best
    setting of ``DEFAULT_CFG_GRID`` on train-prompt validation captions. When that is a limited interval, the
    row "teacher 50 NFE Euler, CFG <scale>" (guidance on every step) is added for reference.
    Rows already in ``out_dir/results.json`` with the same teacher, captions, seed and guidance (and LoRA
    files of the same size and mtime) are reused, so adding a model's row re-runs only that row.
    """
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows").mkdir(exist_ok=True)
    t0 = time.time()
    backbone = ShapesBackbone.from_pretrained(teacher_dir)
    scorer = ShapesGenevalScorer()
    old = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    val_scores = None
    if cfg_scale is None and not recompute and old.get("cfg") is not None:
        cfg_scale, val_scores = old["cfg"], old.get("cfg_validation")
        cfg_max_sigma = old.get("cfg_max_sigma", 1.0)
    if cfg_scale is None and not teacher_rows:  # only the teacher rows use CFG: no need to pick it
        cfg_scale, cfg_max_sigma = 1.0, 1.0
    if cfg_scale is None:
        (cfg_scale, cfg_max_sigma), val_scores = pick_cfg(backbone, scorer, seed=seed)
    cfg_max_sigma = 1.0 if cfg_max_sigma is None else float(cfg_max_sigma)
    guided = guidance_label(cfg_scale, cfg_max_sigma)
    print(f"teacher guidance: {guided}", flush=True)
    metas = eval_captions(split, n_captions, seed)  # validation: not pick_cfg's draw (seed + 999)
    # grid: two captions of each tag (metas are grouped by tag), same columns in every band
    per_tag = len(metas) // len(TAGS)
    cols = [t * per_tag + j for t in range(len(TAGS)) for j in range(2)]
    div_metas = metas[:: max(1, len(metas) // n_diversity_prompts)][:n_diversity_prompts]
    same = (not recompute and old.get("teacher") == str(teacher_dir or "shipped")
            and old.get("n_captions") == len(metas) and old.get("seed", 0) == seed
            and old.get("cfg") == cfg_scale and old.get("cfg_max_sigma", 1.0) == cfg_max_sigma
            and old.get("n_diversity_prompts") == len(div_metas) and old.get("split", "test") == split
            and old.get("eval_version") == EVAL_VERSION)
    cached: dict[str, dict[str, Any]] = old.get("rows", {}) if same else {}

    # name -> (LoRA files, sigmas, eta, cfg, cfg_max_sigma)
    plan: dict[str, tuple[list[str], list[float], float, float, float]] = {}
    four = backbone.sigma_schedule(FOUR_STEPS, 32)
    if teacher_rows:
        fifty = fifty_step_sigmas(backbone)
        plan[f"teacher 50 NFE Euler, {guided}"] = ([], fifty, 0.0, cfg_scale, cfg_max_sigma)
        if cfg_max_sigma < 1.0:
            plan[f"teacher 50 NFE Euler, CFG {cfg_scale:g}"] = ([], fifty, 0.0, cfg_scale, 1.0)
        plan[f"teacher 4 NFE Euler, {guided}"] = ([], four, 0.0, cfg_scale, cfg_max_sigma)
        plan[f"teacher 4 NFE CPS η=0.9, {guided}"] = ([], four, 0.9, cfg_scale, cfg_max_sigma)
    for label, paths in (lora_rows or {}).items():
        for p in paths:
            if not Path(p).is_file():
                raise FileNotFoundError(f"--lora {label}: no LoRA file at {p} (train it or fix the path)")
        plan[f"{label}, 4 NFE CPS η=0.9"] = (list(paths), four, 0.9, 1.0, 1.0)
    lora_names = [f"{label}, 4 NFE CPS η=0.9" for label in (lora_rows or {})]

    def fingerprint(paths: list[str]) -> list[list[Any]]:
        return [[str(p), Path(p).stat().st_size, int(Path(p).stat().st_mtime)] for p in paths]

    rows: dict[str, dict[str, Any]] = {}
    images: dict[str, torch.Tensor] = {}
    from rtdmd_ray.shapes.render import render_batch

    gt = render_batch(metas, np.random.default_rng(seed))
    rows["ground-truth renders"] = score_images(gt, metas, scorer)
    images["ground-truth renders"] = gt[cols]
    full: dict[str, torch.Tensor] = {"ground-truth renders": gt}
    for name, (paths, sig, eta, cfg, max_sigma) in plan.items():
        grid_file = out / "rows" / f"{_slug(name)}.pt"
        hit = cached.get(name)
        if (hit is not None and hit.get("lora") == fingerprint(paths) and grid_file.is_file()
                and "strict_per_caption" in hit):
            rows[name] = hit
            images[name] = torch.load(grid_file, weights_only=True)
            print(f"{name}: strict {hit['strict']:.3f} (reused from {out / 'results.json'})", flush=True)
            continue
        t = time.time()
        model = backbone
        if paths:
            from rtdmd_ray.models.lora import merge_lora_files

            model = ShapesBackbone.from_pretrained(teacher_dir)
            merge_lora_files(model.transformer, paths)
        imgs = generate(model, metas, sig, cfg=cfg, eta=eta, seed=seed, cfg_max_sigma=max_sigma)
        rows[name] = score_images(imgs, metas, scorer)
        rows[name]["diversity"] = diversity(model, div_metas, sig, cfg=cfg, eta=eta, scorer=scorer,
                                            cfg_max_sigma=max_sigma)
        rows[name]["seconds"] = round(time.time() - t, 1)
        rows[name]["lora"] = fingerprint(paths)
        images[name] = imgs[cols]
        full[name] = imgs
        torch.save(images[name], grid_file)
        print(f"{name}: strict {rows[name]['strict']:.3f} ({rows[name]['seconds']} s)", flush=True)
    # the tiny CLIP is loaded last, so it may still be training while the rows above are generated
    clip_path = Path(clip_dir) if clip_dir else SHIPPED_CLIP
    if (clip_path / "config.json").is_file():
        from rtdmd_ray.rewards.clipscore import CLIPScoreScorer

        clip = CLIPScoreScorer(model=str(clip_path), logit_divisor=1.0)
        for name, imgs in full.items():
            with torch.no_grad():
                rows[name]["tiny_clip"] = float(
                    clip(eight_bit(imgs), [m["prompt"] for m in metas])["clipscore"].mean())
    else:
        print(f"no tiny CLIP at {clip_path}: the tiny-CLIP column stays empty", flush=True)
    table = markdown_table(rows)
    # the first --lora row (the cold start, by convention) is the paired base of the later ones
    paired = paired_differences(rows, model_base=lora_names[0] if lora_names else None)
    if paired:
        lines = [f"- {name} − {bname}: {d:+.3f} ± {se:.3f}"
                 for name, per in paired.items() for bname, (d, se) in per.items()]
        table += "\n\nPaired strict difference, per caption (same captions and noise), ± 1 s.e.:\n\n"
        table += "\n".join(lines)
    info = {"teacher": str(teacher_dir or "shipped"), "teacher_meta": backbone.meta.get("step"),
            "cfg": cfg_scale, "cfg_max_sigma": cfg_max_sigma, "cfg_validation": val_scores,
            "n_captions": len(metas), "seed": seed, "split": split, "eval_version": EVAL_VERSION,
            "n_diversity_prompts": len(div_metas), "wall_s": round(time.time() - t0, 1), "rows": rows,
            "paired": paired}
    (out / "results.json").write_text(json.dumps(info, indent=2))
    which = "test captions" if split == "test" else "validation captions (train split)"
    header = (f"ShapeWorld results: {len(metas)} {which} ({len(metas) // len(TAGS)} per tag), "
              f"fixed seeds, teacher guidance {guided} picked on train-prompt validation "
              f"{val_scores}. Strict ± 1 s.e.\n\n")
    (out / "results.md").write_text(header + table + "\n")
    save_grid(out / "grid.png", images)
    (out / "grid_prompts.txt").write_text(
        "bands top to bottom: " + ", ".join(images) + "\ncolumns left to right:\n"
        + "\n".join(metas[i]["prompt"] for i in cols) + "\n")
    print(header + table, flush=True)
    return info

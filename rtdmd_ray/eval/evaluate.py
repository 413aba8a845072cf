"""`rtdmd-ray eval`: generate the eval prompt sets with every model row on Ray eval workers, score them, write
``metadata.json`` and the HTML report (spec rewards-inference.md §3.4, §5; the fixes of §8.3).

Layout under the output dir (``train.output_dir`` unless ``--out``)::

    metadata.json            every row: settings, scores (overall, per dataset, per tag), one record per image
    report.html              image grid of the rows on the same prompts and seeds, reward bars, per-tag table
    <row>/images/<set>_<index:06d>.png   PNG text chunks: prompt, rtdmd_seed, rtdmd_config_hash
    <row>/records.jsonl      scores as they arrive (resume reads them)

* Prompt sets: ShapeWorld (``data.kind: shapes``) uses ``eval.num_prompts`` test captions balanced over the
  six tags; otherwise ``eval.dataset_map`` / ``eval.prompt_file`` route each eval reward to a prompt file or
  directory under ``data.dataset_dir`` (a directory uses the first of ``PROMPT_FILE_ORDER``), each capped at
  ``eval.num_prompts`` when > 0 (0 = the full set, not the reference's 64-image default).
* Rows: ``eval.rows`` {name: overrides} (e.g. teacher-50, teacher-4, AC-DMD-4, RTDMD-4), or one row, the
  config itself. A row whose LoRA files do not exist yet is skipped with a warning and noted in the report.
* Seeds: image ``i`` of a prompt set has seed ``image_seed(eval.seed, i)`` in every row, whatever the worker
  count or batch size; batches go to whichever worker is free.
* Resume: an image whose PNG on disk carries the expected seed and config hash is not generated again; a
  score recorded for that seed and hash is not computed again.
* Scores are computed from the PNG pixels (uint8), so a resumed eval and a fresh one agree exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rtdmd_ray.config import Config, ConfigError, RewardsConfig, apply_overrides, resolve_path, to_dict
from rtdmd_ray.data.prompt_sets import PromptSet, eval_prompt_sets, grid_selection
from rtdmd_ray.roles.eval_worker import EvalWorker, run_queue
from rtdmd_ray.stages.inference import (
    PNG_HASH_KEY,
    PNG_SEED_KEY,
    config_hash,
    image_seed,
    png_info,
    read_png,
)

SENTINEL = -10.0
# a row may change the model and the sampler, never the prompts, seeds or rewards: rows compare like with like
ROW_OVERRIDE_PREFIXES = (
    "model.",
    "sampling.",
    "inference.",
    "train.seed",
    "eval.mode",
    "eval.num_steps",
    "eval.noise_level",
    "eval.guidance_scale",
    "eval.batch_images",
)
DEFAULT_ROW = "model"
LOAD_TIMEOUT_S = 3600.0
METADATA_FILE = "metadata.json"


# --------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One model row: a name, its overrides, the resolved config, and why it is skipped (None = runs)."""

    name: str
    overrides: tuple[str, ...]
    cfg: Config
    config_hash: str
    skipped: str | None = None

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", self.name) or "row"


def build_rows(cfg: Config) -> list[Row]:
    """The rows of ``eval.rows`` (or the config itself as row "model"), validated before anything runs.

    Raises:
        ConfigError: a row overrides a key outside ``ROW_OVERRIDE_PREFIXES`` or an override is invalid.
        FileNotFoundError: the single implicit row's LoRA files are missing (explicit rows are skipped).
    """
    specs: Mapping[str, Sequence[str]] = cfg.eval.rows or {DEFAULT_ROW: ()}
    rows, dirnames = [], set()
    for name, overrides in specs.items():
        for ov in overrides:
            key = ov.split("=", 1)[0].strip()
            if not any(key == p.rstrip(".") or key.startswith(p) for p in ROW_OVERRIDE_PREFIXES):
                raise ConfigError(
                    f"eval.rows.{name}: override '{ov}' changes '{key}', which rows must share (prompts, "
                    f"seeds, rewards, resources); a row may only set keys under "
                    f"{', '.join(ROW_OVERRIDE_PREFIXES)}"
                )
        try:
            row_cfg = apply_overrides(cfg, list(overrides))
        except ConfigError as exc:
            raise ConfigError(f"eval.rows.{name}: {exc}") from None
        missing = [p for p in row_cfg.inference.lora_paths if not resolve_path(p).exists()]
        if missing and not cfg.eval.rows:
            raise FileNotFoundError(
                f"LoRA file(s) {missing} not found (config inference.lora_paths, relative to the repo root): "
                "train them first, or evaluate the base model with inference.lora_paths=[]"
            )
        row = Row(
            name=name,
            overrides=tuple(overrides),
            cfg=row_cfg,
            config_hash=config_hash(row_cfg),
            skipped=f"LoRA file(s) not found: {', '.join(missing)}" if missing else None,
        )
        if row.dirname in dirnames:
            raise ConfigError(
                f"eval.rows: row names {name!r} and another map to the same directory "
                f"{row.dirname!r}; rename one"
            )
        dirnames.add(row.dirname)
        rows.append(row)
    if all(r.skipped for r in rows):
        raise FileNotFoundError(
            "every eval row is missing LoRA files: " + "; ".join(f"{r.name}: {r.skipped}" for r in rows)
        )
    return rows


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, leave=True)


def _chunked(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# --------------------------------------------------------------------------------------- records
@dataclass
class RowState:
    """What the driver knows about one row's images and scores while the eval runs."""

    row: Row
    dir: Path
    # file -> {reward: {key: value}}, only for records whose seed and hash match
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # reward -> scorer_key: scores recorded under another key (other weights or options) are not reused
    scorer_keys: dict[str, str] = field(default_factory=dict)
    generate_s: float = 0.0
    score_s: float = 0.0
    generated: int = 0
    scored: int = 0

    @property
    def records_path(self) -> Path:
        return self.dir / "records.jsonl"


def scorer_key(name: str, rewards: RewardsConfig) -> str:
    """12 hex digits identifying how reward ``name`` scores: its options (a local model dir by a fingerprint
    of its files) and checkpoint root. Recorded with every score; resume reuses only scores with the same
    key."""
    from rtdmd_ray.stages.inference import dir_fingerprint

    opts = {}
    for k, v in sorted(dict(rewards.options.get(name, {})).items()):
        local = resolve_path(v) if isinstance(v, str) and v else None
        opts[k] = [v, dir_fingerprint(local)] if local is not None and local.exists() else v
    ckpt = rewards.ckpt_dir or os.environ.get("RTDMD_REWARD_CKPT_PATH", "")
    blob = json.dumps({"name": name, "options": opts, "ckpt_dir": ckpt}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _load_records(state: RowState, expected: Mapping[str, int]) -> None:
    """Read ``records.jsonl``; keep scores whose file, seed, config hash and scorer key match the plan."""
    if not state.records_path.exists():
        return
    for line in state.records_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run
        f = rec.get("file")
        if (
            f in expected
            and rec.get("seed") == expected[f]
            and rec.get("config_hash") == state.row.config_hash
            and rec.get("scorer") == state.scorer_keys.get(rec.get("reward"))
        ):
            state.scores.setdefault(f, {})[rec["reward"]] = rec["scores"]


def _per_image_scores(by_reward: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """One image's scores, flat: each reward's keys, sentinel entries dropped, clashes "{reward}_{key}"."""
    out: dict[str, float] = {}
    for name, keys in by_reward.items():
        for k, v in keys.items():
            if v == SENTINEL:
                continue
            out[k if k == name or k not in out else f"{name}_{k}"] = v
    return out


def _tags_of(keys: Iterable[str]) -> list[str]:
    """Tags ``t`` with both ``{t}_accuracy`` and ``{t}_strict_accuracy`` keys, in the scorer's key order."""
    ordered = list(dict.fromkeys(keys))
    suffix = "_strict_accuracy"
    return [
        k[: -len(suffix)]
        for k in ordered
        if k.endswith(suffix) and k != suffix[1:] and f"{k[: -len(suffix)]}_accuracy" in ordered
    ]


def summarize_row(state: RowState, sets: Sequence[PromptSet], weights: Mapping[str, float]) -> dict[str, Any]:
    """Scores of one row: ``scores`` (overall, with the weighted ``mean``), ``per_dataset``, ``per_tag``
    (GenEval-style rewards: lenient and strict accuracy per tag, and ``overall`` = the mean over tags, as the
    official GenEval reports it), and ``records``."""
    from rtdmd_ray.rewards.multi import combine_eval_means, reduce_scores

    per_reward: dict[str, dict[str, float]] = {}
    per_dataset: dict[str, dict[str, float]] = {}
    per_tag: dict[str, dict[str, dict[str, float]]] = {}
    records = []
    for s in sets:
        values: dict[str, dict[str, list[float]]] = {r: {} for r in s.rewards}
        for i, rec in enumerate(s.records):
            f = s.file_name(i)
            got = state.scores.get(f, {})
            for r in s.rewards:
                for k, v in got.get(r, {}).items():
                    values[r].setdefault(k, []).append(v)
            records.append(
                {
                    "dataset": s.name,
                    "index": i,
                    "prompt": rec["prompt"],
                    "seed": image_seed(state.row.cfg.eval.seed, i),
                    "file": f"{state.row.dirname}/images/{f}",
                    "scores": _per_image_scores(got),
                }
            )
        ds_reward = {r: reduce_scores(values[r]) for r in s.rewards if values[r]}
        per_reward |= ds_reward
        per_dataset[s.name] = combine_eval_means(weights, ds_reward)
        for r, vals in values.items():
            tags = _tags_of(vals)
            if not tags:
                continue
            red = ds_reward[r]
            # tags with no image in this prompt set are left out (not NaN rows)
            present = [t for t in tags if f"{t}_accuracy" in red and f"{t}_strict_accuracy" in red]
            if not present:
                continue
            table: dict[str, dict[str, float]] = {
                t: {
                    "accuracy": red[f"{t}_accuracy"],
                    "strict_accuracy": red[f"{t}_strict_accuracy"],
                    "count": float(sum(v != SENTINEL for v in vals[f"{t}_accuracy"])),
                }
                for t in present
            }
            table["overall"] = {
                "accuracy": float(np.mean([table[t]["accuracy"] for t in present])),
                "strict_accuracy": float(np.mean([table[t]["strict_accuracy"] for t in present])),
                "count": float(sum(table[t]["count"] for t in present)),
            }
            per_tag[r] = table
    return {
        "scores": combine_eval_means(weights, per_reward),
        "per_dataset": per_dataset,
        "per_tag": per_tag,
        "records": records,
    }


# --------------------------------------------------------------------------------------- the eval
def _start_ray(cfg: Config, address: str | None) -> None:
    from rtdmd_ray.roles.groups import init_ray

    r = cfg.resources.eval_worker
    cpus = r.count * r.cpus_per_actor
    if cfg.rewards.serving == "serve":  # the eval rewards' deployments (none when attaching to a shared app)
        from rtdmd_ray.roles.reward_serve import serve_cpus

        cpus += serve_cpus(cfg.rewards, list(cfg.eval.reward_weights))
    init_ray(address, cpus)


def _create_workers(cfg: Config) -> Any:
    from rtdmd_ray.roles.groups import RoleResources, create_actor_group

    r = cfg.resources.eval_worker
    res = RoleResources.from_config(r)  # with Ray custom resources: pins the role to its nodes
    threads = max(1, int(r.cpus_per_actor)) if r.gpus_per_actor == 0 else None
    group = create_actor_group(
        EvalWorker,
        res,
        role="eval_worker",
        strategy=r.placement,
        init_kwargs={"threads": threads},
    )
    group.wait_ready(timeout_s=LOAD_TIMEOUT_S)
    return group


def run_eval(
    cfg: Config,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
    ray_address: str | None = None,
    report: bool = True,
    workers: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Evaluate every row of ``cfg`` (see the module docstring); returns the ``metadata.json`` content.

    Args:
        cfg: the eval config (``stage: inference``).
        out_dir: output dir (default ``train.output_dir``).
        progress: show progress bars (generation and scoring, per row).
        ray_address: cluster to join when Ray is not initialised (default ``$RAY_ADDRESS``, else a local one).
        report: also write ``report.html``.
        workers: existing ``EvalWorker`` actor handles to use (kept alive); default: create
            ``resources.eval_worker`` actors through ``groups.create_actor_group`` and remove them at the end.

    Ray starts only when there is something to generate or score (a fully resumed eval only re-aggregates);
    a cluster started here is left running for the caller's process (``ray.shutdown`` at exit).
    """
    rows = build_rows(cfg)
    sets = eval_prompt_sets(cfg)
    if not any(s.records for s in sets):
        raise ValueError(
            "the eval prompt sets are empty (config eval.prompt_file / eval.dataset_map / eval.num_prompts)"
        )
    out = resolve_path(out_dir or cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    e = cfg.eval
    expected = {s.file_name(i): image_seed(e.seed, i) for s in sets for i in range(len(s.records))}
    items = [(s, i) for s in sets for i in range(len(s.records))]

    keys = {name: scorer_key(name, cfg.rewards) for name in e.reward_weights}
    states: list[RowState] = []
    todo_gen: dict[str, list[tuple[PromptSet, int]]] = {}
    todo_score: dict[str, list[tuple[PromptSet, int, tuple[str, ...]]]] = {}
    for row in rows:
        st = RowState(row=row, dir=out / row.dirname, scorer_keys=keys)
        states.append(st)
        if row.skipped:
            print(f"eval row {row.name!r} skipped: {row.skipped}")
            continue
        (st.dir / "images").mkdir(parents=True, exist_ok=True)
        _load_records(st, expected)
        gen = []
        for s, i in items:
            info = png_info(st.dir / "images" / s.file_name(i))
            if (
                info.get(PNG_SEED_KEY) != str(expected[s.file_name(i)])
                or info.get(PNG_HASH_KEY) != row.config_hash
            ):
                gen.append((s, i))
                st.scores.pop(s.file_name(i), None)  # a regenerated image needs fresh scores
        todo_gen[row.name] = gen
        todo_score[row.name] = [
            (s, i, tuple(r for r in s.rewards if r not in st.scores.get(s.file_name(i), {})))
            for s, i in items
        ]
        todo_score[row.name] = [t for t in todo_score[row.name] if t[2]]

    group, grace_s, rewards, judge = None, 0.0, None, None
    if (any(todo_gen.values()) or any(todo_score.values())) and workers is None:
        _start_ray(cfg, ray_address)
        group = _create_workers(cfg)
        workers = list(group)
    try:
        needed = sorted({r for todo in todo_score.values() for t in todo for r in t[2]})
        if needed and cfg.rewards.serving == "serve":
            # the same reward deployments as training (or the shared `rewards.serve_app`): the eval workers
            # only generate
            from rtdmd_ray.roles.reward_serve import RewardServePool

            rewards = RewardServePool(rewards=cfg.rewards, names=needed, timeout_s=LOAD_TIMEOUT_S)
        elif needed and workers:
            from rtdmd_ray.roles.groups import gather
            from rtdmd_ray.roles.judge_serve import ensure_judge_app

            judge = ensure_judge_app(cfg.rewards, needed)  # the GenEval2 judge's app, when asked for by name

            gather(
                [w.prepare.remote(needed, cfg.rewards) for w in workers],
                timeout_s=LOAD_TIMEOUT_S,
                what=f"eval workers: build scorers {needed}",
            )
        for st in states:
            if st.row.skipped:
                continue
            _generate_row(list(workers or []), st, todo_gen[st.row.name], progress)
            _score_row(list(workers or []), st, todo_score[st.row.name], cfg, progress, rewards)
            _compact_records(st)
        from rtdmd_ray.roles.groups import STOP_GRACE_S

        grace_s = STOP_GRACE_S  # every row done: the workers exit on their own
    finally:
        if rewards is not None:
            rewards.shutdown()  # deletes the eval's own reward application (a shared one keeps running)
        if judge is not None:
            from rtdmd_ray.roles.judge_serve import delete_app

            delete_app(judge)
        if group is not None:
            group.shutdown(grace_s)

    metadata = _metadata(cfg, rows, states, sets, out)
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
    if report:
        from rtdmd_ray.eval.report import write_report

        path = write_report(out, metadata)
        print(f"eval: wrote {out / METADATA_FILE} and {path}")
    for line in summary_lines(metadata):
        print(line)
    return metadata


def summary_lines(metadata: Mapping[str, Any]) -> list[str]:
    """One line per row: each eval reward's mean, the weighted mean, and GenEval-style overall accuracy."""
    lines = []
    for r in metadata["rows"]:
        if r.get("skipped"):
            lines.append(f"  {r['name']}: skipped ({r['skipped']})")
            continue
        keys = [*metadata["reward_weights"], "mean"]
        parts = [f"{k}={r['scores'][k]:.4f}" for k in keys if k in r["scores"]]
        for name, tags in r.get("per_tag", {}).items():
            parts.append(f"{name}/overall={tags['overall']['accuracy']:.4f}")
        lines.append(f"  {r['name']}: " + " ".join(parts) + f" ({r['num_images']} images)")
    return lines


def _compact_records(st: RowState) -> None:
    """Rewrite ``records.jsonl`` with the current scores only (stale lines of regenerated images dropped)."""
    tmp = st.records_path.with_suffix(".jsonl.tmp")
    seed, chash = st.row.cfg.eval.seed, st.row.config_hash
    with tmp.open("w") as f:
        for fname, by_reward in st.scores.items():
            index = int(fname.rsplit("_", 1)[1].split(".")[0])
            for reward, vals in by_reward.items():
                rec = {
                    "file": fname,
                    "seed": image_seed(seed, index),
                    "config_hash": chash,
                    "reward": reward,
                    "scorer": st.scorer_keys.get(reward),
                }
                f.write(json.dumps({**rec, "scores": vals}) + "\n")
    tmp.replace(st.records_path)


def _generate_row(
    workers: list[Any], st: RowState, todo: list[tuple[PromptSet, int]], progress: bool
) -> None:
    if not todo:
        return
    from rtdmd_ray.roles.groups import gather

    row = st.row
    gather(
        [w.load.remote(row.cfg, row.config_hash) for w in workers],
        timeout_s=LOAD_TIMEOUT_S,
        what=f"eval row {row.name}: load model",
    )
    seed = row.cfg.eval.seed
    bar = _progress(len(todo), f"generate {row.name}", progress)

    def submit(w: Any, batch: list[tuple[PromptSet, int]]) -> Any:
        return w.generate.remote(
            [s.records[i]["prompt"] for s, i in batch], [image_seed(seed, i) for _, i in batch]
        )

    def done(batch: list[tuple[PromptSet, int]], result: tuple[list[bytes], float]) -> None:
        pngs, seconds = result
        for (s, i), png in zip(batch, pngs, strict=True):
            path = st.dir / "images" / s.file_name(i)
            tmp = path.with_suffix(".png.tmp")
            tmp.write_bytes(png)
            tmp.replace(path)  # a crash never leaves a half-written PNG that looks complete
        st.generate_s += seconds
        st.generated += len(batch)
        bar.update(len(batch))

    try:
        run_queue(
            workers,
            _chunked(todo, row.cfg.eval.batch_images),
            submit,
            done,
            what=f"eval row {row.name}: generate",
        )
    finally:
        bar.close()


def _score_row(
    workers: list[Any],
    st: RowState,
    todo: list[tuple[PromptSet, int, tuple[str, ...]]],
    cfg: Config,
    progress: bool,
    rewards: Any = None,
) -> None:
    """Score ``todo`` on the eval workers, or on the reward deployments when ``rewards`` (a
    ``RewardServePool``) is given; every score is appended to the row's ``records.jsonl`` as it arrives."""
    if not todo:
        return
    row = st.row
    bar = _progress(len(todo), f"score {row.name}", progress)
    # one batch = images of one prompt set needing the same rewards
    batches: list[list[tuple[PromptSet, int, tuple[str, ...]]]] = []
    groups: dict[tuple[str, tuple[str, ...]], list[tuple[PromptSet, int, tuple[str, ...]]]] = {}
    for t in todo:
        groups.setdefault((t[0].name, t[2]), []).append(t)
    for g in groups.values():
        batches.extend(_chunked(g, row.cfg.eval.batch_images))
    seed = row.cfg.eval.seed

    def submit(w: Any, batch: list[tuple[PromptSet, int, tuple[str, ...]]]) -> Any:
        pngs = [(st.dir / "images" / s.file_name(i)).read_bytes() for s, i, _ in batch]
        return w.score.remote(
            pngs,
            [s.records[i]["prompt"] for s, i, _ in batch],
            [dict(s.records[i]) for s, i, _ in batch],
            list(batch[0][2]),
            cfg.rewards,
        )

    def done(
        batch: list[tuple[PromptSet, int, tuple[str, ...]]],
        result: tuple[dict[str, dict[str, list[float]]], float],
    ) -> None:
        scores, seconds = result
        with st.records_path.open("a") as f:
            for j, (s, i, _) in enumerate(batch):
                fname = s.file_name(i)
                for reward, keys in scores.items():
                    vals = {k: v[j] for k, v in keys.items()}
                    st.scores.setdefault(fname, {})[reward] = vals
                    f.write(
                        json.dumps(
                            {
                                "file": fname,
                                "seed": image_seed(seed, i),
                                "config_hash": row.config_hash,
                                "reward": reward,
                                "scorer": st.scorer_keys.get(reward),
                                "scores": vals,
                            }
                        )
                        + "\n"
                    )
        st.score_s += seconds
        st.scored += len(batch)
        bar.update(len(batch))

    try:
        if rewards is not None:
            _score_batches_on_serve(rewards, st, batches, done)
        else:
            run_queue(workers, batches, submit, done, what=f"eval row {row.name}: score")
    finally:
        bar.close()


def _score_batches_on_serve(
    rewards: Any,
    st: RowState,
    batches: list[list[tuple[PromptSet, int, tuple[str, ...]]]],
    done: Any,
) -> None:
    """The PNGs of each batch decoded here (as an eval worker decodes them) and scored image by image on the
    reward deployments; a batch's time is the wall time since the previous batch finished."""
    import time

    import torch

    from rtdmd_ray.roles.sampler import ScoreRequest

    def requests() -> Iterable[tuple[int, ScoreRequest, tuple[str, ...]]]:
        for k, batch in enumerate(batches):
            arrays = [read_png(st.dir / "images" / s.file_name(i))[0] for s, i, _ in batch]
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # uint8 [B, 3, H, W]
            yield k, ScoreRequest(images=images, prompts=[s.records[i]["prompt"] for s, i, _ in batch],
                                  metadata=[dict(s.records[i]) for s, i, _ in batch]), batch[0][2]

    last = [time.perf_counter()]

    def on_result(k: int, scores: dict[str, dict[str, list[float]]]) -> None:
        now = time.perf_counter()
        done(batches[k], (scores, now - last[0]))
        last[0] = now

    rewards.score_images(requests(), on_result)


def _metadata(
    cfg: Config, rows: Sequence[Row], states: Sequence[RowState], sets: Sequence[PromptSet], out: Path
) -> dict[str, Any]:
    from rtdmd_ray.stages.inference import SamplerSettings, model_identity

    e = cfg.eval
    rows_out = []
    for row, st in zip(rows, states, strict=True):
        entry: dict[str, Any] = {
            "name": row.name,
            "dir": row.dirname,
            "overrides": list(row.overrides),
            "config_hash": row.config_hash,
            "skipped": row.skipped,
            "sampler": SamplerSettings.from_config(row.cfg).describe(),
            "model": model_identity(row.cfg),
            "lora_paths": list(row.cfg.inference.lora_paths),
        }
        if not row.skipped:
            summary = summarize_row(st, sets, e.reward_weights)
            entry |= {
                "num_images": len(summary["records"]),
                "generated_now": st.generated,
                "scored_now": st.scored,
                "time_seconds_sum": {"generate": st.generate_s, "score": st.score_s},
                **summary,
            }
        rows_out.append(entry)
    grid = [
        {
            "dataset": sets[si].name,
            "index": i,
            "prompt": sets[si].records[i]["prompt"],
            "seed": image_seed(e.seed, i),
            "file": sets[si].file_name(i),
        }
        for si, i in grid_selection(sets, e.log_images)
    ]
    return {
        "format": "rtdmd-ray-eval/1",
        "output_dir": str(out),
        "seed": e.seed,
        "reward_weights": dict(e.reward_weights),
        "prompt_sets": [
            {"name": s.name, "token": s.token, "num_prompts": len(s.records), "rewards": list(s.rewards)}
            for s in sets
        ],
        "grid": grid,
        "rows": rows_out,
        "config": to_dict(cfg),
    }

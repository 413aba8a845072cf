"""Periodic evaluation on a learner rank: the (EMA) generator samples fixed prompts with fixed seeds and the
configured eval rewards score them (spec algorithms.md §2.10).

* Prompts: ShapeWorld (``data.kind: shapes``) uses ``shapes.prompts.eval_captions("validation",
  eval.num_prompts, eval.seed)``: captions of the train split, the very draw ``rtdmd-ray shapes eval --split
  validation --seed <eval.seed> --n-captions <eval.num_prompts>`` scores (the test split stays for the final
  table, so choices made while watching training never see it); otherwise ``eval.prompt_file`` /
  ``eval.dataset_map`` route each reward to its prompt file (capped at ``eval.num_prompts`` when > 0).
* Images: ``stages.inference.sample_images``, the sampler of every evaluation, through this rank's adapter
  stack; image ``i`` has seed ``image_seed(eval.seed, i)``, so it depends only on its prompt index, the seed
  and the weights: not on the world size, batch size or the training RNG (which is never touched). Scorers
  see the 8-bit image (``eight_bit``), as the training rewards and ``rtdmd-ray eval``'s PNGs do.
* Prompts are sharded ``i % world_size == rank``; every rank runs the same number of batches (short shards are
  padded and the pads dropped), as FSDP needs equal forward counts. Scores are aggregated as means over
  valid samples (the ``-10`` per-tag sentinel excluded) across all ranks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rtdmd_ray.config import DataConfig, EvalConfig, RewardsConfig, SamplingConfig, resolve_path
from rtdmd_ray.stages.inference import eight_bit, image_seed, sample_images
from rtdmd_ray.stages.learner_state import LearnerState

SENTINEL = -10.0


def eval_datasets(
    eval_cfg: EvalConfig, data: DataConfig
) -> dict[str, tuple[list[dict[str, Any]], list[str]]]:
    """``{dataset name: (prompt records, reward names scored on it)}`` for the eval rewards."""
    names = list(eval_cfg.reward_weights)
    if data.kind == "shapes":
        from rtdmd_ray.shapes.prompts import eval_captions

        recs = eval_captions("validation", eval_cfg.num_prompts or 600, eval_cfg.seed)
        return {"shapes_validation": (recs, names)}
    from rtdmd_ray.data.prompts import load_prompt_records
    from rtdmd_ray.rewards.multi import route_rewards_to_datasets

    if data.kind == "inline" and not eval_cfg.prompt_file and not eval_cfg.dataset_map:
        recs = [{"prompt": p} for p in data.prompts]
        return {"inline": (recs[: eval_cfg.num_prompts or None], names)}
    base = resolve_path(data.dataset_dir)
    out = {}
    for ds, rewards in route_rewards_to_datasets(names, eval_cfg.dataset_map, eval_cfg.prompt_file).items():
        recs = load_prompt_records(resolve_path(ds, base))
        out[ds] = (recs[: eval_cfg.num_prompts or None], rewards)
    return out


class EvalHook:
    """Generates and scores the eval set on one learner rank (scorers are built on first use).

    Args:
        state: the rank's learner state (its generator adapter and EMA are used).
        eval_cfg, sampling, data, rewards: config slices.
        resolution_px: image side.
    """

    def __init__(
        self,
        *,
        state: LearnerState,
        eval_cfg: EvalConfig,
        sampling: SamplingConfig,
        data: DataConfig,
        rewards: RewardsConfig,
        resolution_px: int,
    ):
        self.s, self.cfg, self.sampling, self.rewards = state, eval_cfg, sampling, rewards
        self.resolution_px = resolution_px
        self.datasets = eval_datasets(eval_cfg, data)
        steps = tuple(sampling.denoising_step_list[: eval_cfg.num_steps])
        self.sigmas = list(state.backbone.sigma_schedule(steps, resolution_px))
        self._scorers: dict[str, Any] = {}

    def scorer(self, name: str) -> Any:
        if name not in self._scorers:
            from rtdmd_ray.rewards import build_scorer

            device = self.rewards.device_for(name)
            if device == "auto":
                device = "cuda" if self.s.device.type == "cuda" else "cpu"
            opts = {
                k: (
                    str(resolve_path(v))
                    if k == "model"
                    and isinstance(v, str)
                    and not v.count(":")
                    and Path(resolve_path(v)).exists()
                    else v
                )
                for k, v in dict(self.rewards.options.get(name, {})).items()
            }
            self._scorers[name] = build_scorer(
                name, ckpt_dir=self.rewards.ckpt_dir or None, device=device, **opts
            )
        return self._scorers[name]

    # ---------------------------------------------------------------- sampling
    def sample(self, prompts: list[str], indices: list[int]) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] of the generator for ``prompts``; image noise seeded by index."""
        s = self.s

        def velocity(x: torch.Tensor, sigma: torch.Tensor, cond: Any, guidance: float = 1.0) -> torch.Tensor:
            return s.velocity("generator", x, sigma, cond, guidance=guidance)

        return sample_images(
            s.backbone,
            prompts,
            [image_seed(self.cfg.seed, i) for i in indices],
            self.sigmas,
            eta=self.cfg.noise_level,
            resolution_px=self.resolution_px,
            velocity=velocity,
            device=s.device,
        )

    # ---------------------------------------------------------------- one eval
    def run(self, image_path: Path | None = None) -> dict[str, float]:
        """Evaluate; returns ``{"eval/<reward>/<key>": mean, "eval/mean": weighted sum}`` (same on all ranks).

        Rank 0 writes a grid of its first ``eval.log_images`` images to ``image_path`` when given.
        """
        s, bs = self.s, self.cfg.batch_images
        sums: dict[str, list[float]] = {}  # key -> [sum of valid values, count]
        grid: list[torch.Tensor] = []
        with s.ema_applied(self.cfg.use_ema):
            for recs, rewards in self.datasets.values():
                mine = list(range(s.rank, len(recs), s.world_size))
                per_rank = math.ceil(len(recs) / s.world_size)
                num_batches = max(1, math.ceil(per_rank / bs))
                padded = mine + [mine[-1] if mine else 0] * (num_batches * bs - len(mine))
                for b in range(num_batches):
                    idx = padded[b * bs : (b + 1) * bs]
                    real = min(bs, max(0, len(mine) - b * bs))
                    batch = [recs[i] for i in idx]
                    images = eight_bit(self.sample([r["prompt"] for r in batch], idx))
                    if len(grid) < self.cfg.log_images:
                        grid.append(images[:real][: self.cfg.log_images - len(grid)].cpu())
                    if real == 0:
                        continue
                    for name in rewards:
                        out = self.scorer(name)(
                            images[:real], [r["prompt"] for r in batch[:real]], batch[:real]
                        )
                        for key, vals in out.items():
                            t = torch.as_tensor(vals, dtype=torch.float64).reshape(-1)
                            valid = t[t != SENTINEL]
                            acc = sums.setdefault(f"eval/{name}/{key}", [0.0, 0.0])
                            acc[0] += float(valid.sum())
                            acc[1] += float(valid.numel())
        if s.dist.active:
            gathered: list[Any] = [None] * s.world_size
            dist.all_gather_object(gathered, sums)
            total: dict[str, list[float]] = {}
            for part in gathered:
                for k, (sm, n) in part.items():
                    acc = total.setdefault(k, [0.0, 0.0])
                    acc[0] += sm
                    acc[1] += n
            sums = total
        metrics = {k: sm / n for k, (sm, n) in sorted(sums.items()) if n > 0}
        weights = self.cfg.reward_weights
        mains = [f"eval/{name}/{name}" for name in weights]
        if all(m in metrics for m in mains):
            metrics["eval/mean"] = sum(
                float(weights[name]) * metrics[f"eval/{name}/{name}"] for name in weights
            )
        if image_path is not None and s.rank == 0 and grid:
            save_grid(torch.cat(grid), image_path)
        return metrics


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    """Write ``images [N, 3, H, W]`` in [0, 1] as one PNG grid (skipped when Pillow is missing)."""
    try:
        from PIL import Image
    except ImportError:
        return
    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    canvas = torch.zeros(3, rows * h, columns * w)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i]
    arr = (canvas.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).resize((columns * w * 2, rows * h * 2), Image.NEAREST).save(path)


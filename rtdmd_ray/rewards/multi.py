"""Combining rewards (spec rewards-inference.md §2) and reducing eval scores per dataset (§2.4, §5.11).

``MultiScorer({name: weight})`` runs each scorer (in dict order, each with its own batch size) and returns one
per-sample ``[B]`` tensor per reward, the scorers' extra keys, and ``"mean"``. As in the reference,
``"mean"`` is the per-sample weighted **sum** ``Σ w_i · score_i`` (not divided by ``Σ w``, not normalised):
per-reward normalisation happens later, in the GRPO advantages.

The pure functions below implement the eval side: reward -> dataset routing, per-key means that ignore the
``-10`` sentinel, the weighted top-level ``"mean"`` with the ``"{reward}_"`` prefix on key clashes, and the
cross-rank (cross-worker) aggregation ``Σ mean·n / Σ n``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rtdmd_ray.config import resolve_path
from rtdmd_ray.rewards import DIFFERENTIABLE_REWARDS, build_scorer, validate_reward_names
from rtdmd_ray.rewards._common import SENTINEL, chunks
from rtdmd_ray.rewards.base import Scorer

logger = logging.getLogger(__name__)

MEAN_KEY = "mean"


class MultiScorer:
    """Weighted combination of named scorers.

    Args:
        weights: ``{reward_name: weight}``; order is the call order. Unknown names raise even when
            ``allow_unavailable`` is set.
        ckpt_dir: reward checkpoint root passed to every scorer (``None``: ``$RTDMD_REWARD_CKPT_PATH``).
        device: torch device for every scorer.
        devices: per-reward device overrides ``{reward_name: device}``.
        batch_images: ``{reward_name: images_per_call}``; a reward not listed scores the whole batch at once.
        options: ``{reward_name: {option: value}}`` passed to that scorer's constructor.
        allow_unavailable: skip (and record in ``unavailable``) scorers whose construction fails, instead of
            raising. Training keeps it False so a missing reward fails at pool start.
        scorers: already-built scorers to use instead of building them (tests, shared pools).
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        *,
        ckpt_dir: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        devices: Mapping[str, str] | None = None,
        batch_images: Mapping[str, int] | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        allow_unavailable: bool = False,
        scorers: Mapping[str, Scorer] | None = None,
    ) -> None:
        if not weights:
            raise ValueError("MultiScorer: rewards.weights is empty; give at least one {name: weight}")
        validate_reward_names(weights)
        validate_reward_names(batch_images or {}, where="rewards.batch_images")
        validate_reward_names(options or {}, where="rewards.options")
        validate_reward_names(devices or {}, where="rewards.devices")
        for name, bs in (batch_images or {}).items():
            if int(bs) < 1:
                raise ValueError(f"rewards.batch_images.{name} must be >= 1, got {bs}")
        self.weights = {name: float(w) for name, w in weights.items()}
        self.batch_images = {name: int(bs) for name, bs in (batch_images or {}).items()}
        self.unavailable: dict[str, str] = {}
        self.scorers: dict[str, Scorer] = {}
        for name in self.weights:
            if scorers is not None and name in scorers:
                self.scorers[name] = scorers[name]
                continue
            try:
                self.scorers[name] = build_scorer(
                    name, ckpt_dir=ckpt_dir, device=(devices or {}).get(name, device),
                    **dict((options or {}).get(name, {})),
                )
            except Exception as exc:
                if not allow_unavailable:
                    raise
                self.unavailable[name] = f"{type(exc).__name__}: {exc}"
                logger.warning("reward %s unavailable, skipped: %s", name, self.unavailable[name])

    @property
    def active_reward_names(self) -> list[str]:
        """Rewards that loaded, in call order."""
        return list(self.scorers)

    @property
    def differentiable_names(self) -> list[str]:
        """Loaded rewards with a gradient path and a non-zero weight (the BP training-reward set)."""
        return [
            n for n, s in self.scorers.items()
            if self.weights[n] != 0.0 and getattr(s, "differentiable", False) and n in DIFFERENTIABLE_REWARDS
        ]

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Score a batch with every active reward.

        Args:
            images: float ``[B, 3, H, W]`` in [0, 1].
            prompts: ``B`` strings.
            metadata: ``B`` dicts (GenEval needs them) or None.

        Returns:
            ``{reward: [B], extra keys: [B], "mean": [B]}``, float32 CPU tensors. An extra key that clashes
            with an existing key is renamed ``"{reward}_{key}"``.
        """
        n = images.shape[0]
        if len(prompts) != n:
            raise ValueError(f"MultiScorer: {n} images but {len(prompts)} prompts")
        if metadata is not None and len(metadata) != n:
            raise ValueError(f"MultiScorer: {n} images but {len(metadata)} metadata entries")
        results = {
            name: self.score_reward(name, images, list(prompts), metadata) for name in self.scorers
        }
        return merge_reward_results(results, self.weights, n)

    def score_reward(
        self,
        name: str,
        images: torch.Tensor,
        prompts: list[str],
        metadata: Sequence[dict[str, Any]] | None,
    ) -> dict[str, torch.Tensor]:
        """One reward's ``{key: [B]}`` (its own name first among the keys), in chunks of its batch size."""
        scorer = self.scorers[name]
        parts: list[dict[str, torch.Tensor]] = []
        for sl in chunks(images.shape[0], self.batch_images.get(name)):
            md = list(metadata[sl]) if metadata is not None else None
            res = scorer(images[sl], prompts[sl], md)
            if name not in res:
                raise KeyError(f"scorer {name!r} returned keys {sorted(res)} without its own name")
            parts.append({
                k: torch.as_tensor(v, dtype=torch.float32).reshape(-1).cpu()
                for k, v in res.items()
            })
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def score_differentiable(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``Σ w · score`` over ``differentiable_names``, ``[B]`` with a gradient path to ``images``."""
        names = self.differentiable_names
        if not names:
            raise ValueError(
                f"MultiScorer: no differentiable reward with non-zero weight among {list(self.scorers)}; "
                f"BP needs one of {sorted(DIFFERENTIABLE_REWARDS)} in rewards.weights"
            )
        total = None
        for name in names:
            s = self.weights[name] * self.scorers[name].score_differentiable(images, list(prompts))
            total = s if total is None else total + s
        return total


def merge_reward_results(
    results: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, float], n: int
) -> dict[str, torch.Tensor]:
    """``MultiScorer``'s output from each reward's own ``{key: [n]}`` (in ``results``' order): every reward's
    keys, an extra key that clashes with an earlier key or a reward name renamed ``"{reward}_{key}"``, and
    ``"mean"`` = ``Σ w · score``. The Serve reward path (one deployment per reward) merges with this too, so
    the advantages see the same numbers whichever way the rewards were scored."""
    out: dict[str, torch.Tensor] = {}
    total = torch.zeros(n, dtype=torch.float32)
    for name, result in results.items():
        total = total + weights[name] * result[name]
        for key, value in result.items():
            clash = key in out or key in results or key == MEAN_KEY
            out_key = key if key == name or not clash else f"{name}_{key}"
            out[out_key] = value
    out[MEAN_KEY] = total
    return out


# ------------------------------------------------------------------------------------- eval routing


def route_rewards_to_datasets(
    reward_names: Sequence[str], reward_dataset_map: Mapping[str, Any] | None, default_dataset: str
) -> dict[str, list[str]]:
    """Group rewards by the dataset their eval images come from, preserving reward order.

    A reward absent from the map, or mapped to an empty / non-string value, uses ``default_dataset``.
    Returns ``{dataset: [reward, ...]}`` in order of first appearance.
    """
    groups: dict[str, list[str]] = {}
    for name in reward_names:
        ds = (reward_dataset_map or {}).get(name)
        ds = ds if isinstance(ds, str) and ds.strip() else default_dataset
        groups.setdefault(ds, []).append(name)
    return groups


def reduce_scores(score_details: Mapping[str, Any]) -> dict[str, float]:
    """Per key, the mean over samples whose value is not the ``-10`` sentinel (keys with none are omitted)."""
    out: dict[str, float] = {}
    for key, values in score_details.items():
        t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        valid = t[t != SENTINEL]
        if valid.numel():
            out[key] = float(valid.mean())
    return out


def combine_eval_means(
    weights: Mapping[str, float], per_reward: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    """Merge per-reward reduced metrics into one dict with the top-level weighted ``"mean"``.

    ``per_reward[name]`` is ``reduce_scores`` of a single-reward scorer's output (its own key plus extras).
    ``"mean" = Σ weight · per_reward[name][name]`` over rewards that produced a value. Extra keys are copied;
    a key that is already present (or is ``"mean"``) is prefixed ``"{reward}_"``.
    """
    out: dict[str, float] = {}
    total, any_value = 0.0, False
    for name, metrics in per_reward.items():
        if name in metrics:
            total += float(weights[name]) * metrics[name]
            any_value = True
        for key, value in metrics.items():
            out_key = key if key not in out and key != MEAN_KEY else f"{name}_{key}"
            out[out_key] = value
    if any_value:
        out[MEAN_KEY] = total
    return out


def aggregate_across_ranks(per_rank: Sequence[tuple[Mapping[str, float], int]]) -> dict[str, float]:
    """Combine ``(local_means, num_local_images)`` from several ranks/workers: ``Σ mean·n / Σ n`` per key.

    The sum runs over the ranks that have the key; ``n`` is the rank's image count (as in the reference, not
    its count of non-sentinel entries).
    """
    num: dict[str, float] = {}
    den: dict[str, int] = {}
    for means, n in per_rank:
        for key, value in means.items():
            num[key] = num.get(key, 0.0) + float(value) * n
            den[key] = den.get(key, 0) + n
    return {k: num[k] / den[k] for k in num if den[k] > 0}


def resolve_scorer_options(
    options: Mapping[str, Mapping[str, Any]], names: Sequence[str] | Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """``rewards.options`` for ``names`` with repository-relative ``model`` directories made absolute (a hub
    id, or a path that does not exist, is passed through)."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        opts = dict(options.get(name, {}))
        model = opts.get("model")
        if isinstance(model, str) and model and Path(resolve_path(model)).exists():
            opts["model"] = str(resolve_path(model))
        out[name] = opts
    return out

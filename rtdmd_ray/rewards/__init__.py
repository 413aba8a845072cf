"""Reward scorers (spec rewards-inference.md §1, §2) behind one registry.

``build_scorer(name, ckpt_dir=..., device=..., **options)`` imports the scorer's module only when asked, so
``import rtdmd_ray.rewards`` stays cheap (no transformers, no OCR engine). ``KNOWN_REWARDS`` maps every
accepted reward name to ``"module:Class"``; configs are validated against it with ``validate_reward_names``.

Layer 1: may import ``config`` and ``shapes`` (the ShapeWorld GenEval scorer reads the world's captions and
renderer); never a model backbone, stage, role, driver or Ray. ``multi.py`` is the combiner.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import Any

from rtdmd_ray.rewards.base import DifferentiableScorer, RewardWeightsMissing, Scorer

# The paper's nine scorers, the ShapeWorld GenEval analogue, and two synthetic scorers for tests.
KNOWN_REWARDS: dict[str, str] = {
    "pickscore": "rtdmd_ray.rewards.pickscore:PickScoreScorer",
    "hpsv2": "rtdmd_ray.rewards.hpsv2:HPSv2Scorer",
    "hpsv3": "rtdmd_ray.rewards.hpsv3:HPSv3Scorer",
    "clipscore": "rtdmd_ray.rewards.clipscore:CLIPScoreScorer",
    "aesthetic": "rtdmd_ray.rewards.aesthetic:AestheticScorer",
    "imagereward": "rtdmd_ray.rewards.imagereward:ImageRewardScorer",
    "ocr": "rtdmd_ray.rewards.ocr:OCRScorer",
    "geneval": "rtdmd_ray.rewards.geneval:GenEvalScorer",
    "geneval2": "rtdmd_ray.rewards.geneval2:GenEval2Scorer",
    "shapes_geneval": "rtdmd_ray.rewards.shapes_geneval:ShapesGenevalScorer",
    "brightness": "rtdmd_ray.rewards.synthetic:BrightnessScorer",
    "latency": "rtdmd_ray.rewards.synthetic:LatencyScorer",
}

# Scorers with a gradient path from the image to the score (final-step reward back-propagation).
DIFFERENTIABLE_REWARDS: frozenset[str] = frozenset(
    {"pickscore", "hpsv2", "clipscore", "imagereward", "brightness"}
)


class UnknownReward(ValueError):
    """A reward name that is not in ``KNOWN_REWARDS``."""


def validate_reward_names(names: Iterable[str], *, where: str = "rewards.weights") -> None:
    """Raise ``UnknownReward`` naming the config key and the accepted names if any name is unknown."""
    unknown = [n for n in names if n not in KNOWN_REWARDS]
    if unknown:
        raise UnknownReward(f"{where}: unknown reward(s) {unknown}; accepted: {sorted(KNOWN_REWARDS)}")


def scorer_class(name: str) -> type:
    """Import and return the scorer class registered under ``name``."""
    validate_reward_names([name], where="build_scorer")
    module_name, cls_name = KNOWN_REWARDS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def build_scorer(
    name: str, *, ckpt_dir: str | os.PathLike[str] | None = None, device: str = "cpu", **options: Any
) -> Scorer:
    """Construct the scorer ``name`` (weights load here, so a missing file fails at pool start).

    Args:
        name: a key of ``KNOWN_REWARDS``.
        ckpt_dir: reward checkpoint root; ``None`` falls back to ``$RTDMD_REWARD_CKPT_PATH``, then hub ids.
        device: torch device the scorer runs on ("cpu", "cuda", "cuda:1").
        **options: scorer-specific keyword options (see each scorer's constructor).

    Raises:
        UnknownReward: ``name`` is not registered.
        RewardWeightsMissing: the scorer's weights cannot be found (one line naming file/repo and variable).
    """
    cls = scorer_class(name)
    return cls(ckpt_dir=ckpt_dir, device=device, **options)


__all__ = [
    "DIFFERENTIABLE_REWARDS",
    "KNOWN_REWARDS",
    "DifferentiableScorer",
    "RewardWeightsMissing",
    "Scorer",
    "UnknownReward",
    "build_scorer",
    "scorer_class",
    "validate_reward_names",
]

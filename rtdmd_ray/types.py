"""The typed batches the roles exchange (driver ↔ samplers ↔ reward pool ↔ learners).

Every batch is a plain dataclass of CPU tensors and lists, so it travels through the Ray object store
as is. Every tensor field documents its shape; ``N`` is the number of samples (images), ``T`` the
number of denoising steps of the trajectory. ``check()`` validates the shapes and raises a
``BatchShapeError`` that names the field; constructors call it, so an inconsistent batch cannot be
built (mutate a batch only through the helpers, or call ``check()`` again).

Per-sample fields (first dimension ``N``) are what ``index`` / ``split`` / ``cat`` slice and join;
per-batch fields (``sigmas``, ``selected_steps``, ``epoch``, ``policy_version``) must agree across
the batches given to ``cat``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rtdmd_ray.models.base import Conditioning

Index = slice | torch.Tensor | Sequence[int]

METRIC_NAMESPACES: tuple[str, ...] = ("rollout/", "reward/", "learner/", "timing/", "sync/", "eval/")


class BatchShapeError(ValueError):
    """A typed batch whose fields disagree (wrong shape, dtype or length)."""


def _fail(batch: str, message: str) -> None:
    raise BatchShapeError(f"{batch}: {message}")


def _check_per_sample_tensor(
    batch: str, name: str, t: torch.Tensor, n: int, ndim: int | None = None, dtype: torch.dtype | None = None
) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(batch, f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        _fail(batch, f"`{name}` must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.ndim == 0 or t.shape[0] != n:
        _fail(
            batch,
            f"`{name}` has {t.shape[0] if t.ndim else 0} rows (shape {tuple(t.shape)}), "
            f"expected N={n} (one per sample)",
        )
    if dtype is not None and t.dtype != dtype:
        _fail(batch, f"`{name}` must be {dtype}, got {t.dtype}")


def _index_list(items: list[Any], idx: slice | torch.Tensor, n: int) -> list[Any]:
    """Index a python list like a tensor's first dim (slice, bool mask or row indices)."""
    if isinstance(idx, slice):
        return items[idx]
    return [items[i] for i in torch.arange(n)[idx].tolist()]


def _as_index(idx: Index) -> slice | torch.Tensor:
    return idx if isinstance(idx, slice | torch.Tensor) else torch.as_tensor(list(idx), dtype=torch.long)


def _split_sections(n: int, split_size_or_sections: int | Sequence[int]) -> list[slice]:
    """Row slices with ``torch.split`` semantics (an int is the chunk size; a list the chunk sizes)."""
    if isinstance(split_size_or_sections, int):
        if split_size_or_sections <= 0:
            raise ValueError(f"split size must be positive, got {split_size_or_sections}")
        sizes = [min(split_size_or_sections, n - s) for s in range(0, n, split_size_or_sections)]
    else:
        sizes = list(split_size_or_sections)
        if sum(sizes) != n or any(s < 0 for s in sizes):
            raise ValueError(f"split sections {sizes} must be non-negative and sum to N={n}")
    out, start = [], 0
    for s in sizes:
        out.append(slice(start, start + s))
        start += s
    return out


@dataclass
class PromptBatch:
    """One sampler's share of an epoch's prompts: K-repeat groups (spec algorithms.md §3.2).

    Attributes:
        prompts: ``N`` prompt strings; the K copies of a prompt share one group id.
        metadata: ``N`` per-prompt metadata dicts (GenEval fields: tag, include, ...; ``{}`` if none).
        group_ids: shape ``[N]`` int64; equal ids mean copies of the same prompt draw (same prompt).
        seeds: shape ``[N]`` int64; per-sample seed of the initial noise.
        epoch: the RL epoch these prompts belong to.
        policy_version: the policy version the samplers must sample these prompts with.
    """

    prompts: list[str]
    metadata: list[dict[str, Any]]
    group_ids: torch.Tensor
    seeds: torch.Tensor
    epoch: int
    policy_version: int

    def __post_init__(self) -> None:
        self.check()

    def __len__(self) -> int:
        return len(self.prompts)

    def check(self) -> PromptBatch:
        """Raise ``BatchShapeError`` unless every per-sample field has ``N`` rows and groups agree."""
        n = len(self.prompts)
        if len(self.metadata) != n:
            _fail("PromptBatch", f"`metadata` has {len(self.metadata)} entries, `prompts` has {n}")
        _check_per_sample_tensor("PromptBatch", "group_ids", self.group_ids, n, ndim=1, dtype=torch.int64)
        _check_per_sample_tensor("PromptBatch", "seeds", self.seeds, n, ndim=1, dtype=torch.int64)
        first_prompt: dict[int, str] = {}
        for gid, prompt in zip(self.group_ids.tolist(), self.prompts, strict=True):
            if first_prompt.setdefault(gid, prompt) != prompt:
                _fail(
                    "PromptBatch",
                    f"group id {gid} holds two different prompts "
                    f"({first_prompt[gid]!r} and {prompt!r}); K copies of one prompt share an id",
                )
        return self

    def index(self, idx: Index) -> PromptBatch:
        """The samples at ``idx`` (a slice, a bool mask ``[N]`` or row indices)."""
        i, n = _as_index(idx), len(self)
        return PromptBatch(
            prompts=_index_list(self.prompts, i, n),
            metadata=_index_list(self.metadata, i, n),
            group_ids=self.group_ids[i],
            seeds=self.seeds[i],
            epoch=self.epoch,
            policy_version=self.policy_version,
        )

    def split(self, split_size_or_sections: int | Sequence[int]) -> list[PromptBatch]:
        """Consecutive chunks, ``torch.split`` semantics (an int is the chunk size)."""
        return [self.index(s) for s in _split_sections(len(self), split_size_or_sections)]


def quantize_images(images: torch.Tensor) -> torch.Tensor:
    """Float images ``[N, 3, H, W]`` in [0, 1] → uint8 ``[N, 3, H, W]`` (round to nearest)."""
    return (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def conditioning_key(prompts: Sequence[str], encoder_id: str) -> str:
    """A stable key naming the conditioning of ``prompts`` under text-encoder stack ``encoder_id``."""
    h = hashlib.sha256(encoder_id.encode())
    for p in prompts:
        h.update(b"\x00" + p.encode())
    return f"{encoder_id}:{h.hexdigest()[:16]}"


@dataclass
class RolloutBatch:
    """Trajectories of one sampler call, with everything the learner needs (spec algorithms.md §3.3).

    Attributes:
        latents: shape ``[N, T, C, H, W]`` float32; ``x_0 .. x_{T-1}``, the input of each step.
        next_latents: shape ``[N, T, C, H, W]`` float32; ``x_1 .. x_T``, the output of each step.
        log_probs: shape ``[N, T]`` float32; log-prob of each CPS transition under the sampling policy.
        sigmas: shape ``[T + 1]`` float32; the schedule the trajectories used, ending in 0.
        selected_steps: the SubGRPO steps (indices in ``[0, T)``, sorted) trained with PPO this epoch.
        images: shape ``[N, 3, H_img, W_img]`` uint8; the decoded final samples as sent on the wire
            (``images_float`` is the float view in [0, 1]).
        prompts: ``N`` prompt strings.
        metadata: ``N`` metadata dicts.
        seeds: shape ``[N]`` int64; the per-sample seed of the initial noise.
        group_ids: shape ``[N]`` int64; K copies of a prompt share one id.
        sampler_ids: shape ``[N]`` int64; which sampler produced each sample (kept per sample so
            ``cat`` across samplers keeps it).
        epoch: the RL epoch.
        policy_version: the policy version of the weights that sampled these trajectories.
        conditioning: the encoded prompts (every tensor ``[N, ...]``), or None when the learner
            recomputes it from ``prompts`` (then ``conditioning_key`` names the text-encoder stack).
        conditioning_key: see ``conditioning_key()``; required when ``conditioning`` is None.
        extras: further per-sample tensors, each ``[N, ...]`` (e.g. ``noise_preds [N, T, C, H, W]``).
    """

    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    selected_steps: tuple[int, ...]
    images: torch.Tensor
    prompts: list[str]
    metadata: list[dict[str, Any]]
    seeds: torch.Tensor
    group_ids: torch.Tensor
    sampler_ids: torch.Tensor
    epoch: int
    policy_version: int
    conditioning: Conditioning | None = None
    conditioning_key: str | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.selected_steps = tuple(int(s) for s in self.selected_steps)
        self.check()

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        """``T``, the trajectory length."""
        return self.log_probs.shape[1]

    @property
    def images_float(self) -> torch.Tensor:
        """The images as float32 ``[N, 3, H, W]`` in [0, 1]."""
        return self.images.float() / 255.0

    def check(self) -> RolloutBatch:
        """Raise ``BatchShapeError`` (naming the field) unless all shapes agree."""
        b, n = "RolloutBatch", len(self.prompts)
        if len(self.metadata) != n:
            _fail(b, f"`metadata` has {len(self.metadata)} entries, `prompts` has {n}")
        _check_per_sample_tensor(b, "latents", self.latents, n, ndim=5)
        _check_per_sample_tensor(b, "log_probs", self.log_probs, n, ndim=2)
        t = self.log_probs.shape[1]
        if self.latents.shape[1] != t:
            _fail(
                b,
                f"`latents` {tuple(self.latents.shape)} has T={self.latents.shape[1]} steps, "
                f"`log_probs` {tuple(self.log_probs.shape)} has T={t}",
            )
        if self.next_latents.shape != self.latents.shape:
            _fail(
                b,
                f"`next_latents` {tuple(self.next_latents.shape)} must match `latents` "
                f"{tuple(self.latents.shape)}",
            )
        if not self.latents.is_floating_point() or not self.next_latents.is_floating_point():
            _fail(b, "`latents` and `next_latents` must be floating point")
        if self.sigmas.ndim != 1 or self.sigmas.shape[0] != t + 1:
            _fail(b, f"`sigmas` must be [T+1]=[{t + 1}], got {tuple(self.sigmas.shape)}")
        if any(s < 0 or s >= t for s in self.selected_steps) or list(self.selected_steps) != sorted(
            set(self.selected_steps)
        ):
            _fail(b, f"`selected_steps` {self.selected_steps} must be sorted, unique indices in [0, {t})")
        _check_per_sample_tensor(b, "images", self.images, n, ndim=4, dtype=torch.uint8)
        if self.images.shape[1] != 3:
            _fail(b, f"`images` must be [N, 3, H, W], got {tuple(self.images.shape)}")
        for name in ("seeds", "group_ids", "sampler_ids"):
            _check_per_sample_tensor(b, name, getattr(self, name), n, ndim=1, dtype=torch.int64)
        if self.conditioning is None and not self.conditioning_key:
            _fail(
                b,
                "set `conditioning` (the encoded prompts) or `conditioning_key` (the learner "
                "recomputes it from `prompts`); both are empty",
            )
        if self.conditioning is not None:
            for k, v in self.conditioning.tensors.items():
                _check_per_sample_tensor(b, f"conditioning.{k}", v, n)
        for k, v in self.extras.items():
            _check_per_sample_tensor(b, f"extras.{k}", v, n)
        return self

    def index(self, idx: Index) -> RolloutBatch:
        """The samples at ``idx`` (a slice, a bool mask ``[N]`` or row indices); per-batch fields are kept."""
        i, n = _as_index(idx), len(self)
        return RolloutBatch(
            latents=self.latents[i],
            next_latents=self.next_latents[i],
            log_probs=self.log_probs[i],
            sigmas=self.sigmas,
            selected_steps=self.selected_steps,
            images=self.images[i],
            prompts=_index_list(self.prompts, i, n),
            metadata=_index_list(self.metadata, i, n),
            seeds=self.seeds[i],
            group_ids=self.group_ids[i],
            sampler_ids=self.sampler_ids[i],
            epoch=self.epoch,
            policy_version=self.policy_version,
            conditioning=None if self.conditioning is None else self.conditioning.index(i),
            conditioning_key=self.conditioning_key,
            extras={k: v[i] for k, v in self.extras.items()},
        )

    def split(self, split_size_or_sections: int | Sequence[int]) -> list[RolloutBatch]:
        """Consecutive chunks along ``N``, ``torch.split`` semantics (an int is the chunk size)."""
        return [self.index(s) for s in _split_sections(len(self), split_size_or_sections)]

    @staticmethod
    def cat(batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Concatenate along ``N``; per-batch fields must agree (epoch, policy version, schedule)."""
        if not batches:
            raise ValueError("RolloutBatch.cat needs at least one batch")
        first = batches[0]
        for i, bt in enumerate(batches[1:], start=1):
            for name in ("epoch", "policy_version", "selected_steps", "conditioning_key"):
                if getattr(bt, name) != getattr(first, name):
                    raise BatchShapeError(
                        f"RolloutBatch.cat: batch {i} has {name}={getattr(bt, name)!r}, batch 0 has "
                        f"{getattr(first, name)!r}; group batches by {name} before concatenating"
                    )
            if not torch.equal(bt.sigmas, first.sigmas):
                raise BatchShapeError(
                    f"RolloutBatch.cat: batch {i} used another sigma schedule "
                    f"({bt.sigmas.tolist()} vs {first.sigmas.tolist()})"
                )
            if (bt.conditioning is None) != (
                first.conditioning is None
            ) or bt.extras.keys() != first.extras.keys():
                raise BatchShapeError(
                    f"RolloutBatch.cat: batch {i} carries other optional fields "
                    "(conditioning / extras keys) than batch 0"
                )
        return RolloutBatch(
            latents=torch.cat([b.latents for b in batches]),
            next_latents=torch.cat([b.next_latents for b in batches]),
            log_probs=torch.cat([b.log_probs for b in batches]),
            sigmas=first.sigmas,
            selected_steps=first.selected_steps,
            images=torch.cat([b.images for b in batches]),
            prompts=[p for b in batches for p in b.prompts],
            metadata=[m for b in batches for m in b.metadata],
            seeds=torch.cat([b.seeds for b in batches]),
            group_ids=torch.cat([b.group_ids for b in batches]),
            sampler_ids=torch.cat([b.sampler_ids for b in batches]),
            epoch=first.epoch,
            policy_version=first.policy_version,
            conditioning=None
            if first.conditioning is None
            else Conditioning.cat([b.conditioning for b in batches]),
            conditioning_key=first.conditioning_key,
            extras={k: torch.cat([b.extras[k] for b in batches]) for k in first.extras},
        )


@dataclass
class ScoredBatch:
    """Rewards of the ``N`` samples of one ``RolloutBatch``, in the same order (spec rewards-inference.md §2).

    Attributes:
        scores: ``{name: [N] float32}``, one entry per scorer output (diagnostic keys such as GenEval's
            ``strict_accuracy`` may sit beside the weighted rewards).
        weights: ``{name: weight}`` of the rewards in the training objective; each name is in ``scores``.
        total: shape ``[N]`` float32; ``Σ_k w_k · r_k`` over ``weights`` (not divided by ``Σ w``), NaN
            where ``valid`` is False so a quarantined sample can never be silently averaged in.
        valid: shape ``[N]`` bool; False where any weighted reward is NaN/inf (quarantined).
    """

    scores: dict[str, torch.Tensor]
    weights: dict[str, float]
    total: torch.Tensor
    valid: torch.Tensor

    def __post_init__(self) -> None:
        self.check()

    @classmethod
    def from_scores(cls, scores: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> ScoredBatch:
        """Build the weighted total and the quarantine mask from per-reward scores ``{name: [N]}``."""
        missing = sorted(set(weights) - set(scores))
        if missing:
            raise BatchShapeError(
                f"ScoredBatch: weighted rewards {missing} have no scores "
                f"(got {sorted(scores)}); check the `rewards` section of the config"
            )
        scores = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in scores.items()}
        n = next(iter(scores.values())).shape[0] if scores else 0
        valid = torch.ones(n, dtype=torch.bool)
        total = torch.zeros(n, dtype=torch.float32)
        for name, w in weights.items():
            valid &= torch.isfinite(scores[name])
            total += float(w) * scores[name]
        total = torch.where(valid, total, torch.full_like(total, math.nan))
        return cls(scores=scores, weights=dict(weights), total=total, valid=valid)

    def __len__(self) -> int:
        return self.total.shape[0]

    @property
    def count(self) -> int:
        """``N``, the number of samples scored (valid or not)."""
        return len(self)

    @property
    def num_quarantined(self) -> int:
        """How many samples have a NaN/inf weighted reward."""
        return int((~self.valid).sum())

    def check(self) -> ScoredBatch:
        """Raise ``BatchShapeError`` unless every score, the total and the mask are ``[N]``."""
        b = "ScoredBatch"
        if self.total.ndim != 1:
            _fail(b, f"`total` must be [N], got {tuple(self.total.shape)}")
        n = self.total.shape[0]
        if self.valid.shape != (n,) or self.valid.dtype != torch.bool:
            _fail(b, f"`valid` must be bool [N]=[{n}], got {self.valid.dtype} {tuple(self.valid.shape)}")
        for name, s in self.scores.items():
            if s.shape != (n,):
                _fail(b, f"`scores[{name!r}]` must be [N]=[{n}], got {tuple(s.shape)}")
        missing = sorted(set(self.weights) - set(self.scores))
        if missing:
            _fail(b, f"weighted rewards {missing} have no scores")
        if not bool(torch.isfinite(self.total[self.valid]).all()):
            _fail(b, "`total` is NaN/inf at a sample marked valid; build with ScoredBatch.from_scores")
        return self

    def index(self, idx: Index) -> ScoredBatch:
        """The samples at ``idx`` (a slice, a bool mask ``[N]`` or row indices)."""
        i = _as_index(idx)
        return ScoredBatch(
            scores={k: v[i] for k, v in self.scores.items()},
            weights=self.weights,
            total=self.total[i],
            valid=self.valid[i],
        )

    @staticmethod
    def cat(batches: Sequence[ScoredBatch]) -> ScoredBatch:
        """Concatenate along ``N``; all batches must have the same reward names and weights."""
        if not batches:
            raise ValueError("ScoredBatch.cat needs at least one batch")
        first = batches[0]
        for i, bt in enumerate(batches[1:], start=1):
            if bt.weights != first.weights or bt.scores.keys() != first.scores.keys():
                raise BatchShapeError(
                    f"ScoredBatch.cat: batch {i} has rewards {sorted(bt.scores)} / weights "
                    f"{bt.weights}, batch 0 has {sorted(first.scores)} / {first.weights}"
                )
        return ScoredBatch(
            scores={k: torch.cat([b.scores[k] for b in batches]) for k in first.scores},
            weights=first.weights,
            total=torch.cat([b.total for b in batches]),
            valid=torch.cat([b.valid for b in batches]),
        )


@dataclass
class TrainMetrics:
    """A flat ``{key: float}`` of one epoch's metrics with namespaced keys.

    Keys start with one of ``METRIC_NAMESPACES``: ``rollout/...``, ``reward/<name>/...``,
    ``learner/...``, ``timing/<phase>``, ``sync/...`` (and ``eval/...``). The same dict goes to stdout,
    jsonl, wandb and the Ray dashboard.
    """

    values: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = {k: self._as_float(k, v) for k, v in self.values.items()}
        self.check()

    @staticmethod
    def _as_float(key: str, value: Any) -> float:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"metric {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}"
                )
            value = value.item()
        return float(value)

    @staticmethod
    def check_key(key: str) -> None:
        """Raise ``ValueError`` unless ``key`` is a namespaced metric key."""
        ns = next((p for p in METRIC_NAMESPACES if key.startswith(p)), None)
        rest = key[len(ns) :] if ns else ""
        if ns is None or not rest or rest.startswith("/") or rest.endswith("/"):
            raise ValueError(
                f"metric key {key!r} must be '<namespace><name>' with a namespace in "
                f"{METRIC_NAMESPACES}, e.g. 'timing/sample' or 'reward/pickscore/mean'"
            )
        if ns == "reward/" and rest.count("/") < 1:
            raise ValueError(
                f"metric key {key!r}: reward metrics are 'reward/<name>/<stat>', e.g. 'reward/pickscore/mean'"
            )

    def check(self) -> TrainMetrics:
        for k in self.values:
            self.check_key(k)
        return self

    def add(self, key: str, value: float | torch.Tensor) -> None:
        """Set one metric (``key`` namespaced, ``value`` a number or a one-element tensor)."""
        self.check_key(key)
        self.values[key] = self._as_float(key, value)

    def update(self, prefix: str, values: Mapping[str, float | torch.Tensor]) -> None:
        """Set ``{prefix}/{name}`` for each entry, e.g. ``update("reward/pickscore", {"mean": 0.2})``."""
        for name, v in values.items():
            self.add(f"{prefix.rstrip('/')}/{name}", v)

    def merge(self, other: TrainMetrics | Mapping[str, float]) -> TrainMetrics:
        """Add all of ``other``'s metrics (later values win) and return self."""
        items = other.values if isinstance(other, TrainMetrics) else other
        for k, v in items.items():
            self.add(k, v)
        return self

    def as_dict(self) -> dict[str, float]:
        return dict(self.values)

"""SubGRPO pieces: K-repeat prompt draws, step selection, shared noise, group advantages, the filter and PPO
(spec §3.2, §3.3, §3.5, §3.7). Everything here is deterministic given its seeds, so every rank (or actor)
computes the same values without a collective.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

import torch

# Seed arithmetic of the reference, kept so runs reproduce its draws.
_STEP_SELECT_EPOCH_STRIDE = 100_000
_STEP_SELECT_OFFSET = 104_729
_SHARED_NOISE_STEP_STRIDE = 10_007
_SHARED_NOISE_EPOCH_STRIDE = 100_000
_FILTER_EPOCH_STRIDE = 1_000_003
_FILTER_PAD_OFFSET = 17


# -------------------------------------------------------------------------------------- prompts (§3.2)
def k_repeat_indices(
    seed: int,
    draw_index: int,
    dataset_len: int,
    total_slots: int,
    images_per_prompt: int,
) -> list[int]:
    """Dataset rows filling the ``total_slots = W * b`` sample slots of one draw
    (``DistributedKRepeatSampler``).

    A CPU ``torch.Generator`` seeded with ``seed + draw_index`` (``draw_index = epoch * num_batches + i``)
    takes the first ``m = total_slots / K`` entries of a permutation of the dataset, repeats each ``K`` times,
    and shuffles the list with the same generator. The ``K`` copies of a prompt land on different ranks, so
    advantages need all of them. Rank ``r`` takes ``[r * b, (r + 1) * b)``.

    Returns:
        ``total_slots`` dataset indices.
    """
    if images_per_prompt < 1 or total_slots % images_per_prompt:
        raise ValueError(
            f"samples per draw ({total_slots}) must be divisible by images_per_prompt ({images_per_prompt}) "
            "(config keys grpo.images_per_prompt and the per-draw prompt count)"
        )
    num_prompts = total_slots // images_per_prompt
    if num_prompts > dataset_len:
        raise ValueError(
            f"a draw needs {num_prompts} distinct prompts but the dataset has only {dataset_len}"
        )
    g = torch.Generator()
    g.manual_seed(int(seed) + int(draw_index))
    rows = torch.randperm(dataset_len, generator=g)[:num_prompts].tolist()
    repeated = [row for row in rows for _ in range(images_per_prompt)]
    order = torch.randperm(total_slots, generator=g).tolist()
    return [repeated[i] for i in order]


# ----------------------------------------------------------------- step selection, shared noise (§3.3)
def select_train_steps(seed: int, epoch: int, candidates: Sequence[int], k: int) -> list[int]:
    """The ``k`` SubGRPO-trained step indices of ``epoch``, sorted; identical on every rank.

    ``random.Random(seed + epoch * 100000 + 104729).sample(candidates, k)`` (shipped: 2 of ``[0, 1, 2]``).
    """
    cands = list(candidates)
    if not 0 < k <= len(cands):
        raise ValueError(
            f"num_train_steps={k} must be in [1, {len(cands)}] (grpo.step_selection range {cands})"
        )
    rng = random.Random(int(seed) + int(epoch) * _STEP_SELECT_EPOCH_STRIDE + _STEP_SELECT_OFFSET)
    return sorted(rng.sample(cands, k))


def shared_noise_seed(prompt: str, step: int, epoch: int) -> int:
    """``(u32_be(sha256(prompt)[:4]) + 10007 * step + 100000 * epoch) mod 2^31``."""
    prompt_hash = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
    return (prompt_hash + _SHARED_NOISE_STEP_STRIDE * int(step) + _SHARED_NOISE_EPOCH_STRIDE * int(epoch)) % (
        2**31
    )


def shared_noise(prompt: str, step: int, epoch: int, shape: Sequence[int]) -> torch.Tensor:
    """Prompt-deterministic CPS noise for a non-trained step: CPU float32 ``randn(shape)``.

    Identical for every copy of a prompt (any rank) within an epoch, so rewards within a group differ only
    through the initial noise and the trained steps' noise.
    """
    g = torch.Generator()
    g.manual_seed(shared_noise_seed(prompt, step, epoch))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def shared_noise_batch(prompts: Sequence[str], step: int, epoch: int, shape: Sequence[int]) -> torch.Tensor:
    """``[B, *shape]`` stack of ``shared_noise`` for each prompt (CPU float32; move it to the device)."""
    return torch.stack([shared_noise(p, step, epoch, shape) for p in prompts])


# ----------------------------------------------------------------------------------- advantages (§3.5)
def _group_ids(prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, int]:
    index: dict[str, int] = {}
    ids = [index.setdefault(p, len(index)) for p in prompts]
    return torch.tensor(ids, dtype=torch.int64, device=device), len(index)


def _group_mean_std(values: torch.Tensor, mask: torch.Tensor, gid: torch.Tensor, num_groups: int):
    """Per-sample mean and population std of its group, over masked (valid) members only. float64 ``[N]``."""
    w = mask.double()
    count = torch.zeros(num_groups, dtype=torch.float64, device=values.device).index_add_(0, gid, w)
    total = torch.zeros_like(count).index_add_(0, gid, values * w)
    mean = total / count.clamp(min=1.0)
    sq = torch.zeros_like(count).index_add_(0, gid, (values - mean[gid]) ** 2 * w)
    std = torch.sqrt(sq / count.clamp(min=1.0))
    return mean[gid], std[gid]


def _masked_mean_std(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = values[mask]
    return v.mean(), v.std(correction=0)


def compute_advantages(
    rewards: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    prompts: Sequence[str],
    *,
    eps: float = 1e-4,
    valid: torch.Tensor | None = None,
    weight_advantages: bool = True,
    per_prompt: bool = True,
    per_prompt_global_std: bool = True,
) -> torch.Tensor:
    """Group-relative advantages of one epoch's gathered samples, ``[N]`` float32 (computed in float64).

    ``weight_advantages=True`` (shipped): for each reward ``k`` in ``weights``,
    ``A_k = (r_k - mean_{same prompt}(r_k)) / (std_all(r_k) + eps)`` (population std over all samples; with
    ``per_prompt_global_std=False`` the group's own std; with ``per_prompt=False`` a global z-score); then
    ``A = sum_k w_k A_k`` and the global renormalisation ``(A - mean(A)) / (std(A) + eps)``.
    ``weight_advantages=False``: the same per-prompt normalisation of the weighted sum ``sum_k w_k r_k``,
    without the final renormalisation. A group is every sample with the identical prompt string (K, or more
    if a prompt was drawn twice). The advantage is constant across the steps of a sample: expand it to ``[N,
    T]`` if needed.

    Args:
        rewards: ``{name: [N]}`` per-reward scores.
        weights: ``{name: weight}``; every name must be in ``rewards`` (extra reward keys are ignored).
        prompts: ``N`` prompt strings (the group key).
        valid: optional ``[N]`` bool; invalid (e.g. NaN-quarantined) samples are left out of every statistic
            and get advantage exactly 0. Non-finite rewards on valid samples are an error.

    Returns:
        ``[N]`` float32 advantages on the rewards' device.
    """
    missing = [k for k in weights if k not in rewards]
    if missing:
        raise KeyError(
            f"rewards {sorted(rewards)} lack the weighted keys {missing} (config key rewards.weights)"
        )
    if not weights:
        raise ValueError("compute_advantages needs at least one weighted reward (config key rewards.weights)")
    first = next(iter(rewards[k] for k in weights))
    n = len(prompts)
    device = first.device
    mask = (
        torch.ones(n, dtype=torch.bool, device=device)
        if valid is None
        else valid.to(device).bool().reshape(-1)
    )
    if mask.shape[0] != n:
        raise ValueError(f"valid has {mask.shape[0]} entries but there are {n} prompts")
    table: dict[str, torch.Tensor] = {}
    for k in weights:
        r = rewards[k].to(device).double().reshape(-1)
        if r.shape[0] != n:
            raise ValueError(f"reward {k!r} has {r.shape[0]} entries but there are {n} prompts")
        if not torch.isfinite(r[mask]).all():
            raise ValueError(f"reward {k!r} has non-finite values on valid samples: pass them as valid=False")
        table[k] = torch.where(mask, r, torch.zeros_like(r))
    out = torch.zeros(n, dtype=torch.float64, device=device)
    if not bool(mask.any()):
        return out.float()
    gid, num_groups = _group_ids(prompts, device)

    def normalise(r: torch.Tensor) -> torch.Tensor:
        if per_prompt:
            g_mean, g_std = _group_mean_std(r, mask, gid, num_groups)
            std = _masked_mean_std(r, mask)[1] if per_prompt_global_std else g_std
            return (r - g_mean) / (std + eps)
        mean, std = _masked_mean_std(r, mask)
        return (r - mean) / (std + eps)

    if weight_advantages:
        adv = sum(float(w) * normalise(table[k]) for k, w in weights.items())
        mean, std = _masked_mean_std(adv, mask)
        adv = (adv - mean) / (std + eps)
    else:
        total = sum(float(w) * table[k] for k, w in weights.items())
        adv = normalise(total)
    return torch.where(mask, adv, out).float()


def zero_advantage_filter(advantages: torch.Tensor, num_batches: int, epoch: int, rank: int) -> torch.Tensor:
    """Rank-local keep mask ``[N]`` bool: drop rows whose ``sum_T |A| == 0`` (spec §3.5 step 5).

    If none survive, ``min(N, num_batches)`` random rows are kept (generator seed ``epoch * 1000003 + rank``);
    if the kept count is not a multiple of ``num_batches``, random dropped rows are re-admitted (seed ``+
    17``), so sub-batches stay equal. Deterministic per (epoch, rank).

    Args:
        advantages: ``[N]`` or ``[N, T]``; ``N`` must be a multiple of ``num_batches``.
    """
    adv = advantages.reshape(advantages.shape[0], -1)
    n = adv.shape[0]
    if num_batches < 1 or n % num_batches:
        raise ValueError(
            f"{n} local samples cannot be split into num_batches={num_batches} equal sub-batches "
            "(config key grpo.sample_batches_per_epoch)"
        )
    keep = adv.abs().sum(dim=1).cpu() != 0
    if not bool(keep.any()) and n > 0:
        g = torch.Generator()
        g.manual_seed(int(epoch) * _FILTER_EPOCH_STRIDE + int(rank))
        keep[torch.randperm(n, generator=g)[: min(n, num_batches)]] = True
    count = int(keep.sum())
    if count % num_batches:
        dropped = torch.where(~keep)[0]
        need = num_batches - count % num_batches
        g = torch.Generator()
        g.manual_seed(int(epoch) * _FILTER_EPOCH_STRIDE + int(rank) + _FILTER_PAD_OFFSET)
        keep[dropped[torch.randperm(len(dropped), generator=g)[:need]]] = True
    return keep


# ------------------------------------------------------------------------------------------ PPO (§3.7)
def ppo_loss(
    log_prob_new: torch.Tensor,
    log_prob_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_range_lt: float,
    clip_range_gt: float,
    adv_clip_max: float = 5.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO policy loss of one step, ``mean_B max(-A r, -A clip(r, 1 - eps_lt, 1 + eps_gt))``.

    ``r = exp(logp_new - logp_old)``; ``A`` is clipped to ``+-adv_clip_max`` first. On-policy
    (``logp_new == logp_old``) the ratio is exactly 1 and the gradient is ``-A * grad(logp) / B``.

    Args:
        log_prob_new: ``[B]`` (with grad); log_prob_old: ``[B]`` stored at sampling; advantages: ``[B]``.

    Returns:
        ``(loss, stats)``: scalar float32 loss; detached stats ``ratio_mean/min/max``, ``clip_frac``
        (fraction of samples whose ratio lies outside the clip interval) and ``approx_kl``
        (``0.5 * mean (logp_new - logp_old)^2``).
    """
    if not (log_prob_new.shape == log_prob_old.shape == advantages.shape) or log_prob_new.ndim != 1:
        raise ValueError(
            f"ppo_loss expects [B] tensors, got new {tuple(log_prob_new.shape)}, "
            f"old {tuple(log_prob_old.shape)}, advantages {tuple(advantages.shape)}"
        )
    adv = torch.clamp(advantages.float(), -adv_clip_max, adv_clip_max)
    log_ratio = log_prob_new.float() - log_prob_old.float().detach()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range_lt, 1.0 + clip_range_gt)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    with torch.no_grad():
        r = ratio.detach()
        stats = {
            "ratio_mean": r.mean(),
            "ratio_min": r.min(),
            "ratio_max": r.max(),
            "clip_frac": ((r < 1.0 - clip_range_lt) | (r > 1.0 + clip_range_gt)).float().mean(),
            "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
        }
    return loss, stats


def kl_penalty(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL to a reference policy for one step, ``mean_B[ mean_CHW (mu - mu_ref)^2 / (2 rho^2) ]``
    (``grpo.beta``).

    Only meaningful on stochastic steps (``rho > 0``); the reference skips it when ``min rho == 0``.
    """
    if bool((std <= 0).any()):
        raise ValueError("kl_penalty needs rho > 0: leave deterministic steps out of the KL term")
    per = ((mean.float() - mean_ref.float().detach()) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    return (per / (2 * std.float().reshape(-1) ** 2)).mean()


def zero_variance_group_fraction(
    rewards: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    prompts: Sequence[str],
    *,
    valid: torch.Tensor | None = None,
    tol: float = 1e-12,
) -> float:
    """Fraction of prompt groups (samples with the identical prompt string, at least one valid) in which every
    weighted reward is constant over the valid members: those samples carry no SubGRPO signal (their
    group-centred advantage is 0 before the global renormalisation)."""
    n = len(prompts)
    if n == 0:
        return 0.0
    first = next(iter(rewards[k] for k in weights))
    mask = (torch.ones(n, dtype=torch.bool, device=first.device) if valid is None
            else valid.to(first.device).bool().reshape(-1))
    gid, num_groups = _group_ids(prompts, first.device)
    flat = torch.zeros(num_groups, dtype=torch.bool, device=first.device).index_fill_(0, gid[mask], True)
    if not bool(flat.any()):
        return 0.0
    varies = torch.zeros(num_groups, dtype=torch.bool, device=first.device)
    for k, w in weights.items():
        if float(w) == 0.0:
            continue
        r = rewards[k].to(first.device).double().reshape(-1)
        r = torch.where(mask, r, torch.zeros_like(r))
        _, std = _group_mean_std(r, mask, gid, num_groups)
        varies.index_fill_(0, gid[mask & (std > tol)], True)
    return float((flat & ~varies).sum()) / float(flat.sum())

"""The RL stage on one learner rank (spec algorithms.md §3.1, §3.5-§3.7): Ray-free, distributed-aware.

One epoch on a rank (``RLUpdate.run_epoch``), on the rank's shard of the epoch's rollouts:

1. **Fake-score update** (§3.6): AC-DMD flow matching on the rollout's boundary samples at the aux steps
   (``x_s = next_latents[:, j]``, ``sigma_s = sigma_{j+1}``; 0 at the last step), every local sample, chunks
   accumulated into ONE fake-score optimiser step.
2. **Advantages** (§3.5): the weighted rewards and validity masks of all ranks are all-gathered (rank-major),
   ``algorithms.grpo.compute_advantages`` runs on the gathered epoch (groups span ranks), each rank keeps its
   slice, then the zero-advantage filter keeps a multiple of the micro-batch count.
3. **Generator update** (§3.7): per micro-batch and per step ``j`` in ``P ∪ A``: the PPO loss on the SubGRPO
   steps ``P`` (log-prob recomputed against the stored next latent), and on the aux steps ``A`` the AC-DMD
   DMD loss (teacher with CFG vs fake score, projected back to ``sigma_s``) plus the reward back-propagation
   hinge through the VAE decode (``sigma_{j+1} = 0`` only). Every backward is ``loss / E`` with ``E =
   micro-batches per optimiser step x |P ∪ A|``: gradient accumulation to one optimiser step per epoch by
   default, the EMA once per optimiser step.

The RL adapter stack (``RLLearnerState``, a frozen cold-start adapter under the trained one) is in
``rl_state.py``; the learner actor that runs this update is ``roles/learner.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from rtdmd_ray.algorithms import acdmd
from rtdmd_ray.algorithms.bp import hinge_reward_loss
from rtdmd_ray.algorithms.cps import CPSStep, cps_step, predict_x0, sde_step
from rtdmd_ray.algorithms.grpo import (
    compute_advantages,
    ppo_loss,
    zero_advantage_filter,
    zero_variance_group_fraction,
)
from rtdmd_ray.config import (
    ACDMDConfig,
    DMDConfig,
    GRPOConfig,
    LastStepLossConfig,
    ModelConfig,
    RewardsConfig,
    SamplingConfig,
    TrainConfig,
)
from rtdmd_ray.stages.cold_start_step import fake_score_objective
from rtdmd_ray.stages.learner_state import DistContext, LearnerState, Stopwatch, to_local
from rtdmd_ray.stages.rl_state import RLLearnerState
from rtdmd_ray.types import RolloutBatch, ScoredBatch


# ------------------------------------------------------------------------------------ gathers (§3.5)
def gather_rewards(
    scores: ScoredBatch, prompts: list[str], weights: dict[str, float], *, world_size: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """All-gather the weighted rewards ``{name: [N]}``, the validity mask ``[N]`` and the prompts of every
    rank, concatenated rank-major (``N = world_size x n``; every rank must hold the same ``n``).

    Single-process (``world_size == 1`` or no process group) returns the local values.
    """
    names = list(weights)
    local = torch.stack([scores.scores[k].float() for k in names] + [scores.valid.float()])  # [K + 1, n]
    if world_size == 1 or not dist.is_initialized():
        return {k: local[i] for i, k in enumerate(names)}, scores.valid.clone(), list(prompts)
    n = torch.tensor([local.shape[1]], dtype=torch.int64)
    counts = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(counts, n)
    if len({int(c) for c in counts}) != 1:
        raise RuntimeError(
            f"learner ranks hold different sample counts {[int(c) for c in counts]}: the driver "
            "must give every rank samples_per_epoch / resources.learner.count samples"
        )
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local)
    table = torch.cat(parts, dim=1)
    all_prompts: list[Any] = [None] * world_size
    dist.all_gather_object(all_prompts, list(prompts))
    flat = [p for chunk in all_prompts for p in chunk]
    return {k: table[i] for i, k in enumerate(names)}, table[-1] > 0.5, flat


# ------------------------------------------------------------------------------------ per-term gradients
TERMS = ("subgrpo", "aux_dmd", "bp")


class TermGradients:
    """Each loss term's own share of the generator gradient over one optimiser step (an instrument).

    The terms of a micro-batch are backpropagated one at a time, each into its own gradient buffers (swapped
    into ``p.grad`` for that backward), so nothing is cloned; ``merge`` sums them into ``p.grad`` for the
    optimiser. The norms are taken after the rank reduction the optimiser applies and before clipping, on
    the scale of ``learner/generator/grad_norm``; ``grad_cos_prev`` compares a term's step gradient with the
    previous step's (about 0 when a step carries no signal, spec rl-diagnosis.md).
    """

    def __init__(self, params: list[torch.nn.Parameter], dist_ctx: DistContext, *, averaged: bool):
        self.params, self.dist, self.averaged = params, dist_ctx, averaged
        self.grads: dict[str, list[torch.Tensor | None]] = {}
        self.previous: dict[str, torch.Tensor] = {}

    def backward(self, terms: Sequence[tuple[str, torch.Tensor]], scale: float) -> None:
        live = [(k, loss) for k, loss in terms if loss.requires_grad]
        for i, (k, loss) in enumerate(live):
            buf = self.grads.setdefault(k, [None] * len(self.params))
            for p, g in zip(self.params, buf, strict=True):
                p.grad = g
            (loss * scale).backward(retain_graph=i < len(live) - 1)  # the terms share the forward
            self.grads[k] = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None

    def _flat(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        return torch.cat([
            (to_local(g) if g is not None else torch.zeros_like(to_local(p))).detach().reshape(-1).double()
            for p, g in zip(self.params, grads, strict=True)
        ])

    def merge(self) -> dict[str, float]:
        """Put the terms' sum into ``p.grad``; returns ``learner/grad_norm/<term>`` and
        ``learner/grad_cos_prev/<term>`` for this step, then forgets the buffers."""
        out: dict[str, float] = {}
        for k in TERMS:
            if k not in self.grads:
                continue
            v = self._flat(self.grads[k])
            if self.averaged and self.dist.active:  # ddp: the optimiser averages the rank gradients
                v = self.dist.sum_tensor(v) / self.dist.world_size
                sq = float(v.square().sum())
            else:  # one rank, or fsdp2 shards already reduced in backward
                sq = float(self.dist.sum_tensor(v.square().sum()))
            out[f"learner/grad_norm/{k}"] = sq**0.5
            if k in self.previous and self.previous[k].shape == v.shape:
                prev = self.previous[k]
                pair = torch.stack([(v * prev).sum(), prev.square().sum()])
                if not self.averaged:  # shards: sum the partial dot products
                    pair = self.dist.sum_tensor(pair)
                dot, psq = float(pair[0]), float(pair[1])
                out[f"learner/grad_cos_prev/{k}"] = dot / max((sq * psq) ** 0.5, 1e-30)
            self.previous[k] = v
        for i, p in enumerate(self.params):
            parts = [self.grads[k][i] for k in self.grads if self.grads[k][i] is not None]
            p.grad = None if not parts else sum(parts[1:], parts[0])
        self.grads = {}
        return out


def flat_local(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """This rank's part of ``params`` (its shards under fsdp2) as one detached fp64 vector."""
    return torch.cat([to_local(p).detach().reshape(-1).double() for p in params])


# ------------------------------------------------------------------------------------ the epoch update
class RLUpdate:
    """One RL epoch's learner work on one rank (module docstring).

    Args:
        state: the rank's ``RLLearnerState``.
        grpo, last_step_loss, sampling, dmd, ac_dmd, train, rewards: config slices.
        micro_batches_per_epoch: learner micro-batches per rank per epoch (``Config.micro_batches_per_rank_
            per_epoch``); the zero-advantage filter keeps a multiple of it.
        micro_batches_per_step: micro-batches accumulated per generator optimiser step.
        sigmas: the sampling schedule ``[T + 1]`` ending in 0 (the samplers' schedule).
        bp_scorer: differentiable reward ``(images [B, 3, H, W], prompts) -> R [B]`` for BP (None: BP off).
    """

    def __init__(
        self,
        *,
        state: RLLearnerState,
        grpo: GRPOConfig,
        last_step_loss: LastStepLossConfig,
        sampling: SamplingConfig,
        dmd: DMDConfig,
        ac_dmd: ACDMDConfig,
        train: TrainConfig,
        rewards: RewardsConfig,
        micro_batches_per_epoch: int,
        micro_batches_per_step: int,
        sigmas: Sequence[float],
        bp_scorer: Any = None,
    ):
        self.s, self.grpo, self.lsl, self.sampling = state, grpo, last_step_loss, sampling
        self.dmd, self.ac, self.train, self.rewards = dmd, ac_dmd, train, rewards
        self.micro_batches_per_epoch, self.micro_batches_per_step = (
            micro_batches_per_epoch,
            micro_batches_per_step,
        )
        self.sigmas = [float(x) for x in sigmas]
        self.num_steps = len(self.sigmas) - 1
        self.aux_steps = sorted({j % self.num_steps for j in last_step_loss.train_steps})
        # aux terms on every `aux_stride`-th micro-batch (last_step_loss.aux_sample_fraction), scaled by
        # `aux_scale` = micro-batches / aux micro-batches so their expected gradient is the full one's
        self.aux_stride = max(1, round(1.0 / last_step_loss.aux_sample_fraction))
        self.aux_micro_batches = len(range(0, micro_batches_per_epoch, self.aux_stride))
        self.aux_scale = micro_batches_per_epoch / self.aux_micro_batches
        self.bp_scorer = bp_scorer if last_step_loss.bp.enabled else None
        self.last_advantages: tuple[list[str], torch.Tensor] | None = None
        self.zero_variance_groups = 0.0
        self.term_grads: TermGradients | None = None

    # ---------------------------------------------------------------- helpers
    def _noise(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.s.local, dtype=torch.float32).to(self.s.device)

    def _sig(self, value: float, n: int) -> torch.Tensor:
        return torch.full((n,), value, dtype=torch.float32, device=self.s.device)

    def _renoise_sigma(self, sigma_s: float, n: int) -> torch.Tensor:
        """Rank-local renoise levels ``[n]`` (spec §3.6: not broadcast in the RL stage)."""
        a = self.ac
        return acdmd.sample_renoise_sigma(
            torch.full((n,), sigma_s, dtype=torch.float64),
            offset=a.timestep_offset,
            end_timestep=a.end_timestep,
            min_step=a.min_renoise_step,
            max_step=a.max_renoise_step,
            generator=self.s.local,
        ).to(self.s.device)

    def _guidance(self) -> float:
        """Teacher CFG scale from the rank-shared ``control`` generator (identical on every rank, no
        broadcast)."""
        lo, hi = self.dmd.teacher_guidance_min, self.dmd.teacher_guidance_max
        return lo + (hi - lo) * float(torch.rand((1,), generator=self.s.control, dtype=torch.float64).item())

    def _transition(self, x: torch.Tensor, v: torch.Tensor, j: int, prev_sample: torch.Tensor) -> CPSStep:
        """The rollout's step ``j`` recomputed at the stored next latent (the PPO log-prob)."""
        s, s_next = self.sigmas[j], self.sigmas[j + 1]
        if self.grpo.sde_type == "sde":
            return sde_step(
                x, v, s, s_next, self.sampling.eta, prev_sample=prev_sample, sigma_max=self.sigmas[1]
            )
        return cps_step(
            x, v, s, s_next, self.sampling.eta, prev_sample=prev_sample, log_prob=self.grpo.log_prob
        )

    # ---------------------------------------------------------------- 1. fake score (§3.6)
    def fake_score_update(self, batch: RolloutBatch) -> dict[str, float]:
        """One fake-score optimiser step on every local sample's boundary ``x_s`` at each aux step."""
        if self.aux_stride > 1:  # the same share of the samples as the generator's aux terms
            keep = torch.randperm(len(batch), generator=self.s.local)[: -(-len(batch) // self.aux_stride)]
            batch = batch.index(keep.sort().values)
        a, n = self.ac, len(batch)
        chunk = self.lsl.fake_score_micro_batch_images or n
        out: dict[str, float] = {"learner/fake/loss_ac": 0.0, "learner/fake/loss_consistency": 0.0}
        for j in self.aux_steps:
            sigma_s = min(max(self.sigmas[j + 1], 0.0), 1.0)
            for lo in range(0, n, chunk):
                sl = slice(lo, min(n, lo + chunk))
                x_s = batch.next_latents[sl, j].to(self.s.device)
                cond = self.s.backbone.encode_prompts(batch.prompts[sl])
                sigma_e = self._renoise_sigma(sigma_s, x_s.shape[0])
                x_e, target, scale = acdmd.renoise(
                    x_s, sigma_s, sigma_e, self._noise(x_s.shape), move_scale_out=a.move_scale_out
                )

                def fake_v(x: torch.Tensor, sigma: torch.Tensor, cond: Any = cond) -> torch.Tensor:
                    return self.s.velocity("fake_score", x, sigma, cond)

                loss, loss_ac, loss_cons = fake_score_objective(
                    fake_v, x_e, sigma_e, target, scale, a, generator=self.s.local
                )
                if loss_cons is not None:
                    out["learner/fake/loss_consistency"] += float(loss_cons.detach()) * x_s.shape[0] / n
                # chunks weighted by their share of the samples: one optimiser step per epoch
                (loss * (x_s.shape[0] / (n * len(self.aux_steps)))).backward()
                out["learner/fake/loss_ac"] += float(loss_ac.detach()) * x_s.shape[0] / n
        step = self.s.optimizers["fake_score"].step()
        out |= {"learner/fake/grad_norm": step["grad_norm"], "learner/fake/lr": step["lr"]}
        return out

    # ---------------------------------------------------------------- 2. advantages (§3.5)
    def advantages(self, batch: RolloutBatch, scores: ScoredBatch) -> torch.Tensor:
        """This rank's advantages ``[n]`` from the all-gathered epoch (groups span ranks); 0 where
        quarantined."""
        weights = dict(self.rewards.weights)
        rewards, valid, prompts = gather_rewards(scores, batch.prompts, weights, world_size=self.s.world_size)
        adv_all = compute_advantages(rewards, weights, prompts, valid=valid)
        self.zero_variance_groups = zero_variance_group_fraction(rewards, weights, prompts, valid=valid)
        n, r = len(batch), self.s.rank
        adv = adv_all[r * n : (r + 1) * n]
        self.last_advantages = (list(batch.prompts), adv.clone())
        return adv

    # ---------------------------------------------------------------- 3. generator (§3.7)
    def _aux_loss(
        self,
        x: torch.Tensor,
        v: torch.Tensor,
        j: int,
        cond: Any,
        prompts: list[str],
        stats: dict[str, float],
        weight: float,
    ) -> list[tuple[str, torch.Tensor]]:
        """``[("aux_dmd", L_base (AC-DMD)), ("bp", L_BP)]`` at aux step ``j``, the terms that apply (``v``
        carries the generator's gradient)."""
        a, lsl, b = self.ac, self.lsl, x.shape[0]
        sigma_j, sigma_s = self.sigmas[j], min(max(self.sigmas[j + 1], 0.0), 1.0)
        terms: list[tuple[str, torch.Tensor]] = []
        if lsl.loss_type == "ac_dmd" and lsl.weight > 0:
            # the generator's boundary sample (x0-prediction at the last step), with grad
            x_s = cps_step(x, v, sigma_j, sigma_s, self.sampling.eta, noise=self._noise(x.shape)).sample
            sigma_e = self._renoise_sigma(sigma_s, b)
            guidance = self._guidance()
            xi, zeta = self._noise(x.shape), self._noise(x.shape)  # zeta: one noise for both projections
            uncond = self.s.backbone.empty_conditioning(b) if guidance > 1 else None
            d = acdmd.generator_dmd_loss(
                x_s,
                predict_x0(x, v.detach(), sigma_j),
                sigma_s,
                sigma_e,
                xi,
                zeta,
                lambda x_e: self.s.velocity(None, x_e, sigma_e, cond, guidance=guidance, uncond=uncond),
                lambda x_e: self.s.velocity("fake_score", x_e, sigma_e, cond),
                eta=a.transition_eta,
                move_scale_out=a.move_scale_out,
                normalize=self.dmd.gradient_normalization,
                normalization=self.dmd.normalization,
            )
            terms.append(("aux_dmd", lsl.weight * d.loss))
            stats["learner/aux/dmd_loss"] += float(d.loss.detach()) * weight
            stats["learner/aux/dmd_grad_norm"] += float(d.grad_norm) * weight
        bp = lsl.bp
        if self.bp_scorer is not None and (self.sigmas[j + 1] == 0.0 or not bp.only_deterministic):
            x0 = predict_x0(x, v, sigma_j)
            chunk = bp.micro_batch_images or b
            rewards = []
            for lo in range(0, b, chunk):
                images = self.s.backbone.decode(x0[lo : lo + chunk])  # VAE decode with gradient
                rewards.append(self.bp_scorer(images, prompts[lo : lo + chunk]))
            reward = torch.cat(rewards).float()
            terms.append(("bp", hinge_reward_loss(reward, bp.margin, bp.grad_scale)))
            stats["learner/bp/reward"] += float(reward.detach().mean()) * weight
            stats["learner/bp/hinge_active_frac"] += (
                float((reward.detach() < bp.margin).float().mean()) * weight
            )
        return terms

    def _update_size(self, before: torch.Tensor, opt: Any) -> dict[str, float]:
        """``learner/generator/update_norm`` (``|dtheta|`` of the trainable LoRA this epoch) and
        ``update_rel`` (``|dtheta| / |theta|`` before the update)."""
        after = flat_local(opt.params)
        sq = torch.stack([(after - before).square().sum(), before.square().sum()])
        if not opt.average_grads and self.s.dist.active:  # fsdp2: each rank holds a shard
            self.s.dist.sum_tensor(sq)
        d, w = float(sq[0]) ** 0.5, float(sq[1]) ** 0.5
        return {"learner/generator/update_norm": d, "learner/generator/update_rel": d / max(w, 1e-30)}

    def generator_update(self, batch: RolloutBatch, adv: torch.Tensor, epoch: int) -> dict[str, float]:
        """PPO on ``P`` + aux on ``A``, ``micro_batches_per_step`` micro-batches per optimiser step."""
        s, g, nb = self.s, self.grpo, self.micro_batches_per_epoch
        keep = zero_advantage_filter(adv, nb, epoch, s.rank)
        kept = torch.nonzero(keep).flatten()
        ppo_steps = [j for j in batch.selected_steps if self.sigmas[j + 1] > 0]
        all_steps = sorted(set(ppo_steps) | set(self.aux_steps))
        accum = self.micro_batches_per_step * len(all_steps)  # E: backward calls per optimiser step
        stats = {
            k: 0.0
            for k in (
                "learner/ppo/loss",
                "learner/ppo/ratio_mean",
                "learner/ppo/clip_frac",
                "learner/ppo/approx_kl",
                "learner/aux/dmd_loss",
                "learner/aux/dmd_grad_norm",
                "learner/bp/reward",
                "learner/bp/hinge_active_frac",
            )
        }
        ratio_dev, steps_out, ema_updates = 0.0, [], 0
        opt = s.optimizers["generator"]
        if self.term_grads is None:  # kept across epochs: it remembers the last step's gradients
            self.term_grads = TermGradients(opt.params, s.dist, averaged=opt.average_grads)
        tracker = self.term_grads
        term_stats: list[dict[str, float]] = []
        before = flat_local(opt.params)
        n_ppo = max(1, g.inner_epochs * nb * len(ppo_steps))
        n_aux = max(1, g.inner_epochs * self.aux_micro_batches * len(self.aux_steps))
        s.transformer.train()
        for _ in range(g.inner_epochs):
            perm = kept[torch.randperm(len(kept), generator=s.local)]
            for m, idx in enumerate(perm.chunk(nb)):
                mb = batch.index(idx)
                cond = s.backbone.encode_prompts(mb.prompts)
                a_mb = adv[idx].to(s.device)
                aux_here = m % self.aux_stride == 0
                for j in all_steps:
                    if j not in ppo_steps and not aux_here:
                        continue
                    x_j = mb.latents[:, j].to(s.device)
                    v = s.velocity("generator", x_j, self._sig(self.sigmas[j], len(mb)), cond)
                    terms: list[tuple[str, torch.Tensor]] = []
                    if j in ppo_steps:
                        step = self._transition(x_j, v, j, mb.next_latents[:, j].to(s.device))
                        l_pol, st = ppo_loss(
                            step.log_prob,
                            mb.log_probs[:, j].to(s.device),
                            a_mb,
                            g.clip_range_low,
                            g.clip_range_high,
                            g.adv_clip_max,
                        )
                        terms.append(("subgrpo", l_pol))
                        stats["learner/ppo/loss"] += float(l_pol.detach()) / n_ppo
                        for k in ("ratio_mean", "clip_frac", "approx_kl"):
                            stats[f"learner/ppo/{k}"] += float(st[k]) / n_ppo
                        ratio_dev = max(ratio_dev, float(st["ratio_max"]) - 1.0, 1.0 - float(st["ratio_min"]))
                    if j in self.aux_steps and aux_here:
                        aux = self._aux_loss(x_j, v, j, cond, mb.prompts, stats, 1.0 / n_aux)
                        scale = self.aux_scale
                        terms += [(k, loss * scale) for k, loss in aux] if self.aux_stride > 1 else aux
                    tracker.backward(terms, 1.0 / accum)
                if (m + 1) % self.micro_batches_per_step == 0:  # a sync point: one optimiser step
                    term_stats.append(tracker.merge())
                    steps_out.append(s.optimizers["generator"].step())
                    if self.train.ema.update == "per_optimizer_step":
                        ema_updates += s.ema_update(s.optimizers["generator"].steps, self.train.ema)
                if self.train.ema.update == "reference":  # after every micro-batch (§7.1.1)
                    ema_updates += s.ema_update(s.optimizers["generator"].steps + 1, self.train.ema)
        s.transformer.eval()
        stats |= self._update_size(before, opt) | {
            k: sum(t[k] for t in term_stats if k in t) / max(1, sum(k in t for t in term_stats))
            for k in sorted({k for t in term_stats for k in t})
        }
        stats |= {
            "learner/ppo/ratio_max_dev": ratio_dev,
            "learner/filter/kept_frac": len(kept) / max(1, len(adv)),
            "learner/generator/grad_norm": sum(x["grad_norm"] for x in steps_out) / max(1, len(steps_out)),
            "learner/generator/lr": steps_out[-1]["lr"] if steps_out else 0.0,
            "learner/generator/optimizer_steps": float(len(steps_out)),
            "learner/generator/ema_updates": float(ema_updates),
        }
        return stats

    # ---------------------------------------------------------------- one epoch
    def run_epoch(
        self, batch: RolloutBatch, scores: ScoredBatch, epoch: int, *, max_policy_lag: int
    ) -> dict[str, float]:
        """Epoch ``epoch`` on this rank's shard; returns rank-averaged metrics (``ratio_max_dev``: the
        max)."""
        s = self.s
        if epoch != s.iteration:
            raise RuntimeError(
                f"learner rank {s.rank} has finished {s.iteration} epochs but was asked to train "
                f"epoch {epoch}"
            )
        if len(scores) != len(batch):
            raise ValueError(f"{len(batch)} rollout samples but {len(scores)} scores on rank {s.rank}")
        if batch.sigmas.tolist() != [float(torch.tensor(x, dtype=torch.float32)) for x in self.sigmas]:
            raise ValueError(
                f"rollouts used sigmas {batch.sigmas.tolist()}, the learner {self.sigmas}: samplers "
                "and learner must share model.* and sampling.*"
            )
        lag = s.iteration - batch.policy_version
        if not 0 <= lag <= max_policy_lag:
            raise RuntimeError(
                f"rollouts of policy version {batch.policy_version} reached a learner at version "
                f"{s.iteration}: lag {lag} exceeds grpo.max_policy_lag={max_policy_lag}"
            )
        sw = Stopwatch()
        m: dict[str, float] = {}
        if self.lsl.loss_type == "ac_dmd" and self.lsl.weight > 0 and self.aux_steps:
            with sw("timing/learner_fake_s"):  # the fake score only serves the AC-DMD term
                m = self.fake_score_update(batch)
        with sw("timing/learner_advantage_s"):
            adv = self.advantages(batch, scores)
        with sw("timing/learner_generator_s"):
            m |= self.generator_update(batch, adv, epoch)
        m |= {
            "learner/advantage/zero_variance_groups": self.zero_variance_groups,
            "learner/advantage/abs_mean": float(adv.abs().mean()),
            "learner/advantage/std": float(adv.std()),
            "rollout/policy_lag": float(lag),
        }
        s.iteration = epoch + 1
        worst = torch.tensor([m.pop("learner/ppo/ratio_max_dev")], dtype=torch.float64)
        if s.dist.active:
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        m = s.dist.mean_scalars(m) | sw.seconds
        m["learner/ppo/ratio_max_dev"] = float(worst)
        m["learner/generator_updates"] = float(s.optimizers["generator"].steps)
        return m


def bp_scorer_fn(last_step_loss: LastStepLossConfig, rewards: RewardsConfig, device: str) -> Any:
    """The differentiable reward ``R = sum_k w_k r_k(images)`` of ``last_step_loss.bp.reward_weights``."""
    bp = last_step_loss.bp
    if not bp.enabled:
        return None
    from rtdmd_ray.rewards.multi import MultiScorer, resolve_scorer_options

    ms = MultiScorer(
        dict(bp.reward_weights),
        ckpt_dir=rewards.ckpt_dir or None,
        device=device,
        options=resolve_scorer_options(rewards.options, bp.reward_weights),
    )
    for scorer in ms.scorers.values():  # reward models are frozen
        for mod in vars(scorer).values():
            if isinstance(mod, torch.nn.Module):
                mod.requires_grad_(False)
    return ms.score_differentiable


def learner_sigmas(state: LearnerState, model: ModelConfig, sampling: SamplingConfig) -> list[float]:
    steps = tuple(sampling.denoising_step_list[: sampling.num_steps])
    return list(state.backbone.sigma_schedule(steps, model.resolution_px))

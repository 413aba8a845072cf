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

The RL adapter stack (``RLLearnerState``): the reference merges the cold-start LoRA into the base and trains a
fresh LoRA on top (§3.1). Here the teacher is the base itself (one copy of the weights per rank), so merging
is not an option; instead the cold-start LoRA is loaded into a *frozen* adapter ``<role>_init`` and the fresh
trainable adapter ``<role>`` sits beside it; their deltas add, ``W + dW_init + dW_rl``, which is the merged
model up to the merge's rounding. Only ``<role>`` is trained, checkpointed and synced to samplers.

``RLLearner`` (the learner role's RL verbs) and ``RLLearnerGroup`` sit at the end of this file; the group is
the only part that imports Ray.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from rtdmd_ray.algorithms import acdmd
from rtdmd_ray.algorithms.bp import hinge_reward_loss
from rtdmd_ray.algorithms.cps import CPSStep, cps_step, predict_x0, sde_step
from rtdmd_ray.algorithms.ema import EMA
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
    LoRAConfig,
    ModelConfig,
    RewardsConfig,
    SamplingConfig,
    SolversConfig,
    TrainConfig,
    resolve_path,
)
from rtdmd_ray.learner import Learner, RankCalls, _has_gpu
from rtdmd_ray.learner_state import ROLES, DistContext, LearnerState, Stopwatch, to_local
from rtdmd_ray.models.lora import (
    add_lora,
    load_lora_file,
    load_lora_state,
    lora_parameters,
    reinit_adapter,
    use_adapters_now,
)
from rtdmd_ray.types import RolloutBatch, ScoredBatch

INIT_SUFFIX = "_init"


# ------------------------------------------------------------------------------------ adapter stacks (§3.1)
def init_adapter_name(role: str) -> str:
    return f"{role}{INIT_SUFFIX}"


def stacks_init_adapter(lora: LoRAConfig) -> bool:
    """True when ``lora`` asks for the reference's "merge the loaded LoRA, train a fresh one" start."""
    return lora.merge_before_training and bool(lora.load_path)


def add_frozen_init_adapter(
    transformer: torch.nn.Module, role: str, lora: LoRAConfig, *, default_targets: Sequence[str]
) -> str:
    """Load ``lora.load_path`` (the cold-start LoRA) into a frozen adapter ``<role>_init``; returns its name.

    The adapter takes the file's own rank/alpha/targets (falling back to ``lora``'s), so a cold-start LoRA of
    another rank than the RL LoRA stacks correctly.
    """
    path = resolve_path(lora.load_path)
    if not path.exists():
        raise FileNotFoundError(
            f"model.*_lora.load_path {path} does not exist: run the cold start first "
            "(rtdmd-ray cold-start ...) or point load_path at its checkpoint's LoRA"
        )
    lf = load_lora_file(path, rank=lora.rank, alpha=lora.alpha)
    name = init_adapter_name(role)
    add_lora(
        transformer,
        name,
        targets=lf.target_modules or list(default_targets),
        rank=lf.rank,
        alpha=lf.alpha,
        init="gaussian",
        seed=0,
    )
    load_lora_state(transformer, name, lf.tensors, strict=lora.load_strict)
    for p in lora_parameters(transformer, name):
        p.requires_grad_(False)
    return name


def build_sampler_generator(
    transformer: torch.nn.Module, model: ModelConfig, *, seed: int
) -> tuple[str, ...]:
    """Give a sampler's transformer the generator's adapter stack (as ``RLLearnerState`` builds it) and
    activate it; returns the active adapter names. The trainable adapter's values arrive by weight sync
    (version 0 at start), so only its shape has to match the learner's."""
    lora = model.generator_lora
    if not lora.enabled:
        raise ValueError("model.generator_lora.enabled is false: the RL stage trains a generator LoRA")
    targets = model.lora_targets("generator")
    stack: tuple[str, ...] = ("generator",)
    if stacks_init_adapter(lora):
        stack = (
            add_frozen_init_adapter(transformer, "generator", lora, default_targets=targets),
            "generator",
        )
    add_lora(
        transformer,
        "generator",
        targets=targets,
        rank=lora.rank,
        alpha=lora.alpha,
        init=lora.init,
        seed=seed + 1,
    )
    for p in lora_parameters(transformer, "generator"):
        p.requires_grad_(False)  # samplers never train
    use_adapters_now(transformer, list(stack))
    return stack


class RLLearnerState(LearnerState):
    """``LearnerState`` with the RL adapter stacks: ``velocity("generator")`` runs ``generator_init +
    generator`` (and likewise for the fake score) when ``merge_before_training`` loads a cold-start LoRA.

    The fresh trainable adapters are re-initialised with ``lora.reinit_a_std`` (B = 0, so the RL start equals
    the cold-start model exactly) from a seed shared by all ranks, and the EMA starts from them.
    """

    def __init__(
        self,
        *,
        model: ModelConfig,
        solver: SolversConfig,
        train: TrainConfig,
        parallelism: str,
        rank: int = 0,
        world_size: int = 1,
        device: str = "cpu",
    ):
        stacked = {role: stacks_init_adapter(getattr(model, f"{role}_lora")) for role in ROLES}
        fresh = {role: getattr(model, f"{role}_lora").merge_before_training for role in ROLES}
        if any(stacked.values()) and parallelism != "ddp":
            raise ValueError(
                "the RL stage stacks the cold-start LoRA as a frozen adapter, which is added after "
                "the learner state is built; that works with resources.learner_parallelism: ddp "
                "only (fsdp2 would need the adapter injected before fully_shard)"
            )
        plain = {
            f"{role}_lora": dataclasses.replace(
                getattr(model, f"{role}_lora"),
                merge_before_training=False,
                load_path="" if stacked[role] else getattr(model, f"{role}_lora").load_path,
            )
            for role in ROLES
        }
        super().__init__(
            model=dataclasses.replace(model, **plain),
            solver=solver,
            train=train,
            parallelism=parallelism,
            rank=rank,
            world_size=world_size,
            device=device,
        )
        self.stacks: dict[str, tuple[str, ...]] = {role: (role,) for role in ROLES}
        t = self.transformer
        for i, role in enumerate(ROLES):
            lora: LoRAConfig = getattr(model, f"{role}_lora")
            if stacked[role]:
                name = add_frozen_init_adapter(t, role, lora, default_targets=model.lora_targets(role))
                self.stacks[role] = (name, role)
            if fresh[role]:
                g = torch.Generator().manual_seed(train.seed + 101 + i)  # identical on every rank
                reinit_adapter(t, role, a_std=lora.reinit_a_std, generator=g)
        if any(fresh.values()) and self.ema is not None:
            self.ema = EMA(self.ema_named_params())
        # torch's global CPU generator starts from a per-process random seed; training draws from `control`
        # and `local`, but a library may draw from the global one, and the checkpoint records it: seed it per
        # rank so a resumed job's global stream (and its checkpoint) equals the uninterrupted job's
        torch.manual_seed(train.seed * 1_000_003 + 104_729 * (rank + 1))
        # the generator LoRA before the last update (policy v(e-1)), kept when grpo.max_policy_lag > 0: a
        # pipelined run sampled epoch e with it, so a resumed run must too to be bit-exact
        self.previous_generator: dict[str, torch.Tensor] | None = None

    def aux_state(self) -> dict[str, Any]:
        aux = super().aux_state()
        if self.previous_generator is not None:
            aux["previous_generator"] = self.previous_generator
        return aux

    def load_state(self, tensors: dict[str, torch.Tensor], aux: dict[str, Any]) -> None:
        super().load_state(tensors, aux)
        self.previous_generator = aux.get("previous_generator")

    def velocity(
        self,
        adapters: Any,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Any,
        guidance: float = 1.0,
        uncond: Any = None,
    ) -> torch.Tensor:
        """As ``LearnerState.velocity``; a role name runs the role's whole adapter stack."""
        if isinstance(adapters, str):
            adapters = list(self.stacks.get(adapters, (adapters,)))
        return super().velocity(adapters, x, sigma, cond, guidance=guidance, uncond=uncond)


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

                v = fake_v(x_e, sigma_e)
                loss_ac = acdmd.fake_score_loss(
                    v,
                    target,
                    scale,
                    a.fake_loss_weight_min,
                    a.fake_loss_weight_max,
                    move_scale_out=a.move_scale_out,
                )
                loss = loss_ac
                if a.consistency_weight > 0:
                    loss_cons = acdmd.consistency_loss(
                        fake_v,
                        x_e,
                        sigma_e,
                        v,
                        eta=a.transition_eta,
                        epsilon_timestep=a.consistency_max_jump_timesteps,
                        num_steps=a.consistency_num_steps,
                        two_sample=a.consistency_two_sample,
                        stopgrad_transitions=a.consistency_stopgrad_transitions,
                        generator=self.s.local,
                    )
                    loss = loss + a.consistency_weight * loss_cons
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
        after = torch.cat([to_local(p).detach().reshape(-1).double() for p in opt.params])
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
        before = torch.cat([to_local(p).detach().reshape(-1).double() for p in opt.params])
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


# ------------------------------------------------------------------------------------ the learner role's RL
# verbs
def bp_scorer_fn(last_step_loss: LastStepLossConfig, rewards: RewardsConfig, device: str) -> Any:
    """The differentiable reward ``R = sum_k w_k r_k(images)`` of ``last_step_loss.bp.reward_weights``."""
    bp = last_step_loss.bp
    if not bp.enabled:
        return None
    from rtdmd_ray.reward import resolve_scorer_options
    from rtdmd_ray.rewards.multi import MultiScorer

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


class RLLearner(Learner):
    """One learner rank of the RL stage: ``Learner`` plus the RL verbs (``update``, weight sync, inspection).

    Args (beyond ``Learner``'s): grpo, last_step_loss: config slices; micro_batches_per_epoch,
    micro_batches_per_step: the derived accumulation counts (``Config`` properties).
    """

    def __init__(
        self,
        *,
        grpo: GRPOConfig,
        last_step_loss: LastStepLossConfig,
        micro_batches_per_epoch: int,
        micro_batches_per_step: int,
        **learner_kwargs: Any,
    ):
        super().__init__(**learner_kwargs)
        self.grpo, self.lsl = grpo, last_step_loss
        self.micro_batches_per_epoch, self.micro_batches_per_step = (
            micro_batches_per_epoch,
            micro_batches_per_step,
        )
        self.rl: RLUpdate | None = None
        self.sender: Any = None
        self._crash = False

    stage = "rtdmd"  # checkpoints: Learner.save_checkpoint / load_checkpoint with RL meta

    def checkpoint_meta(self) -> dict[str, Any]:
        epoch = self.state.iteration  # epochs done = generator updates = the policy version
        return {
            "epoch": epoch,
            "policy_version": epoch,
            "prompts_consumed": epoch * self.grpo.prompts_per_epoch,
            "adapter_stacks": {role: list(stack) for role, stack in self.state.stacks.items()},
        }

    def setup(self) -> dict[str, Any]:
        device = "cuda" if _has_gpu() else "cpu"
        self.state = RLLearnerState(
            model=self.model,
            solver=self.solver,
            train=self.train,
            parallelism=self.parallelism,
            rank=self.rank,
            world_size=self.world_size,
            device=device,
        )
        sigmas = learner_sigmas(self.state, self.model, self.sampling)
        self.rl = RLUpdate(
            state=self.state,
            grpo=self.grpo,
            last_step_loss=self.lsl,
            sampling=self.sampling,
            dmd=self.dmd,
            ac_dmd=self.ac_dmd,
            train=self.train,
            rewards=self.rewards,
            micro_batches_per_epoch=self.micro_batches_per_epoch,
            micro_batches_per_step=self.micro_batches_per_step,
            sigmas=sigmas,
            bp_scorer=bp_scorer_fn(self.lsl, self.rewards, device),
        )
        return {
            "device": device,
            "sigmas": sigmas,
            "stacks": dict(self.state.stacks),
            "trainable_params": {
                r: sum(p.numel() for p in o.params) for r, o in self.state.optimizers.items()
            },
        }

    def update(
        self, epoch: int, spans: list[tuple[int, int]], scores: ScoredBatch, *batches: RolloutBatch
    ) -> dict[str, float]:
        """Train epoch ``epoch`` on this rank's shard: rows ``spans[i]`` of ``batches[i]`` (Ray resolves the
        batch refs passed as arguments), scored by ``scores`` in the same order."""
        if self._crash:  # test hook: die mid-epoch, as a crashed rank would (the other ranks block in gloo)
            import os

            os._exit(1)
        t0 = time.perf_counter()
        shard = RolloutBatch.cat([b.index(slice(lo, hi)) for b, (lo, hi) in zip(batches, spans, strict=True)])
        t_fetch = time.perf_counter() - t0
        if self.grpo.max_policy_lag:  # collective under fsdp2: every rank takes the snapshot
            self.state.previous_generator = self.state.full_lora("generator")
        m = self.rl.run_epoch(shard, scores, epoch, max_policy_lag=self.grpo.max_policy_lag)
        m["timing/learner_fetch_s"] = t_fetch
        m["timing/learner_update_s"] = time.perf_counter() - t0
        return m

    # ---------------------------------------------------------- weight sync (rank 0 sends)
    def open_weight_sync(
        self, transport: str, num_receivers: int, bucket_mib: float, timeout_s: float
    ) -> Any:
        from rtdmd_ray.weight_sync import WeightSender

        if self.rank != 0:
            return None
        if self.sender is None or self.sender.transport != transport:
            self.sender = WeightSender(transport=transport, bucket_mib=bucket_mib, timeout_s=timeout_s)
        return self.sender.open(num_receivers)

    def send_weights(self, version: int, previous: bool = False) -> Any:
        """Every rank gathers the generator LoRA (a collective under fsdp2); rank 0 posts it as
        ``version``. ``previous``: the LoRA before the last update instead (a pipelined run's resume)."""
        if previous:
            tensors = self.state.previous_generator
            if tensors is None:
                raise RuntimeError("no previous generator LoRA: the checkpoint was not written with "
                                   "grpo.max_policy_lag > 0")
        else:
            tensors = self.state.full_lora("generator")
        if self.rank != 0:
            return None
        return self.sender.send(tensors, version)

    def finish_send(self) -> None:
        if self.sender is not None:
            self.sender.wait()

    def last_advantages(self) -> tuple[list[str], torch.Tensor] | None:
        return self.rl.last_advantages

    def policy_version(self) -> int:
        return self.state.iteration

    def crash_on_next_update(self) -> None:
        """Test hook (learner-failure tests): the next ``update`` kills this rank's process, as a crash
        would; the job must end with ``LearnerFailure`` (a rank cannot rejoin its process group)."""
        self._crash = True


class RLLearnerGroup(RankCalls):
    """The RL learner ranks (``groups.create_learner_group`` applies ``resources.learner``); one call per
    phase.

    Args:
        cfg: the whole config: this is the one place that maps its sections onto the rank actors.
    """

    def __init__(self, cfg: Any, *, timeout_s: float = 3600.0):
        self.start_ranks(cfg, RLLearner, timeout_s=timeout_s, extra_kwargs={
            "grpo": cfg.grpo,
            "last_step_loss": cfg.last_step_loss,
            "micro_batches_per_epoch": cfg.micro_batches_per_rank_per_epoch,
            "micro_batches_per_step": cfg.micro_batches_per_optimizer_step,
        })

    def update(self, epoch: int, jobs: Sequence[Any], scores: ScoredBatch) -> dict[str, float]:
        """Train epoch ``epoch``: the concatenation of ``jobs``' rollouts (in order) is split into equal
        contiguous rank shards; each rank receives only the rollout refs its shard touches. Returns rank 0's
        metrics."""
        total = sum(j.num_images for j in jobs)
        if total % self.world_size:
            raise ValueError(f"{total} samples do not split over {self.world_size} learner ranks")
        n = total // self.world_size
        starts = [0]
        for j in jobs:
            starts.append(starts[-1] + j.num_images)

        def call(rank: int, actor: Any) -> Any:
            lo, hi = rank * n, (rank + 1) * n
            picked = [
                (i, max(lo, starts[i]) - starts[i], min(hi, starts[i + 1]) - starts[i])
                for i in range(len(jobs))
                if starts[i] < hi and starts[i + 1] > lo
            ]
            spans = [(a, b) for _, a, b in picked]
            refs = [jobs[i].rollout_ref for i, _, _ in picked]
            return actor.update.remote(epoch, spans, scores.index(slice(lo, hi)), *refs)

        self.progress = f"epoch {epoch}"
        return self.map_ranked(call, what=f"learner update {epoch}")[0]

    def save_checkpoint(self, output_dir: str, keep_last: int) -> str:
        """Every rank writes its part; returns the checkpoint directory (``checkpoint.py`` layout)."""
        return self.call("save_checkpoint", output_dir, keep_last)[0]

    def load_checkpoint(self, path: str) -> int:
        """Restore every rank from ``path``; returns the epoch to continue from."""
        epochs = self.call("load_checkpoint", path)
        if len(set(epochs)) != 1:
            raise RuntimeError(f"learner ranks resumed at different epochs {epochs} from {path}")
        self.progress = f"epoch {epochs[0]}"
        return epochs[0]

    def evaluate(self, image_path: str | None = None) -> dict[str, float]:
        """Eval metrics of the (EMA) generator stack, identical on every rank (``eval_hooks.EvalHook``)."""
        return self.call("evaluate", image_path)[0]

    def call(self, method: str, *args: Any) -> list[Any]:
        """Every rank's result of ``method(*args)`` (inspection: ``lora``, ``last_advantages``, ...)."""
        return self.map(lambda a: getattr(a, method).remote(*args), what=method)

    def shutdown(self, grace_s: float = 0.0) -> None:
        self.group.shutdown(grace_s)

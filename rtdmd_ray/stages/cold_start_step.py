"""Stage 1, AC-DMD cold start: one training iteration on one learner rank (spec algorithms.md §1.5, §2).

Ray-free and distributed-aware: it runs on a ``LearnerState`` (``learner_state.py``), whose ``control``
generator is identical on every rank, so the random stop ``k``, the teacher CFG scale, the renoise times and
the consistency jumps agree across ranks without broadcasts, and every rank runs the same collectives. Global
per-sample draws (renoise times, jumps, prompt order) are made for the whole ``prompts_per_step`` batch and
sliced by rank, so every sample of the global batch gets its own time.

One iteration (``ColdStartIteration.run``):

1. Prompts: the rank's slice of the global batch ``prompts_for(iteration)`` (a pure function of the seed and
   the iteration: the data position is the iteration count).
2. Fake-score update (every iteration): a no-grad backward simulation with a random stop ``k``, the
   sub-interval renoise ``x_s -> x_e``, loss ``L_ac + gamma * L_cons``, one AdamW step.
3. Generator update (when ``(iteration + 1) % dmd.fake_update_ratio == 0``, TTUR): a backward simulation
   with gradient only through the last executed step, the teacher (CFG) and fake projections back to
   ``sigma_s`` with shared transition noise, the normalised DMD loss, one AdamW step, then the EMA update
   (once per generator step; ``train.ema.update: reference`` pulls every iteration instead).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from rtdmd_ray.algorithms import acdmd
from rtdmd_ray.algorithms.cps import cps_step
from rtdmd_ray.config import ACDMDConfig, DMDConfig, SamplingConfig, TrainConfig
from rtdmd_ray.data.prompts import PromptStream
from rtdmd_ray.stages.learner_state import LearnerState, Stopwatch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------- sampling
class LastStep(NamedTuple):
    """The executed last step of a backward simulation (spec §1.5 step 5).

    Attributes:
        x_t: input of step ``k - 1`` ``[B, C, H, W]`` (no grad).
        x_next: CPS output at ``sigma_k`` ``[B, C, H, W]`` (grad through ``v`` when requested); the AC-DMD
            boundary sample ``x_s``.
        v: velocity of the last step ``[B, C, H, W]``.
        x0: ``x_t - sigma_{k-1} v``, the last step's clean prediction.
        sigma_t: ``sigma_{k-1}``; sigma_next: ``sigma_k`` (0 when ``k = n``).
        k: executed steps.
    """

    x_t: torch.Tensor
    x_next: torch.Tensor
    v: torch.Tensor
    x0: torch.Tensor
    sigma_t: float
    sigma_next: float
    k: int


def backward_simulation(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: list[float],
    k: int,
    eta: float,
    *,
    grad_last: bool,
    generator: torch.Generator | None,
) -> LastStep:
    """Run the generator's CPS sampler from ``noise`` (at ``sigma_0 = 1``) for ``k`` steps.

    Only step ``k - 1`` is built with autograd (when ``grad_last``); earlier steps run under no-grad, so the
    gradient reaches the generator through the last executed step only (``gradient_truncation``).

    Args:
        velocity_fn: ``(x [B, C, H, W], sigma [B]) -> v`` of the generator.
        noise: ``[B, C, H, W]`` initial latents.
        sigmas: the schedule ``[sigma_0, ..., sigma_{n-1}, 0.0]``.
        k: steps to execute, ``1 <= k <= n``.
        eta: CPS noise level; the fresh CPS noise comes from ``generator``.
    """
    n = len(sigmas) - 1
    if not 1 <= k <= n:
        raise ValueError(f"backward simulation stop k={k} must be in [1, {n}]")
    x = noise
    batch = noise.shape[0]
    for i in range(k):
        last = i == k - 1
        with torch.set_grad_enabled(grad_last and last):
            sigma = torch.full((batch,), sigmas[i], dtype=torch.float32, device=x.device)
            v = velocity_fn(x, sigma)
            step = cps_step(x, v, sigmas[i], sigmas[i + 1], eta, generator=generator)
            if last:
                x0 = x.float() - sigmas[i] * v.float()
                return LastStep(x, step.sample, v, x0, sigmas[i], sigmas[i + 1], k)
        x = step.sample.detach()
    raise AssertionError("unreachable")


def fake_score_objective(
    fake_v: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_e: torch.Tensor,
    sigma_e: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor,
    a: ACDMDConfig,
    *,
    generator: torch.Generator,
    draw_jumps: Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Spec §2.5, the fake-score loss ``L_ac + gamma * L_cons`` at the renoised ``(x_e, sigma_e)`` (the RL
    stage's aux update reuses it); returns ``(loss, L_ac, L_cons or None when gamma = a.consistency_weight is
    0)``. ``draw_jumps`` draws the consistency jump steps, only when the term is on (None: drawn inside)."""
    v = fake_v(x_e, sigma_e)
    loss_ac = acdmd.fake_score_loss(
        v, target, scale, a.fake_loss_weight_min, a.fake_loss_weight_max, move_scale_out=a.move_scale_out
    )
    if not a.consistency_weight > 0:
        return loss_ac, loss_ac, None
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
        jump_steps=draw_jumps() if draw_jumps is not None else None,
        generator=generator,
    )
    return loss_ac + a.consistency_weight * loss_cons, loss_ac, loss_cons


# --------------------------------------------------------------------------------------------- iteration
class ColdStartIteration:
    """The AC-DMD iteration on one rank; holds the configs and the (cached) unconditional embedding.

    Args:
        state: the rank's ``LearnerState``.
        sampling, dmd, ac_dmd, train: config slices (train for the EMA settings).
        prompts: the training prompt stream shared by all ranks.
        resolution_px: image side of the training samples.
    """

    def __init__(
        self,
        *,
        state: LearnerState,
        sampling: SamplingConfig,
        dmd: DMDConfig,
        ac_dmd: ACDMDConfig,
        train: TrainConfig,
        prompts: PromptStream,
        resolution_px: int,
    ):
        self.s, self.sampling, self.dmd, self.ac, self.train = state, sampling, dmd, ac_dmd, train
        self.prompts, self.resolution_px = prompts, resolution_px
        steps = tuple(sampling.denoising_step_list[: sampling.num_steps])
        self.sigmas = list(state.backbone.sigma_schedule(steps, resolution_px))
        self.prompts_per_rank = dmd.prompts_per_step // state.world_size
        self.counts = {"fake_updates": 0, "generator_updates": 0}

    # ---------------------------------------------------------------- shared draws (control generator)
    def _draw_stop(self) -> int:
        n = len(self.sigmas) - 1
        if not self.dmd.random_stop:
            return n
        return int(torch.randint(1, n + 1, (1,), generator=self.s.control).item())

    def _draw_guidance(self) -> float:
        lo, hi = self.dmd.teacher_guidance_min, self.dmd.teacher_guidance_max
        u = float(torch.rand((1,), generator=self.s.control, dtype=torch.float64).item())
        return lo + (hi - lo) * u

    def _rank_slice(self, t: torch.Tensor) -> torch.Tensor:
        b = self.prompts_per_rank
        return t[..., self.s.rank * b : (self.s.rank + 1) * b]

    def _draw_renoise(self, sigma_s: float) -> torch.Tensor:
        """``sigma_e [B]`` for this rank: the global batch's times, drawn on the shared generator, sliced."""
        a = self.ac
        end = (
            1000.0
            if (not self.dmd.random_stop and a.include_terminal_without_random_stop)
            else a.end_timestep
        )
        total = self.dmd.prompts_per_step
        sig = acdmd.sample_renoise_sigma(
            torch.full((total,), sigma_s, dtype=torch.float64),
            offset=a.timestep_offset,
            end_timestep=end,
            min_step=a.min_renoise_step,
            max_step=a.max_renoise_step,
            generator=self.s.control,
            clamp_mode=a.renoise_clamp,
        )
        return self._rank_slice(sig).to(self.s.device)

    def _draw_jumps(self) -> torch.Tensor:
        a = self.ac
        jumps = acdmd.draw_jump_steps(
            self.dmd.prompts_per_step,
            a.consistency_num_steps,
            a.consistency_max_jump_timesteps,
            generator=self.s.control,
        )
        return self._rank_slice(jumps)

    def _noise(self, like_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(like_shape, generator=self.s.local, dtype=torch.float32).to(self.s.device)

    # ---------------------------------------------------------------- pieces
    def _boundary(self, last: LastStep) -> tuple[torch.Tensor, float]:
        """The sub-interval start ``(x_s, sigma_s)`` (spec §2.3 step 1)."""
        if self.ac.start_mode == "next_sigma":
            return last.x_next, min(max(last.sigma_next, 0.0), 1.0)
        sigma_s = min(last.sigma_t, self.sigmas[self.ac.boundary_sigma_index])
        x_s = cps_step(
            last.x_t,
            last.v,
            last.sigma_t,
            sigma_s,
            self.sampling.eta,
            noise=self._noise(tuple(last.x_t.shape)),
        ).sample
        return x_s, min(max(sigma_s, 0.0), 1.0)

    def _simulate(self, cond: Any, *, grad_last: bool) -> LastStep:
        k = self._draw_stop()
        shape = (self.prompts_per_rank, *self.s.backbone.latent_shape(self.resolution_px))

        def gen_v(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return self.s.velocity("generator", x, sigma, cond)

        return backward_simulation(
            gen_v,
            self._noise(shape),
            self.sigmas,
            k,
            self.sampling.eta,
            grad_last=grad_last,
            generator=self.s.local,
        )

    def fake_score_update(self, cond: Any) -> dict[str, float]:
        """Spec §2.4-2.5: one fake-score optimiser step on a fresh no-grad rollout."""
        a = self.ac
        with torch.no_grad():
            last = self._simulate(cond, grad_last=False)
            x_s, sigma_s = self._boundary(last)
        sigma_e = self._draw_renoise(sigma_s)
        xi = self._noise(tuple(x_s.shape))
        x_e, target, scale = acdmd.renoise(
            x_s.detach(), sigma_s, sigma_e, xi, move_scale_out=a.move_scale_out
        )
        if a.fake_target == "x0":
            target = acdmd.x0_target(x_e, last.x0, sigma_e, scale, move_scale_out=a.move_scale_out)

        def fake_v(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return self.s.velocity("fake_score", x, sigma, cond)

        loss, loss_ac, loss_cons = fake_score_objective(
            fake_v, x_e, sigma_e, target, scale, a, generator=self.s.local, draw_jumps=self._draw_jumps
        )
        out = {"learner/fake/loss_ac": float(loss_ac.detach())}
        if loss_cons is not None:
            out["learner/fake/loss_consistency"] = float(loss_cons.detach())
        loss.backward()
        step = self.s.optimizers["fake_score"].step()
        self.counts["fake_updates"] += 1
        out |= {
            "learner/fake/loss": float(loss.detach()),
            "learner/fake/grad_norm": step["grad_norm"],
            "learner/fake/lr": step["lr"],
            "learner/fake/stop_k": float(last.k),
            "learner/fake/sigma_e_mean": float(sigma_e.mean()),
        }
        return out

    def generator_update(self, cond: Any, uncond: Any) -> dict[str, float]:
        """Spec §2.6-2.7: one generator optimiser step against the teacher (CFG) and the fake score."""
        a = self.ac
        last = self._simulate(cond, grad_last=True)
        x_s, sigma_s = self._boundary(last)
        sigma_e = self._draw_renoise(sigma_s)
        guidance = self._draw_guidance()
        xi = self._noise(tuple(x_s.shape))
        zeta = self._noise(tuple(x_s.shape))  # one transition noise shared by both projections
        dmd = acdmd.generator_dmd_loss(
            x_s,
            last.x0,
            sigma_s,
            sigma_e,
            xi,
            zeta,
            lambda x: self.s.velocity(None, x, sigma_e, cond, guidance=guidance, uncond=uncond),
            lambda x: self.s.velocity("fake_score", x, sigma_e, cond),
            eta=a.transition_eta,
            move_scale_out=a.move_scale_out,
            normalize=self.dmd.gradient_normalization,
            normalization=self.dmd.normalization,
        )
        weight = self.dmd.stop_loss_weights[last.k - 1] if self.dmd.stop_loss_weights else 1.0
        (dmd.loss * weight).backward()
        step = self.s.optimizers["generator"].step()
        self.counts["generator_updates"] += 1
        out = {
            "learner/generator/loss_dmd": float(dmd.loss.detach()),
            "learner/generator/dmd_grad_norm": float(dmd.grad_norm),
            "learner/generator/grad_norm": step["grad_norm"],
            "learner/generator/lr": step["lr"],
            "learner/generator/stop_k": float(last.k),
            "learner/generator/stop_loss_weight": weight,
            "learner/generator/teacher_guidance": guidance,
        }
        if self.train.ema.update == "per_optimizer_step":
            self.s.ema_update(self.s.optimizers["generator"].steps, self.train.ema)
        return out

    # ---------------------------------------------------------------- one iteration
    def run(self, iteration: int) -> dict[str, float]:
        """Iteration ``iteration`` (0-based) on this rank; returns rank-averaged, namespaced metrics."""
        s = self.s
        if iteration != s.iteration:
            raise RuntimeError(
                f"rank {s.rank} is at iteration {s.iteration} but was asked to run {iteration}"
            )
        sw = Stopwatch()
        recs = self.prompts.rank_batch(iteration, s.rank, s.world_size)
        with sw("timing/encode_s"):
            cond = s.backbone.encode_prompts([r["prompt"] for r in recs])
            uncond = s.backbone.empty_conditioning(len(recs))
        metrics: dict[str, float] = {}
        with sw("timing/fake_update_s"):
            metrics |= self.fake_score_update(cond)
        if (iteration + 1) % self.dmd.fake_update_ratio == 0:
            with sw("timing/generator_update_s"):
                metrics |= self.generator_update(cond, uncond)
        if self.train.ema.update == "reference":  # every iteration, even when G did not change (§7.1.7)
            s.ema_update(iteration + 1, self.train.ema)
        s.iteration = iteration + 1
        metrics = s.dist.mean_scalars(metrics)  # identical key sets on every rank (same control flow)
        metrics |= sw.seconds
        metrics |= {
            "learner/fake_updates": float(s.optimizers["fake_score"].steps),
            "learner/generator_updates": float(s.optimizers["generator"].steps),
            "learner/iteration": float(iteration + 1),
        }
        return metrics


# --------------------------------------------------------------------------------------------- export
def save_merged_backbone(
    backbone: str, pretrained_path: str, lora_paths: list[str], out_dir: str | Path
) -> Path:
    """Write a copy of the base model with ``lora_paths`` merged into its transformer (in order).

    The result loads like the base (``model.pretrained_path``), so tools that take a plain model directory,
    such as ``rtdmd-ray shapes eval --teacher DIR``, can evaluate a distilled generator.
    """
    from rtdmd_ray.models import build_backbone
    from rtdmd_ray.models.lora import merge_lora_files

    bb = build_backbone(backbone, pretrained_path=pretrained_path or None, dtype="fp32")
    merge_lora_files(bb.transformer, lora_paths)
    return Path(bb.save_pretrained(out_dir))

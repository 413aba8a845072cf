"""Typed, frozen run configuration: dataclasses are the schema, YAML holds the values, the CLI holds
overrides.

Precedence: dataclass default < YAML file (and the files it ``inherit``s) < ``key.sub=value`` overrides.
Unlike the reference (spec algorithms.md §4.1-§4.2), an unknown key or a value of the wrong type is a
``ConfigError`` naming the full key path and the closest valid key, raised before anything starts.

Loading rules:
    * ``inherit: other.yaml`` (or a list of files), top level only, paths relative to the including file.
      Files
      merge in order, then the including file on top. Sections (dataclasses) merge key by key; every other
      value,
      lists and ``{name: value}`` maps included, is replaced whole.
    * Type-directed coercion: a ``float`` field accepts ints and numeric strings (PyYAML reads ``3e-6`` as a
      string); an ``int`` field accepts integral floats (``1.0e5``); ``tuple`` fields accept lists. Nothing
      else
      is converted: ``bool`` fields need ``true``/``false``, ``str`` fields need strings.
    * Overrides ``a.b.c=value``: the value is parsed as a YAML flow scalar/list/map (``x=[1,2]``, ``d={a:
      1}``,
      ``3``, ``3.0``, ``true``), except for string fields, which take the text verbatim. A map given for a
      section merges into it; a path through a ``{name: value}`` map adds or replaces one entry
      (``rewards.weights.hpsv2=1.0``).
    * Derived values are properties (``grpo.images_per_step``, ``Config.images_per_rank_per_epoch``), never
      written back. ``Config.validate()`` checks the cross-field arithmetic with the numbers in the message.

Relative paths in a config are relative to the repository root (``resolve_path``), where commands run.
Regenerate ``configs/reference.yaml`` (every key, commented) with ``python -m rtdmd_ray.config reference``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# libyaml's loader when present (same YAML 1.1 resolution as the pure-Python SafeLoader, several times faster)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(ValueError):
    """A config problem, reported as one line naming the key path and the fix."""


class FrozenDict(dict):
    """A read-only ``dict`` used for the ``{name: value}`` fields of the frozen config.

    It stays a ``dict`` (JSON/YAML friendly, equal to plain dicts) and pickles for Ray; mutation raises.
    """

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("config maps are read-only: build a new config with apply_overrides(cfg, [...])")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _readonly  # type: ignore

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted((k, _hashable(v)) for k, v in self.items())))

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


def _hashable(v: Any) -> Any:
    return tuple(sorted(v.items())) if isinstance(v, dict) else v


# --------------------------------------------------------------------------------------------- registries
# Copied from rtdmd_ray.rewards.KNOWN_REWARDS / DIFFERENTIABLE_REWARDS (names only; a parity test keeps them
# equal) so that `rtdmd-ray validate` does not import torch.
KNOWN_REWARDS: frozenset[str] = frozenset({
    "pickscore", "hpsv2", "hpsv3", "clipscore", "aesthetic", "imagereward", "ocr", "geneval", "geneval2",
    "shapes_geneval", "brightness", "latency",
})
DIFFERENTIABLE_REWARDS: frozenset[str] = frozenset(
    {"pickscore", "hpsv2", "clipscore", "imagereward", "brightness"})

Backbone = Literal["sd3", "sd35", "flux1", "flux2", "shapes", "tiny_sd3", "tiny_flux1", "tiny_flux2"]
# The sampler/schedule family of each backbone (spec §1.1); ShapeWorld's teacher is an SD3 transformer.
BACKBONE_FAMILY: dict[str, str] = {
    "sd3": "sd3", "sd35": "sd3", "shapes": "sd3", "tiny_sd3": "sd3",
    "flux1": "flux1", "tiny_flux1": "flux1", "flux2": "flux2", "tiny_flux2": "flux2",
}
# Pixels per latent cell side that the resolution must divide (models/*.py `latent_divisor`): the real VAEs
# downsample 8x, FLUX.1 packs the latent 2x2, FLUX.2 latents are 2x2-patchified; ShapeWorld is a 2x
# pixel-unshuffle. The tiny VAEs downsample 2x (models/tiny.py) and their latents must be even.
RESOLUTION_MULTIPLE_PX: dict[str, int] = {
    "sd3": 8, "sd35": 8, "flux1": 16, "flux2": 16, "shapes": 4,
    "tiny_sd3": 4, "tiny_flux1": 4, "tiny_flux2": 4,
}
# Backbones whose weights come from `model.pretrained_path` (tiny ones are built in code).
NEEDS_PRETRAINED_PATH = frozenset({"sd3", "sd35", "flux1", "flux2", "shapes"})

# LoRA targets per family (spec §4.3): the image- and text-stream attention projections of the joint blocks.
# FLUX.2-klein adds `to_qkv_mlp_proj` and, in the shipped configs, the single blocks' bare `attn.to_out`
# listed one by one (their count depends on the model size, 20 for 4B and 24 for 9B).
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "sd3": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    "flux1": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    "flux2": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
              "to_qkv_mlp_proj"),
}

# Ray's own resources: set through cpus_per_actor / gpus_per_actor (or not per role), never `custom`.
RAY_BUILTIN_RESOURCES: frozenset[str] = frozenset({"CPU", "GPU", "memory", "object_store_memory"})

Scalar = Union[str, int, float, bool]  # noqa: UP007 (a runtime type the loader inspects)


# --------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapter of one trainable role (spec §4.3, §3.1).

    Attributes:
        enabled: inject a LoRA adapter; false trains the role's full weights.
        rank: LoRA rank r.
        alpha: LoRA alpha; the adapter output is scaled by alpha / rank.
        target_modules: module-name suffixes that get adapters; empty = the backbone family's default
            (ModelConfig.lora_targets).
        init: initialisation of A (B is zero): "gaussian" (peft: A ~ N(0, 1/rank)) or "kaiming_uniform".
        load_path: adapter to load before training (safetensors or the reference's .pt LoRA dict); "" = none.
        load_strict: fail on missing/unexpected adapter keys; false reproduces the reference, which ignores
            mismatches silently (§7.1.14).
        merge_before_training: merge the loaded adapter into the base weights, then train a fresh adapter.
        reinit_a_std: std of A when the fresh adapter is re-initialised after the merge; null = peft's 1/rank,
            1.0 = the reference's normal_() (§7.1.8).
    """

    enabled: bool = True
    rank: int = 32
    alpha: float = 64.0
    target_modules: tuple[str, ...] = ()
    init: Literal["gaussian", "kaiming_uniform"] = "gaussian"
    load_path: str = ""
    load_strict: bool = True
    merge_before_training: bool = False
    reinit_a_std: float | None = None

    @property
    def scale(self) -> float:
        """The adapter scaling alpha / rank."""
        return self.alpha / self.rank


@dataclass(frozen=True)
class ModelConfig:
    """The backbone and its trainable roles (spec §2.1, §3.1).

    Attributes:
        backbone: sd3 | sd35 | flux1 | flux2 (the real models), shapes (ShapeWorld) or tiny_* (random, built
            in code).
        pretrained_path: hub id or local directory of the base model (the teacher); required unless tiny_*.
        generator_init_path: weights loaded into the generator after the base (FLUX.2: the distilled klein);
            "" = base.
        fake_score_init_path: weights loaded into the fake score after the base; "" = base.
        teacher_init_path: weights loaded into the teacher after the base; "" = base.
        dtype: weight dtype of the frozen model parts (bf16 | fp16 | fp32).
        resolution_px: square image side in pixels; must divide by the backbone's latent multiple.
        gradient_checkpointing: recompute activations of the trainable transformer in backward.
        generator_lora: LoRA of the generator.
        fake_score_lora: LoRA of the fake score (same settings as the generator in every shipped config).
    """

    backbone: Backbone = "sd35"
    pretrained_path: str = ""
    generator_init_path: str = ""
    fake_score_init_path: str = ""
    teacher_init_path: str = ""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    resolution_px: int = 512
    gradient_checkpointing: bool = True
    generator_lora: LoRAConfig = field(default_factory=LoRAConfig)
    fake_score_lora: LoRAConfig = field(default_factory=LoRAConfig)

    @property
    def family(self) -> str:
        """Sampler/schedule family: "sd3" | "flux1" | "flux2"."""
        return BACKBONE_FAMILY[self.backbone]

    def lora_targets(self, role: Literal["generator", "fake_score"]) -> tuple[str, ...]:
        """The role's LoRA target modules; the family default when the config leaves them empty."""
        lora = self.generator_lora if role == "generator" else self.fake_score_lora
        return lora.target_modules or DEFAULT_LORA_TARGETS[self.family]


@dataclass(frozen=True)
class SamplingConfig:
    """The few-step CPS sampler of the generator (spec §1.1, §1.3), shared by cold start, RL rollouts and
    eval.

    Attributes:
        denoising_step_list: raw timesteps of the distilled schedule before the backbone's shift (1000 = pure
            noise).
        num_steps: steps actually run (NFE), at most len(denoising_step_list).
        eta: CPS noise level (the reference's cps_eta and grpo.noise_level): 0 = deterministic Euler, 1 =
            fresh noise.
    """

    denoising_step_list: tuple[int, ...] = (1000, 750, 500, 250)
    num_steps: int = 4
    eta: float = 0.9

    @property
    def stochastic_steps(self) -> int:
        """Steps with injected noise: all but the last, which lands on sigma = 0 deterministically."""
        return self.num_steps - 1


@dataclass(frozen=True)
class DMDConfig:
    """Cold-start distribution matching (spec §1.5, §2.6-§2.9); the teacher CFG range also serves the RL aux
    loss.

    Attributes:
        prompts_per_step: prompts per cold-start iteration over all learner ranks (reference: 9 per GPU x 8).
        fake_update_ratio: fake-score updates per generator update (TTUR); the cold start only.
        random_stop: stop the backward simulation at a random step k ~ U{1..num_steps} (else always
            num_steps).
        teacher_guidance_min: lower end of the teacher CFG scale drawn per call (FLUX.1: the distilled
            scalar).
        teacher_guidance_max: upper end of the teacher CFG scale.
        gradient_normalization: divide the DMD gradient by mean|x - y_real| per sample (§2.7).
        normalization: what that normaliser measures: "reference" mean|x - y_real| (it includes the CPS
            noise when sigma_s > 0, §7.1.12), or "clean" (1 - sigma_s) mean|x0_gen - x0_teacher|, equal to
            the reference at sigma_s = 0 and noise-free above it (docs/design.md).
        stop_loss_weights: generator DMD loss weight per random stop k = 1..num_steps (empty = all 1, the
            reference). Weights ~ 1 / (that stop's gradient norm) make every stop move the shared LoRA about
            equally under Adam; on ShapeWorld that gave no gain (docs/design.md). Cold start only.
    """

    prompts_per_step: int = 72
    fake_update_ratio: int = 10
    random_stop: bool = True
    teacher_guidance_min: float = 4.5
    teacher_guidance_max: float = 4.5
    gradient_normalization: bool = True
    normalization: Literal["reference", "clean"] = "reference"
    stop_loss_weights: tuple[float, ...] = ()


@dataclass(frozen=True)
class ACDMDConfig:
    """AC-DMD sub-interval renoising and the fake score's consistency regulariser (spec §2.3-§2.5, §3.6).

    Used by the cold start and by the RL stage's fake-score update and aux loss.

    Attributes:
        start_mode: boundary of the sub-interval: "next_sigma" (the executed step's output) or
            "fixed_boundary".
        boundary_sigma_index: index into the sigma schedule for start_mode fixed_boundary.
        end_timestep: upper end of the renoise-time draw t_r ~ U(1000 sigma_s + offset, end).
        timestep_offset: gap above the boundary, in timesteps (10 = 0.01 in sigma).
        include_terminal_without_random_stop: with random_stop off, still draw up to timestep 1000.
        min_renoise_step: lower clamp of the renoise time, in timesteps.
        max_renoise_step: upper clamp of the renoise time, in timesteps (at most 999).
        renoise_clamp: "above_start" keeps the renoise level above the boundary when the boundary is above
            max_renoise_step (identical to the reference on every shipped schedule); "reference" clamps at
            max_renoise_step even below the boundary (spec §7.1.6).
        transition_eta: CPS eta of the teacher/fake projections back to the boundary and of consistency paths.
        move_scale_out: use the scale-moved-out target, i.e. weight min(1, 10 sigma_se^2) on (v - target)^2.
        fake_target: cold-start fake-score regression target: "path" (the reference: the velocity of the
            conditional path from x_s) or "x0" (flow matching on the last step's x0-prediction renoised
            through x_s; same at sigma_s = 0, far lower variance above it; docs/design.md).
        fake_loss_weight_min: lower clamp of the fake-score loss weight 1/scale^2.
        fake_loss_weight_max: upper clamp of the fake-score loss weight.
        consistency_weight: gamma of the consistency regulariser; 0 disables it.
        consistency_max_jump_timesteps: Delta: each backward jump draws delta ~ U{1..Delta} timesteps.
        consistency_num_steps: backward jumps per consistency path.
        consistency_two_sample: the unbiased two-path estimator (else the one-sample MSE).
        consistency_stopgrad_transitions: build the transition paths without gradient.
    """

    start_mode: Literal["next_sigma", "fixed_boundary"] = "next_sigma"
    boundary_sigma_index: int = 2
    end_timestep: float = 1000.0
    timestep_offset: float = 10.0
    include_terminal_without_random_stop: bool = True
    min_renoise_step: int = 20
    max_renoise_step: int = 980
    renoise_clamp: Literal["above_start", "reference"] = "above_start"
    transition_eta: float = 0.9
    move_scale_out: bool = True
    fake_target: Literal["path", "x0"] = "path"
    fake_loss_weight_min: float = 0.0
    fake_loss_weight_max: float = 10.0
    consistency_weight: float = 0.01
    consistency_max_jump_timesteps: int = 200
    consistency_num_steps: int = 1
    consistency_two_sample: bool = True
    consistency_stopgrad_transitions: bool = True


@dataclass(frozen=True)
class StepSelectionConfig:
    """SubGRPO step selection with prompt-seeded shared noise at the other steps (spec §3.3).

    Attributes:
        enabled: choose num_train_steps of the candidate steps per epoch and share the noise of the rest;
            false
            trains every candidate step with independent noise.
        range_start: first candidate step index.
        range_end: last candidate step index (inclusive); at most num_steps - 2, the last step is
            deterministic.
        num_train_steps: steps chosen per epoch, without replacement.
    """

    enabled: bool = True
    range_start: int = 0
    range_end: int = 2
    num_train_steps: int = 2

    @property
    def num_candidates(self) -> int:
        return self.range_end - self.range_start + 1


@dataclass(frozen=True)
class GRPOConfig:
    """The RL stage's rollout batching and policy-gradient loss (spec §3.2-§3.5, §3.7).

    A "step" here is one rollout step: prompts_per_step prompts, each sampled images_per_prompt times; an
    epoch
    is sample_batches_per_epoch rollout steps followed by the update.

    Attributes:
        prompts_per_step: distinct prompts per rollout step over all samplers.
        images_per_prompt: K, images per prompt (one advantage group; its copies may land on different
            samplers).
        sample_batches_per_epoch: rollout steps per epoch.
        sampler_micro_batch_images: images per generator forward on a sampler; 0 = its whole share at once.
        vae_decode_micro_batch_images: images per VAE decode call on a sampler; 0 = all at once.
        micro_batch_images_per_rank: images per learner forward/backward on each rank.
        optimizer_steps_per_epoch: generator optimiser steps per epoch (reference: 1, so the PPO ratio is 1).
        inner_epochs: passes over the epoch's samples.
        sde_type: transition of the rollout: "cps" (shipped) or "sde" (Flow-GRPO).
        log_prob: "reference" = -mean_CHW (x' - mu)^2 (unnormalised, §1.4); "gaussian" = the true log-density.
        clip_range_low: PPO ratio clip below 1 (ratio >= 1 - clip_range_low).
        clip_range_high: PPO ratio clip above 1.
        adv_clip_max: advantages are clipped to +-adv_clip_max at training time.
        max_policy_lag: 0 = on-policy; 1 = samplers produce epoch e+1 with the previous weights while the
            learner trains on epoch e.
        step_selection: SubGRPO step selection.
    """

    prompts_per_step: int = 3
    images_per_prompt: int = 24
    sample_batches_per_epoch: int = 16
    sampler_micro_batch_images: int = 0
    vae_decode_micro_batch_images: int = 4
    micro_batch_images_per_rank: int = 9
    optimizer_steps_per_epoch: int = 1
    inner_epochs: int = 1
    sde_type: Literal["cps", "sde"] = "cps"
    log_prob: Literal["reference", "gaussian"] = "reference"
    clip_range_low: float = 1e-5
    clip_range_high: float = 1e-5
    adv_clip_max: float = 5.0
    max_policy_lag: int = 0
    step_selection: StepSelectionConfig = field(default_factory=StepSelectionConfig)

    @property
    def images_per_step(self) -> int:
        """Images sampled per rollout step: prompts_per_step x images_per_prompt."""
        return self.prompts_per_step * self.images_per_prompt

    @property
    def prompts_per_epoch(self) -> int:
        return self.prompts_per_step * self.sample_batches_per_epoch

    @property
    def samples_per_epoch(self) -> int:
        """Images (trajectories) per epoch: images_per_step x sample_batches_per_epoch."""
        return self.images_per_step * self.sample_batches_per_epoch


@dataclass(frozen=True)
class BPConfig:
    """Reward back-propagation through the VAE decode at the deterministic last step (spec §3.7).

    Attributes:
        enabled: add L_BP = grad_scale * mean relu(margin - R) to the aux loss.
        reward_weights: differentiable rewards and their weights in R (reference: every differentiable
            training
            reward at weight 1); names must be differentiable scorers.
        margin: hinge margin on the weighted reward sum.
        grad_scale: weight of the hinge loss.
        only_deterministic: apply only at steps whose next sigma is 0.
        micro_batch_images: images per differentiable decode + score; 0 = the whole micro-batch.
    """

    enabled: bool = True
    reward_weights: dict[str, float] = field(
        default_factory=lambda: FrozenDict({"clipscore": 1.0, "hpsv2": 1.0, "pickscore": 1.0}))
    margin: float = 3.0
    grad_scale: float = 1e-4
    only_deterministic: bool = True
    micro_batch_images: int = 0


@dataclass(frozen=True)
class LastStepLossConfig:
    """The RL stage's auxiliary losses on the last step: AC-DMD distribution matching and BP (spec §3.6-§3.7).

    Attributes:
        loss_type: "ac_dmd" (shipped) or "none" (BP and/or PPO only).
        train_steps: aux steps as indices into the trajectory (-1 = the last step).
        weight: weight of the AC-DMD aux loss next to the policy-gradient loss (weight 1).
        fake_score_micro_batch_images: images per fake-score backward in the RL fake update; 0 = all at once.
        aux_sample_fraction: share of each rank's samples that carry the aux terms (AC-DMD, BP) and the
            fake-score update: every ``round(1 / f)``-th micro-batch, its aux losses scaled up so their
            expected gradient is the full one's. 1 = every sample (the reference); below 1 buys the aux terms
            for a fraction of their learner time (they were 75 % of it on ShapeWorld).
        bp: reward back-propagation.
    """

    loss_type: Literal["ac_dmd", "none"] = "ac_dmd"
    train_steps: tuple[int, ...] = (-1,)
    weight: float = 1e-3
    fake_score_micro_batch_images: int = 0
    aux_sample_fraction: float = 1.0
    bp: BPConfig = field(default_factory=BPConfig)


@dataclass(frozen=True)
class SolverConfig:
    """AdamW and its LR schedule (linear warm-up, then constant) for one trainable role.

    Attributes:
        lr: learning rate after warm-up.
        warmup_steps: optimiser steps of linear warm-up (0 = none).
        beta1: Adam beta1.
        beta2: Adam beta2.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay.
        max_grad_norm: global gradient-norm clip (0 = no clipping).
    """

    lr: float = 3e-5
    warmup_steps: int = 0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class SolversConfig:
    """Optimisers per role. The RL stage's generator uses solver.generator too (the reference used grpo.*).

    Attributes:
        generator: optimiser of the generator's LoRA (cold start and RL).
        fake_score: optimiser of the fake score's LoRA.
    """

    generator: SolverConfig = field(default_factory=SolverConfig)
    fake_score: SolverConfig = field(default_factory=SolverConfig)


@dataclass(frozen=True)
class EMAConfig:
    """EMA of the generator's trainable weights, kept in fp32 (spec §4.4).

    Attributes:
        enabled: keep an EMA; eval and the exported generator use it.
        decay: EMA decay d in theta_e <- d theta_e + (1 - d) theta.
        interval_steps: update every this many optimiser steps.
        warmup: use d_eff = min((1 + s) / (10 + s), decay) (the reference's RL EMA); false = constant d.
        update: "per_optimizer_step" (the paper's intent) or "reference" (cold start: every iteration even
            when the
            generator did not change; RL: after every learner micro-batch, §7.1.1).
    """

    enabled: bool = True
    decay: float = 0.99
    interval_steps: int = 1
    warmup: bool = False
    update: Literal["per_optimizer_step", "reference"] = "per_optimizer_step"


@dataclass(frozen=True)
class TrainConfig:
    """Run length, seeds, checkpoints and precision.

    Attributes:
        iterations: cold start: training iterations (one fake-score update each); RL: epochs.
        seed: base seed; every random draw derives from it (rank/sampler index and step are mixed in).
        output_dir: run directory (checkpoints, metrics, config.yaml); fixed, so resume auto can find it.
        resume: "auto" (latest complete checkpoint in output_dir, else fresh), "never", or a checkpoint path.
        keep_last_checkpoints: checkpoints kept in output_dir (older ones are deleted after a save).
        save_every_iterations: checkpoint interval; a final checkpoint is always written.
        log_every_iterations: metrics logging interval.
        autocast_dtype: autocast of the forward passes (fp32 = no autocast).
        trainable_param_dtype: "fp32" master weights, Adam states and EMA for the trainable parameters;
            "model"
            keeps them in model.dtype like the reference (§7.1.3).
        ema: EMA of the generator.
    """

    iterations: int = 100_000
    seed: int = 42
    output_dir: str = "outputs/run"
    resume: str = "auto"
    keep_last_checkpoints: int = 3
    save_every_iterations: int = 5000
    log_every_iterations: int = 1
    autocast_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    trainable_param_dtype: Literal["fp32", "model"] = "fp32"
    ema: EMAConfig = field(default_factory=EMAConfig)


@dataclass(frozen=True)
class RewardsConfig:
    """Training rewards and how the reward pool runs the scorers (spec rewards-inference.md §1-§2).

    Attributes:
        weights: training rewards {name: weight}; advantages are normalised per reward, then weighted.
        ckpt_dir: reward checkpoint root; "" = $RTDMD_REWARD_CKPT_PATH, then hub ids.
        device: scorer device in a reward worker: "auto" (the worker's GPU if it has one), "cpu", "cuda",
            "cuda:N".
        devices: per-reward device overrides {name: device}.
        batch_images: images per scorer call {name: int}; a reward not listed scores a whole batch at once.
        options: scorer constructor options {name: {option: value}}, e.g. clipscore: {model: <dir or hub id>}.
    """

    weights: dict[str, float] = field(default_factory=lambda: FrozenDict(
        {"clipscore": 1.0, "hpsv2": 1.0, "pickscore": 1.0, "geneval": 1.0}))
    ckpt_dir: str = ""
    device: str = "auto"
    devices: dict[str, str] = field(default_factory=FrozenDict)
    batch_images: dict[str, int] = field(default_factory=FrozenDict)
    options: dict[str, dict[str, Scalar]] = field(default_factory=FrozenDict)

    def device_for(self, name: str) -> str:
        return self.devices.get(name, self.device)


PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


@dataclass(frozen=True)
class RoleResourcesConfig:
    """Actors of one role and what each reserves (mapped onto groups.RoleResources where actors are created).

    Attributes:
        count: number of actors.
        cpus_per_actor: logical CPUs reserved per actor (fractions allowed).
        gpus_per_actor: GPUs per actor (fractions colocate actors on one GPU; above 1 it must be whole).
        max_restarts: how often Ray restarts a dead actor (-1 = forever, 0 = never; learners: 0 only).
        max_task_retries: how often a call on a restarted actor is retried (-1 = forever); needs max_restarts.
        placement: Ray placement-group strategy for this role's actors.
        custom: Ray custom resources per actor {name: amount}, e.g. {rtdmd_reward: 1}: the role's actors
            and placement-group bundles need them, so they land only on nodes that advertise them (cluster/
            advertises rtdmd_learner, rtdmd_sampler, rtdmd_reward, rtdmd_reward_cpu); empty = placed by
            CPU/GPU shape alone.
    """

    count: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    max_restarts: int = 0
    max_task_retries: int = 0
    placement: PlacementStrategy = "PACK"
    custom: dict[str, float] = field(default_factory=FrozenDict)


@dataclass(frozen=True)
class ResourcesConfig:
    """Actor counts and per-actor resources per role, applied where the actors are created (groups.py).

    Attributes:
        sampler: rollout sampler actors.
        reward_worker: reward pool actors (each hosts every training scorer).
        learner: learner ranks forming one torch.distributed group.
        eval_worker: actors that generate eval images (rtdmd-ray eval / sample).
        learner_parallelism: "ddp" (replicated) or "fsdp2" (fully_shard).
        fsdp_shard_ranks: FSDP2 shard-group size; 0 = shard over all ranks, else hybrid (replicate across
            groups).
    """

    sampler: RoleResourcesConfig = field(default_factory=RoleResourcesConfig)
    reward_worker: RoleResourcesConfig = field(default_factory=RoleResourcesConfig)
    learner: RoleResourcesConfig = field(default_factory=RoleResourcesConfig)
    eval_worker: RoleResourcesConfig = field(default_factory=RoleResourcesConfig)
    learner_parallelism: Literal["ddp", "fsdp2"] = "fsdp2"
    fsdp_shard_ranks: int = 0


@dataclass(frozen=True)
class SyncConfig:
    """Learner -> sampler weight sync (LoRA, or full weights when training full).

    Attributes:
        transport: "auto" (nccl on GPU, gloo on CPU), "nccl", "gloo" or "object_store".
        bucket_mib: flat bucket size in MiB.
        timeout_s: seconds before a sync is declared failed.
    """

    transport: Literal["auto", "nccl", "gloo", "object_store"] = "auto"
    bucket_mib: int = 256
    timeout_s: float = 600.0


@dataclass(frozen=True)
class DataConfig:
    """Training prompts.

    Attributes:
        kind: "prompt_file" (a .txt line per prompt or a .jsonl of records with metadata), "inline" (prompts
            below), or "shapes" (ShapeWorld captions generated procedurally).
        dataset_dir: root of the prompt sets; relative prompt-file paths (here and in eval) start from it.
        train_prompt_file: training prompts, relative to dataset_dir unless absolute.
        prompts: inline training prompts (kind inline).
        balance_tags: repeat each tag's training records (cycling) up to the largest tag's count, so that
            uniform draws from the pool sample every tag equally (needs a "tag" on every record: ShapeWorld,
            GenEval-style jsonl). ShapeWorld's train pool is 75 % colour attribution otherwise.
    """

    kind: Literal["prompt_file", "inline", "shapes"] = "prompt_file"
    dataset_dir: str = "data/prompts"
    train_prompt_file: str = "pickscore/train.txt"
    prompts: tuple[str, ...] = ()
    balance_tags: bool = False


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training and the eval/sample commands (spec §2.10, §3.8, rewards-inference.md §5).

    Attributes:
        enabled: evaluate during training.
        every_iterations: eval interval in iterations (cold start) or epochs (RL); iteration 0 included.
        mode: "distilled" (the few-step CPS generator) or "teacher" (multi-step Euler with CFG).
        num_steps: sampling steps (distilled: at most len(sampling.denoising_step_list)).
        noise_level: CPS eta of eval sampling (distilled mode).
        guidance_scale: CFG scale (teacher mode only).
        use_ema: evaluate the EMA generator when one exists.
        batch_images: images per generation batch per worker.
        seed: base seed; an image's seed depends only on its prompt index and this seed.
        reward_weights: eval rewards {name: weight}; "mean" is the weighted sum of their means.
        prompt_file: default eval prompts (relative to data.dataset_dir) for rewards not in dataset_map.
        dataset_map: per-reward prompt files {reward: prompt file}, relative to data.dataset_dir.
        num_prompts: cap on prompts per prompt file (0 = all); ShapeWorld: captions generated.
        log_images: images logged per eval.
        rows: model rows `rtdmd-ray eval` compares on the same prompts and seeds {row name: overrides of
            this config}, e.g. teacher-50: [eval.mode=teacher, eval.num_steps=50, "inference.lora_paths=[]"];
            empty = one row, the config as given.
    """

    enabled: bool = True
    every_iterations: int = 1000
    mode: Literal["distilled", "teacher"] = "distilled"
    num_steps: int = 4
    noise_level: float = 0.9
    guidance_scale: float = 1.0
    use_ema: bool = True
    batch_images: int = 16
    seed: int = 42
    reward_weights: dict[str, float] = field(default_factory=lambda: FrozenDict({"pickscore": 1.0}))
    prompt_file: str = "drawbench/test.txt"
    dataset_map: dict[str, str] = field(default_factory=FrozenDict)
    num_prompts: int = 0
    log_images: int = 8
    rows: dict[str, tuple[str, ...]] = field(default_factory=FrozenDict)


@dataclass(frozen=True)
class InferenceConfig:
    """LoRA stack of the sample/eval commands (rewards-inference.md §5.6).

    Attributes:
        lora_paths: adapters merged into the base in order (cold-start EMA, then RL EMA); empty = the base
            model.
        fallback_lora_rank: rank for adapter files without adapter_config.json.
        fallback_lora_alpha: alpha for adapter files without adapter_config.json.
    """

    lora_paths: tuple[str, ...] = ()
    fallback_lora_rank: int = 32
    fallback_lora_alpha: float = 64.0


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go.

    Attributes:
        stdout: print metrics lines and a progress bar.
        jsonl: append metrics to output_dir/metrics.jsonl.
        wandb: "disabled", "offline" (no network) or "online".
        project: wandb project.
        run_name: wandb run name ("" = the output_dir name).
        tags: wandb tags.
        ray_metrics: export metrics through ray.util.metrics (dashboard / Prometheus).
    """

    stdout: bool = True
    jsonl: bool = True
    wandb: Literal["disabled", "offline", "online"] = "offline"
    project: str = "rtdmd-ray"
    run_name: str = ""
    tags: tuple[str, ...] = ()
    ray_metrics: bool = True


@dataclass(frozen=True)
class Config:
    """One run: which stage, the model, the algorithms, the rewards and the resources.

    Attributes:
        stage: "cold_start" (AC-DMD distillation), "rtdmd" (the RL stage) or "inference" (sample / eval).
        model: backbone and trainable roles.
        sampling: the generator's few-step sampler.
        dmd: cold-start distribution matching.
        ac_dmd: AC-DMD renoising and consistency.
        grpo: RL rollout batching and policy gradient.
        last_step_loss: RL auxiliary losses (AC-DMD, BP).
        solver: optimisers per role.
        train: run length, checkpoints, precision, EMA.
        rewards: training rewards and scorer settings.
        resources: actor counts and resources.
        sync: learner -> sampler weight sync.
        data: training prompts.
        eval: evaluation.
        inference: LoRA stack for sample/eval.
        logging: metrics sinks.
    """

    stage: Literal["cold_start", "rtdmd", "inference"] = "rtdmd"
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    ac_dmd: ACDMDConfig = field(default_factory=ACDMDConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    last_step_loss: LastStepLossConfig = field(default_factory=LastStepLossConfig)
    solver: SolversConfig = field(default_factory=SolversConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ------------------------------------------------------------ derived totals (valid after validate())
    @property
    def cold_start_prompts_per_rank(self) -> int:
        """Cold-start prompts per learner rank per iteration."""
        return self.dmd.prompts_per_step // self.resources.learner.count

    @property
    def images_per_sampler_per_step(self) -> int:
        """Images each sampler produces per rollout step."""
        return self.grpo.images_per_step // self.resources.sampler.count

    @property
    def images_per_rank_per_epoch(self) -> int:
        """RL samples each learner rank trains on per epoch."""
        return self.grpo.samples_per_epoch // self.resources.learner.count

    @property
    def micro_batches_per_rank_per_epoch(self) -> int:
        return self.images_per_rank_per_epoch // self.grpo.micro_batch_images_per_rank

    @property
    def micro_batches_per_optimizer_step(self) -> int:
        """Gradient-accumulation micro-batches per generator optimiser step (per rank)."""
        return self.micro_batches_per_rank_per_epoch // self.grpo.optimizer_steps_per_epoch

    def derived(self) -> dict[str, int | float | str]:
        """The derived totals to log at start-up (one block), keyed by name with units."""
        out: dict[str, int | float | str] = {
            "stage": self.stage, "backbone": self.model.backbone, "resolution_px": self.model.resolution_px,
            "nfe": self.sampling.num_steps,
        }
        if self.stage == "cold_start":
            out |= {
                "prompts_per_step": self.dmd.prompts_per_step, "learner_ranks": self.resources.learner.count,
                "prompts_per_rank": self.cold_start_prompts_per_rank,
                "fake_updates_per_generator_update": self.dmd.fake_update_ratio,
                "generator_updates_total": self.train.iterations // self.dmd.fake_update_ratio,
            }
        elif self.stage == "rtdmd":
            g = self.grpo
            out |= {
                "prompts_per_step": g.prompts_per_step, "images_per_prompt": g.images_per_prompt,
                "images_per_step": g.images_per_step, "sample_batches_per_epoch": g.sample_batches_per_epoch,
                "samples_per_epoch": g.samples_per_epoch, "samplers": self.resources.sampler.count,
                "images_per_sampler_per_step": self.images_per_sampler_per_step,
                "learner_ranks": self.resources.learner.count,
                "images_per_rank_per_epoch": self.images_per_rank_per_epoch,
                "micro_batches_per_optimizer_step": self.micro_batches_per_optimizer_step,
                "optimizer_steps_per_epoch": g.optimizer_steps_per_epoch,
                "reward_workers": self.resources.reward_worker.count, "max_policy_lag": g.max_policy_lag,
            }
        else:
            out |= {"eval_workers": self.resources.eval_worker.count,
                    "lora_stack": len(self.inference.lora_paths)}
        return out

    def summary(self) -> str:
        """One line of derived totals (printed by `rtdmd-ray validate`)."""
        m, r = self.model, self.resources
        head = f"{self.stage}, {m.backbone} {m.resolution_px}px, {self.sampling.num_steps} NFE"
        if self.stage == "cold_start":
            d = self.dmd
            return (f"{head}; {d.prompts_per_step} prompts/step = {r.learner.count} ranks x "
                    f"{self.cold_start_prompts_per_rank}; fake:generator updates {d.fake_update_ratio}:1; "
                    f"{self.train.iterations} iterations")
        if self.stage == "rtdmd":
            g = self.grpo
            rewards = ",".join(f"{k}={v:g}" for k, v in self.rewards.weights.items())
            return (f"{head}; {g.prompts_per_step} prompts x {g.images_per_prompt} images = "
                    f"{g.images_per_step} images/step ({r.sampler.count} samplers x "
                    f"{self.images_per_sampler_per_step}) x {g.sample_batches_per_epoch} steps = "
                    f"{g.samples_per_epoch} samples/epoch; {r.learner.count} learner ranks x "
                    f"{self.images_per_rank_per_epoch} images/epoch, {self.micro_batches_per_optimizer_step} "
                    f"micro-batches of {g.micro_batch_images_per_rank} per optimizer step, "
                    f"{g.optimizer_steps_per_epoch} step(s)/epoch; {r.reward_worker.count} reward workers "
                    f"[{rewards}]; {self.train.iterations} epochs")
        rewards = ",".join(self.eval.reward_weights)
        return (f"{head}; {len(self.inference.lora_paths)} LoRA(s); {r.eval_worker.count} eval workers x "
                f"{self.eval.batch_images} images/batch; rewards [{rewards}]")

    # ------------------------------------------------------------------ cross-field checks
    def validate(self) -> Config:
        """Check the cross-field arithmetic and names; raise one ConfigError listing every problem.

        Returns ``self`` so calls chain. The message shows the numbers involved and the key to change.
        """
        problems = _check(self)
        if problems:
            raise ConfigError("; ".join(problems))
        return self


def resolve_path(path: str | Path, base: str | Path | None = None) -> Path:
    """Absolute form of a config path: relative paths start at ``base`` (default: the repository root)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base if base is not None else REPO_ROOT) / p


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(cfg: Config) -> list[str]:
    """Every cross-field problem of ``cfg`` as one message each (empty list: valid)."""
    p: list[str] = []
    m, s, res = cfg.model, cfg.sampling, cfg.resources

    def positive(path: str, value: float, *, zero_ok: bool = False) -> None:
        finite = not isinstance(value, float) or math.isfinite(value)
        if value < 0 or (value == 0 and not zero_ok) or not finite:
            p.append(f"{path}={value} must be {'>= 0' if zero_ok else '> 0'}")

    # model
    mult = RESOLUTION_MULTIPLE_PX[m.backbone]
    positive("model.resolution_px", m.resolution_px)
    if m.resolution_px > 0 and m.resolution_px % mult:
        near = max(mult, m.resolution_px - m.resolution_px % mult)
        p.append(f"model.resolution_px={m.resolution_px} is not divisible by {mult}, the latent multiple of "
                 f"backbone {m.backbone}: use e.g. {near}")
    if m.backbone == "shapes" and m.resolution_px != 32:
        p.append(f"model.resolution_px={m.resolution_px}: the ShapeWorld teacher is trained at 32 px; set 32")
    if m.backbone in NEEDS_PRETRAINED_PATH and not m.pretrained_path:
        p.append(f"model.pretrained_path is empty: backbone {m.backbone} needs a hub id or a local directory")
    for role in ("generator_lora", "fake_score_lora"):
        lora: LoRAConfig = getattr(m, role)
        positive(f"model.{role}.rank", lora.rank)
        positive(f"model.{role}.alpha", lora.alpha)
        if lora.reinit_a_std is not None:
            positive(f"model.{role}.reinit_a_std", lora.reinit_a_std)
        if lora.merge_before_training and not lora.load_path:
            p.append(f"model.{role}.merge_before_training is true but model.{role}.load_path is empty: "
                     f"give the adapter to merge or set merge_before_training: false")
        if not lora.enabled and (lora.load_path or lora.merge_before_training):
            p.append(f"model.{role}.enabled is false (full fine-tuning) but load_path/merge_before_training "
                     f"are set: enable the LoRA or clear them")

    # sampling
    steps = s.denoising_step_list
    if not steps:
        p.append("sampling.denoising_step_list is empty: e.g. [1000, 750, 500, 250]")
    else:
        if any(not 0 < t <= 1000 for t in steps):
            p.append(f"sampling.denoising_step_list={list(steps)}: every timestep must be in (0, 1000]")
        if any(a <= b for a, b in zip(steps, steps[1:], strict=False)):
            p.append(f"sampling.denoising_step_list={list(steps)} must be strictly decreasing")
    if not 1 <= s.num_steps <= len(steps):
        p.append(f"sampling.num_steps={s.num_steps} must be in [1, {len(steps)}] "
                 f"(len(sampling.denoising_step_list)={len(steps)})")
    for path, eta in (("sampling.eta", s.eta), ("ac_dmd.transition_eta", cfg.ac_dmd.transition_eta),
                      ("eval.noise_level", cfg.eval.noise_level)):
        if not 0.0 <= eta <= 1.0:
            p.append(f"{path}={eta} must be in [0, 1] (0 = deterministic, 1 = fresh noise)")

    # rewards: names known, weights finite
    def reward_names(path: str, names: Iterable[str]) -> None:
        for name in names:
            if name not in KNOWN_REWARDS:
                hint = difflib.get_close_matches(name, sorted(KNOWN_REWARDS), n=1)
                sugg = f"did you mean '{hint[0]}'? " if hint else ""
                p.append(f"{path}: unknown reward '{name}': {sugg}known: {', '.join(sorted(KNOWN_REWARDS))}")

    def weights(path: str, w: Mapping[str, float]) -> None:
        reward_names(path, w)
        for name, value in w.items():
            if not math.isfinite(value):
                p.append(f"{path}.{name}={value} must be finite")

    weights("rewards.weights", cfg.rewards.weights)
    weights("eval.reward_weights", cfg.eval.reward_weights)
    weights("last_step_loss.bp.reward_weights", cfg.last_step_loss.bp.reward_weights)
    reward_names("rewards.devices", cfg.rewards.devices)
    reward_names("rewards.batch_images", cfg.rewards.batch_images)
    reward_names("rewards.options", cfg.rewards.options)
    reward_names("eval.dataset_map", cfg.eval.dataset_map)
    for name, n in cfg.rewards.batch_images.items():
        positive(f"rewards.batch_images.{name}", n)
    dev_re = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
    for path, dev in [("rewards.device", cfg.rewards.device),
                      *((f"rewards.devices.{k}", v) for k, v in cfg.rewards.devices.items())]:
        if not dev_re.match(dev):
            p.append(f"{path}='{dev}' must be auto, cpu, cuda or cuda:N")

    # resources, sync
    for role in ("sampler", "reward_worker", "learner", "eval_worker"):
        rr: RoleResourcesConfig = getattr(res, role)
        positive(f"resources.{role}.count", rr.count)
        positive(f"resources.{role}.cpus_per_actor", rr.cpus_per_actor, zero_ok=True)
        positive(f"resources.{role}.gpus_per_actor", rr.gpus_per_actor, zero_ok=True)
        if rr.gpus_per_actor > 1 and not float(rr.gpus_per_actor).is_integer():
            p.append(f"resources.{role}.gpus_per_actor={rr.gpus_per_actor}: above 1 it must be whole")
        if rr.max_restarts < -1 or rr.max_task_retries < -1:
            p.append(f"resources.{role}.max_restarts / max_task_retries must be >= -1 (-1 = forever)")
        if role == "learner" and (rr.max_restarts != 0 or rr.max_task_retries != 0):
            p.append(f"resources.learner.max_restarts={rr.max_restarts} / max_task_retries="
                     f"{rr.max_task_retries}: must be 0, a restarted learner rank cannot rejoin its "
                     "process group; a dead rank ends the run with LearnerFailure and train.resume: auto "
                     "continues from the last checkpoint")
        elif rr.max_task_retries != 0 and rr.max_restarts == 0:
            p.append(f"resources.{role}.max_task_retries={rr.max_task_retries} has no effect with "
                     f"max_restarts=0: Ray retries calls only on restarted actors; set "
                     f"resources.{role}.max_restarts")
        for name, amount in rr.custom.items():
            key = f"resources.{role}.custom.{name}"
            if name in RAY_BUILTIN_RESOURCES:
                fix = ("use cpus_per_actor / gpus_per_actor" if name in ("CPU", "GPU")
                       else "Ray's memory resources are not reserved per role")
                p.append(f"{key}: '{name}' is a Ray built-in resource, not a custom one: {fix}")
            elif not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
                p.append(f"{key}: '{name}' is not a resource name: use letters, digits, '_', '-', '.' "
                         "(e.g. rtdmd_reward)")
            positive(key, amount, zero_ok=True)
    positive("resources.fsdp_shard_ranks", res.fsdp_shard_ranks, zero_ok=True)
    if res.fsdp_shard_ranks and res.learner.count % res.fsdp_shard_ranks:
        p.append(f"resources.learner.count={res.learner.count} is not divisible by "
                 f"resources.fsdp_shard_ranks={res.fsdp_shard_ranks} (hybrid sharding needs whole groups)")
    if res.fsdp_shard_ranks and res.learner_parallelism != "fsdp2":
        p.append("resources.fsdp_shard_ranks is set but resources.learner_parallelism is ddp: "
                 "use fsdp2 or set it to 0")
    positive("sync.bucket_mib", cfg.sync.bucket_mib)
    positive("sync.timeout_s", cfg.sync.timeout_s)

    # solver, train, eval, logging
    for role in ("generator", "fake_score"):
        sv: SolverConfig = getattr(cfg.solver, role)
        positive(f"solver.{role}.lr", sv.lr)
        positive(f"solver.{role}.warmup_steps", sv.warmup_steps, zero_ok=True)
        positive(f"solver.{role}.eps", sv.eps)
        positive(f"solver.{role}.weight_decay", sv.weight_decay, zero_ok=True)
        positive(f"solver.{role}.max_grad_norm", sv.max_grad_norm, zero_ok=True)
        for b in ("beta1", "beta2"):
            if not 0.0 <= getattr(sv, b) < 1.0:
                p.append(f"solver.{role}.{b}={getattr(sv, b)} must be in [0, 1)")
    t = cfg.train
    positive("train.iterations", t.iterations)
    positive("train.keep_last_checkpoints", t.keep_last_checkpoints)
    positive("train.save_every_iterations", t.save_every_iterations)
    positive("train.log_every_iterations", t.log_every_iterations)
    if not t.resume.strip():
        p.append("train.resume is empty: use auto, never, or a checkpoint path")
    if not t.output_dir.strip():
        p.append("train.output_dir is empty: give a run directory")
    if not 0.0 <= t.ema.decay < 1.0:
        p.append(f"train.ema.decay={t.ema.decay} must be in [0, 1)")
    positive("train.ema.interval_steps", t.ema.interval_steps)
    e = cfg.eval
    positive("eval.every_iterations", e.every_iterations)
    positive("eval.batch_images", e.batch_images)
    positive("eval.num_prompts", e.num_prompts, zero_ok=True)
    positive("eval.log_images", e.log_images, zero_ok=True)
    positive("eval.guidance_scale", e.guidance_scale)
    positive("eval.num_steps", e.num_steps)
    if e.mode == "distilled" and e.num_steps > len(steps):
        p.append(f"eval.num_steps={e.num_steps} exceeds the distilled schedule "
                 f"(len(sampling.denoising_step_list)={len(steps)}); use eval.mode: teacher for more steps")
    if (e.enabled or cfg.stage == "inference") and not e.reward_weights:
        p.append("eval.reward_weights is empty: name at least one eval reward (or set eval.enabled: false)")
    unrouted = [r for r in e.reward_weights if r not in e.dataset_map]
    if ((e.enabled or cfg.stage == "inference") and cfg.data.kind == "prompt_file" and unrouted
            and not e.prompt_file):
        p.append(f"eval.prompt_file is empty and eval.dataset_map has no prompt file for "
                 f"{', '.join(unrouted)}: "
                 "set eval.prompt_file or route those rewards in eval.dataset_map")

    # data
    d = cfg.data
    if d.kind == "inline" and not d.prompts:
        p.append("data.kind is inline but data.prompts is empty: list the prompts or use prompt_file")
    if d.kind == "prompt_file" and not d.train_prompt_file and cfg.stage != "inference":
        p.append("data.kind is prompt_file but data.train_prompt_file is empty")
    if d.balance_tags and d.kind == "inline":
        p.append("data.balance_tags needs records with a \"tag\" (kind shapes or a jsonl prompt file); "
                 "inline prompts have none: set data.balance_tags: false")
    if d.kind == "shapes" and m.backbone != "shapes":
        p.append(f"data.kind is shapes but model.backbone is {m.backbone}: ShapeWorld captions need "
                 "backbone shapes")

    # stage-specific arithmetic
    if cfg.stage == "cold_start":
        dm = cfg.dmd
        positive("dmd.prompts_per_step", dm.prompts_per_step)
        positive("dmd.fake_update_ratio", dm.fake_update_ratio)
        if dm.prompts_per_step > 0 and res.learner.count > 0 and dm.prompts_per_step % res.learner.count:
            p.append(f"dmd.prompts_per_step={dm.prompts_per_step} is not divisible by "
                     f"resources.learner.count={res.learner.count} "
                     f"({dm.prompts_per_step}/{res.learner.count} = "
                     f"{dm.prompts_per_step / res.learner.count:g} prompts per rank)")
        if dm.stop_loss_weights:
            if len(dm.stop_loss_weights) != s.num_steps:
                p.append(f"dmd.stop_loss_weights has {len(dm.stop_loss_weights)} entries but "
                         f"sampling.num_steps={s.num_steps}: give one weight per stop k = 1..{s.num_steps}, "
                         "or [] for all 1")
            for k, w in enumerate(dm.stop_loss_weights, start=1):
                if not w > 0:
                    p.append(f"dmd.stop_loss_weights[{k - 1}]={w} (stop k={k}) must be > 0")
    elif cfg.dmd.stop_loss_weights:
        p.append(f"dmd.stop_loss_weights is set but stage is {cfg.stage}: it weights the cold start's random "
                 "stops only (the RL aux loss always uses the last step); use []")
    if cfg.stage in ("cold_start", "rtdmd"):
        if cfg.dmd.teacher_guidance_min > cfg.dmd.teacher_guidance_max:
            p.append(f"dmd.teacher_guidance_min={cfg.dmd.teacher_guidance_min} > dmd.teacher_guidance_max="
                     f"{cfg.dmd.teacher_guidance_max}")
        a = cfg.ac_dmd
        if not 0 <= a.min_renoise_step < a.max_renoise_step <= 999:
            p.append(f"ac_dmd renoise clamp [min_renoise_step={a.min_renoise_step}, max_renoise_step="
                     f"{a.max_renoise_step}] must satisfy 0 <= min < max <= 999")
        if a.fake_loss_weight_min > a.fake_loss_weight_max:
            p.append(f"ac_dmd.fake_loss_weight_min={a.fake_loss_weight_min} > fake_loss_weight_max="
                     f"{a.fake_loss_weight_max}")
        positive("ac_dmd.consistency_weight", a.consistency_weight, zero_ok=True)
        positive("ac_dmd.consistency_max_jump_timesteps", a.consistency_max_jump_timesteps)
        positive("ac_dmd.consistency_num_steps", a.consistency_num_steps)
        if cfg.stage == "rtdmd" and a.fake_target != "path":
            p.append(f"ac_dmd.fake_target={a.fake_target!r} is a cold-start option: the RL fake-score update "
                     "trains on stored rollout latents without their x0-predictions; set it to 'path'")
        if a.start_mode == "fixed_boundary" and not 0 <= a.boundary_sigma_index < s.num_steps:
            p.append(f"ac_dmd.boundary_sigma_index={a.boundary_sigma_index} must be in "
                     f"[0, {s.num_steps - 1}] (sampling.num_steps={s.num_steps})")
    if cfg.stage == "rtdmd":
        _check_rtdmd(cfg, p, positive)
    return p


def _check_rtdmd(cfg: Config, p: list[str], positive: Any) -> None:
    g, res, s = cfg.grpo, cfg.resources, cfg.sampling
    for name in ("prompts_per_step", "images_per_prompt", "sample_batches_per_epoch",
                 "micro_batch_images_per_rank", "optimizer_steps_per_epoch", "inner_epochs"):
        positive(f"grpo.{name}", getattr(g, name))
    for name in ("sampler_micro_batch_images", "vae_decode_micro_batch_images"):
        positive(f"grpo.{name}", getattr(g, name), zero_ok=True)
    positive("grpo.clip_range_low", g.clip_range_low)
    positive("grpo.clip_range_high", g.clip_range_high)
    positive("grpo.adv_clip_max", g.adv_clip_max)
    if g.images_per_prompt == 1:
        p.append("grpo.images_per_prompt=1: group-normalised advantages need at least 2 images per prompt")
    if g.max_policy_lag not in (0, 1):
        p.append(f"grpo.max_policy_lag={g.max_policy_lag} must be 0 (on-policy) or 1 (one-step pipelined)")
    if min(g.prompts_per_step, g.images_per_prompt, res.sampler.count, res.learner.count) <= 0:
        return  # the arithmetic below needs positive counts (already reported)
    ips = g.images_per_step
    if ips % res.sampler.count:
        p.append(f"grpo.images_per_step={ips} (prompts_per_step={g.prompts_per_step} x images_per_prompt="
                 f"{g.images_per_prompt}) is not divisible by resources.sampler.count={res.sampler.count}")
    if ips % res.learner.count:
        p.append(f"grpo.images_per_step={ips} (prompts_per_step={g.prompts_per_step} x images_per_prompt="
                 f"{g.images_per_prompt}) is not divisible by resources.learner.count={res.learner.count}")
    elif g.micro_batch_images_per_rank > 0 and g.optimizer_steps_per_epoch > 0:
        per_rank = g.samples_per_epoch // res.learner.count
        mb = g.micro_batch_images_per_rank
        if per_rank % mb:
            p.append(f"images per learner rank per epoch = {g.samples_per_epoch} samples / "
                     f"{res.learner.count} ranks = {per_rank} is not divisible by "
                     f"grpo.micro_batch_images_per_rank={mb}")
        elif (per_rank // mb) % g.optimizer_steps_per_epoch:
            p.append(f"{per_rank // mb} micro-batches per rank per epoch ({per_rank} images / {mb}) do not "
                     f"split evenly into grpo.optimizer_steps_per_epoch={g.optimizer_steps_per_epoch}")
    if ips % res.sampler.count == 0:
        share = ips // res.sampler.count
        if g.sampler_micro_batch_images and share % g.sampler_micro_batch_images:
            p.append(f"images per sampler per step = {ips} / {res.sampler.count} samplers = {share} is not "
                     f"divisible by grpo.sampler_micro_batch_images={g.sampler_micro_batch_images}")
    # step selection and aux steps index the num_steps-step trajectory
    ss = g.step_selection
    last_stochastic = s.num_steps - 2
    if not 0 <= ss.range_start <= ss.range_end <= last_stochastic:
        p.append(f"grpo.step_selection range [{ss.range_start}, {ss.range_end}] must lie in "
                 f"[0, {last_stochastic}]: with sampling.num_steps={s.num_steps} the stochastic steps are "
                 f"0..{last_stochastic} (the last step is deterministic, its PPO ratio is 1)")
    elif ss.enabled and not 1 <= ss.num_train_steps <= ss.num_candidates:
        p.append(f"grpo.step_selection.num_train_steps={ss.num_train_steps} must be in "
                 f"[1, {ss.num_candidates}] (range [{ss.range_start}, {ss.range_end}] has "
                 f"{ss.num_candidates} steps)")
    lsl = cfg.last_step_loss
    for j in lsl.train_steps:
        if not -s.num_steps <= j < s.num_steps:
            p.append(f"last_step_loss.train_steps has {j}: indices must be in "
                     f"[{-s.num_steps}, {s.num_steps - 1}] (sampling.num_steps={s.num_steps}; -1 = last)")
    if lsl.loss_type != "none" and not lsl.train_steps:
        p.append(f"last_step_loss.train_steps is empty but loss_type is {lsl.loss_type}: e.g. [-1]")
    positive("last_step_loss.weight", lsl.weight, zero_ok=True)
    positive("last_step_loss.fake_score_micro_batch_images", lsl.fake_score_micro_batch_images, zero_ok=True)
    if not 0 < lsl.aux_sample_fraction <= 1:
        p.append(f"last_step_loss.aux_sample_fraction={lsl.aux_sample_fraction} must be in (0, 1] "
                 "(1 = the aux terms on every sample)")
    bp = lsl.bp
    if bp.enabled:
        if not bp.reward_weights:
            p.append("last_step_loss.bp.enabled but last_step_loss.bp.reward_weights is empty: name "
                     f"differentiable rewards ({', '.join(sorted(DIFFERENTIABLE_REWARDS))}) or set "
                     "bp.enabled: false")
        for name in bp.reward_weights:
            if name in KNOWN_REWARDS and name not in DIFFERENTIABLE_REWARDS:
                p.append(f"last_step_loss.bp.reward_weights.{name}: {name} is not differentiable; BP "
                         f"supports {', '.join(sorted(DIFFERENTIABLE_REWARDS))}")
        positive("last_step_loss.bp.grad_scale", bp.grad_scale)
        positive("last_step_loss.bp.micro_batch_images", bp.micro_batch_images, zero_ok=True)
    if not cfg.rewards.weights:
        p.append("rewards.weights is empty: the RL stage needs at least one training reward")


# --------------------------------------------------------------------------------------------- schema helpers
@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"map of {{str: {_type_name(typing.get_args(tp)[1])}}}"
    if _is_dataclass_type(tp):
        return "a mapping (section)"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@cache
def _all_paths(cls: type) -> tuple[str, ...]:
    """Every dotted key of the schema under ``cls`` (sections and leaves), for cross-section suggestions."""
    out: list[str] = []
    for name, tp in _hints(cls).items():
        out.append(name)
        if _is_dataclass_type(tp):
            out.extend(f"{name}.{sub}" for sub in _all_paths(tp))
    return tuple(out)


def _unknown_key(prefix: str, key: str, cls: type, where: str) -> ConfigError:
    full = f"{prefix}{key}"
    valid = _fields(cls)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean '{prefix}{close[0]}'?"
    else:
        # the key may belong to another section: compare leaf names over the whole schema
        leaves = {p.rsplit(".", 1)[-1]: p for p in _all_paths(Config)}
        other = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.75)
        hint = (f"did you mean '{leaves[other[0]]}'?" if other
                else f"valid keys of '{prefix.rstrip('.') or 'the top level'}': {', '.join(valid)}")
    return ConfigError(f"unknown key '{full}'{where}: {hint}")


def _coerce(value: Any, tp: Any, path: str, where: str) -> Any:
    """``value`` converted to the field type ``tp`` (lossless conversions only), else ConfigError."""

    def bad(expected: str | None = None) -> ConfigError:
        return ConfigError(f"'{path}'{where}: expected {expected or _type_name(tp)}, got "
                           f"{type(value).__name__} {_show(value)}")

    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad()
        return _build(tp, value, f"{path}.", where)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        # exact type first (a str|int|float|bool option keeps its YAML type), then coercions in order
        for a in members:
            if type(value) is a:
                return value
        for a in members:
            try:
                return _coerce(value, a, path, where)
            except ConfigError:
                continue
        raise bad()
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[0]):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        options = ", ".join(map(str, choices))
        raise ConfigError(f"'{path}'{where}: {_show(value)} is not one of {options}{hint}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise bad()
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]", where) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad()
        key_tp, val_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"'{path}'{where}: keys must be strings, got {type(k).__name__} {_show(k)}")
            out[k] = _coerce(v, val_tp, f"{path}.{k}", where)
        return FrozenDict(out)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("bool (true or false)")
    if tp is int:
        if _is_int(value):
            return value
        num = _number(value)
        if num is not None and math.isfinite(num) and float(num).is_integer():
            return int(num)
        raise bad("int")
    if tp is float:
        if isinstance(value, float):
            return value
        if _is_int(value):
            return float(value)
        num = _number(value)
        if num is not None:
            return num
        raise bad("float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("str (quote it in YAML)")
    raise ConfigError(f"'{path}': unsupported field type {tp!r} (a bug in rtdmd_ray/config.py)")


def _number(value: Any) -> float | None:
    """A float from an int/float or a numeric string (PyYAML reads ``3e-6`` as a string); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _build(cls: type, raw: Mapping[str, Any], prefix: str = "", where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a raw mapping: unknown keys and wrong types raise ConfigError."""
    hints = _hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in hints:
            raise _unknown_key(prefix, str(key), cls, where)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", where)
    return cls(**kwargs)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any], cls: type | None) -> dict[str, Any]:
    """``over`` on top of ``base``: sections merge key by key, any other value is replaced whole."""
    out = dict(base)
    hints = _hints(cls) if cls is not None else {}
    for key, value in over.items():
        sub = hints.get(key)
        if _is_dataclass_type(sub) and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value, sub)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------- YAML + overrides
INHERIT_KEY = "inherit"


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of ``path`` with its ``inherit`` chain merged in (schema-guided)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"inherit cycle: {cycle}")
    if not path.is_file():
        hint = f" (inherited from {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{hint}")
    try:
        raw = yaml.load(path.read_text(), Loader=_YAML_LOADER) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    parents = raw.pop(INHERIT_KEY, None)
    # key and type errors name the file that holds the bad key, not the file that inherits it
    _build(Config, raw, "", f" in {_display(path)}")
    if parents is None:
        return raw
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(x, str) for x in parents):
        raise ConfigError(f"{path}: '{INHERIT_KEY}' must be a file path or a list of file paths")
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = _merge(merged, _read_yaml(path.parent / parent, (*chain, path)), Config)
    return _merge(merged, raw, Config)


def _display(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter error messages)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _field_type_at(parts: list[str], item: str) -> Any:
    """The schema type at a dotted override path, or ConfigError naming the unknown part."""
    tp: Any = Config
    for i, part in enumerate(parts):
        prefix = "".join(f"{p}." for p in parts[:i])
        if _is_dataclass_type(tp):
            hints = _hints(tp)
            if part not in hints:
                raise _unknown_key(prefix, part, tp, f" (override '{item}')")
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            raise ConfigError(f"override '{item}': '{prefix.rstrip('.')}' is a {_type_name(tp)} value; it "
                              f"has no sub-key '{part}'")
    return tp


def _parse_override_value(text: str, tp: Any) -> Any:
    """YAML flow parsing of an override value; string fields take the text verbatim."""
    plain = tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        plain = args[0] if len(args) == 1 else tp
    literal_str = typing.get_origin(plain) is Literal and all(
        isinstance(c, str) for c in typing.get_args(plain))
    if plain is str or literal_str:
        if text in ("null", "~") and plain is not tp:
            return None
        return text
    try:
        return yaml.load(text, Loader=_YAML_LOADER) if text.strip() else None
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"override value '{text}' is not valid YAML: {reason}") from None


def _apply_override(raw: dict[str, Any], item: str) -> dict[str, Any]:
    """``raw`` with one ``a.b.c=value`` override set (a new mapping; ``raw`` is not modified)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. train.seed=3)")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override '{item}': the key '{key}' has an empty part")
    leaf_tp = _field_type_at(parts, item)
    value = _parse_override_value(text, leaf_tp)
    root = dict(raw)
    node, tp = root, Config
    for part in parts[:-1]:
        if _is_dataclass_type(tp):
            next_tp = _hints(tp)[part]
            # entering a {name: value} map the file left at its default: start from that default, so the
            # override adds or replaces one entry instead of dropping the others
            default = to_dict(getattr(tp(), part)) if typing.get_origin(next_tp) is dict else {}
        else:
            next_tp, default = typing.get_args(tp)[1], {}
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, Mapping) else default
        node, tp = node[part], next_tp
    last = parts[-1]
    if _is_dataclass_type(leaf_tp) and isinstance(value, Mapping) and isinstance(node.get(last), Mapping):
        node[last] = _merge(node[last], value, leaf_tp)
    else:
        node[last] = value
    return root


def _build_config(raw: Mapping[str, Any], overrides: Iterable[str], where: str, validate: bool) -> Config:
    raw = dict(raw)
    if INHERIT_KEY in raw:
        raise ConfigError(f"'{INHERIT_KEY}' is only allowed in a YAML file, not in a mapping or override")
    overrides = list(overrides)
    for item in overrides:
        raw = _apply_override(raw, item)
    try:
        cfg = _build(Config, raw, "", where)
    except ConfigError as exc:
        # name the override responsible when the bad key or value came from the command line
        msg = str(exc)
        for item in reversed(overrides):
            key = item.split("=", 1)[0].strip()
            if f"'{key}'" in msg or f"'{key}." in msg or f"'{key}[" in msg:
                msg = (msg.replace(where, "", 1) if where else msg) + f" (set by override '{item}')"
                break
        raise ConfigError(msg) from None
    return cfg.validate() if validate else cfg


def load_config(path: str | Path, overrides: Iterable[str] = (), *, validate: bool = True) -> Config:
    """Load a YAML config (with its ``inherit`` chain), apply ``a.b=value`` overrides, and validate.

    Args:
        path: YAML file.
        overrides: dot-notation overrides applied in order, after the file.
        validate: run ``Config.validate()`` (False: key/type checks only, e.g. for partial files).

    Raises:
        ConfigError: one line naming the key path and the fix (unknown key with the closest valid key, wrong
            type with the expected type, or the failed cross-field checks with their numbers).
    """
    raw = _read_yaml(Path(path))
    return _build_config(raw, overrides, f" in {path}", validate)


def config_from_dict(
    raw: Mapping[str, Any], overrides: Iterable[str] = (), *, validate: bool = True
) -> Config:
    """``load_config`` for an in-memory mapping (tests, programmatic runs)."""
    return _build_config(raw, overrides, "", validate)


def apply_overrides(cfg: Config, overrides: Iterable[str], *, validate: bool = True) -> Config:
    """A new config: ``cfg`` with dot-notation overrides applied (the frozen original is unchanged)."""
    return _build_config(to_dict(cfg), overrides, "", validate)


# --------------------------------------------------------------------------------------------- dump
def to_dict(obj: Any) -> Any:
    """Plain Python (dict/list/scalars) of a config or section, in field order."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` parsed from the Google-style ``Attributes:`` section of ``cls``'s
    docstring."""
    doc = cls.__doc__ or ""
    lines = doc.splitlines()
    out: dict[str, str] = {}
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Attributes:")
    except StopIteration:
        return out
    indent = None
    current = None
    for ln in lines[start + 1:]:
        if not ln.strip():
            continue
        ind = len(ln) - len(ln.lstrip())
        if indent is None:
            indent = ind
        if ind < indent:
            break
        m = re.match(r"^(\w+): (.*)$", ln.strip())
        if ind == indent and m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current is not None:
            out[current] += " " + ln.strip()
    return out


def _flow(value: Any) -> str:
    """One YAML flow value (scalar, [list] or {map}) that safe_load reads back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=False)
    text = text.strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    elif text.endswith("..."):
        text = text[:-3].rstrip()
    return text


def _dump_section(obj: Any, indent: int, comments: bool, lines: list[str]) -> None:
    docs = field_docs(type(obj)) if comments else {}
    pad = " " * indent
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if comments and f.name in docs:
            width = max(40, 110 - indent - 2)
            lines.extend(f"{pad}# {ln}" for ln in textwrap.wrap(docs[f.name], width, break_on_hyphens=False))
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            _dump_section(value, indent + 2, comments, lines)
        else:
            _dump_value(f.name, to_dict(value), indent, lines)


def _dump_value(key: str, value: Any, indent: int, lines: list[str]) -> None:
    """``key: value``: non-empty maps in block style (an entry per line), everything else in flow style."""
    pad = " " * indent
    if isinstance(value, dict) and value:
        lines.append(f"{pad}{_flow(key)}:")
        for k, v in value.items():
            _dump_value(k, v, indent + 2, lines)
    else:
        lines.append(f"{pad}{_flow(key)}: {_flow(value)}")


def dump_yaml(cfg: Config, *, comments: bool = False) -> str:
    """The fully resolved config as YAML; ``load_config`` of the text gives an equal config.

    Args:
        cfg: the config.
        comments: put each field's description (from the section docstrings) on a comment line above it.
    """
    lines = ([f"# {ln}" for ln in textwrap.wrap(f"rtdmd-ray resolved config: {cfg.summary()}", 108)]
             if comments else [])
    _dump_section(cfg, 0, comments, lines)
    return "\n".join(lines) + "\n"


REFERENCE_SOURCE = "configs/rtdmd/sd35m.yaml"


def reference_yaml() -> str:
    """The text of configs/reference.yaml: every key with its description, values of the SD3.5-M RL config."""
    cfg = load_config(REPO_ROOT / REFERENCE_SOURCE)
    head = (f"# GENERATED by `python -m rtdmd_ray.config reference` from {REFERENCE_SOURCE}: every\n"
            "# config key with its description. Do not edit: a test fails when it drifts from config.py.\n")
    return head + dump_yaml(cfg, comments=True)


def _main(argv: list[str]) -> int:
    if argv == ["reference"]:
        (REPO_ROOT / "configs" / "reference.yaml").write_text(reference_yaml())
        print("wrote configs/reference.yaml")
        return 0
    print("usage: python -m rtdmd_ray.config reference  (rewrites configs/reference.yaml)", file=sys.stderr)
    return 2


__all__ = [
    "ACDMDConfig", "BPConfig", "Config", "ConfigError", "DMDConfig", "DataConfig", "EMAConfig", "EvalConfig",
    "FrozenDict", "GRPOConfig", "InferenceConfig", "LastStepLossConfig", "LoRAConfig", "LoggingConfig",
    "ModelConfig", "ResourcesConfig", "RewardsConfig", "RoleResourcesConfig", "SamplingConfig",
    "SolverConfig", "SolversConfig", "StepSelectionConfig", "SyncConfig", "TrainConfig", "apply_overrides",
    "config_from_dict",
    "dump_yaml", "field_docs", "load_config", "reference_yaml", "resolve_path", "to_dict",
]

if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))

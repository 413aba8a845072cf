"""The schema: one frozen section class per YAML section, ``Config`` on top, and ``resolve_path``.

Over 600 lines on purpose: this is the whole schema in one place, one class per section whose docstring
``Attributes:`` are the field documentation (they become the comments of ``dump_yaml(cfg, comments=True)``
and configs/reference.yaml); splitting it would scatter one table. The classes are pydantic v2 dataclasses
(fieldtypes.section: frozen, unknown keys forbidden) and still ``dataclasses`` dataclasses, so
``dataclasses.fields`` / ``replace``, hashing and equality work as before. Derived values are properties
(``grpo.images_per_step``, ``Config.images_per_rank_per_epoch``), never fields; ``Config.validate()`` runs
the cross-field rules of rules.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from rtdmd_ray.config.errors import ConfigError
from rtdmd_ray.config.fieldtypes import (
    Bool,
    Float,
    FrozenDict,
    Int,
    Map,
    Scalar,
    Str,
    Tuple,
    field,
    section,
)
from rtdmd_ray.config.registries import (
    BACKBONE_FAMILY,
    DEFAULT_LORA_TARGETS,
    SERVE_DEPLOYMENT_FIELDS,
    Backbone,
    PlacementStrategy,
)
from rtdmd_ray.config.rules import check

REPO_ROOT = Path(__file__).resolve().parents[2]


@section
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

    enabled: Bool = True
    rank: Int = 32
    alpha: Float = 64.0
    target_modules: Tuple[Str] = ()
    init: Literal["gaussian", "kaiming_uniform"] = "gaussian"
    load_path: Str = ""
    load_strict: Bool = True
    merge_before_training: Bool = False
    reinit_a_std: Float | None = None

    @property
    def scale(self) -> float:
        """The adapter scaling alpha / rank."""
        return self.alpha / self.rank


@section
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
    pretrained_path: Str = ""
    generator_init_path: Str = ""
    fake_score_init_path: Str = ""
    teacher_init_path: Str = ""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    resolution_px: Int = 512
    gradient_checkpointing: Bool = True
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


@section
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

    denoising_step_list: Tuple[Int] = (1000, 750, 500, 250)
    num_steps: Int = 4
    eta: Float = 0.9

    @property
    def stochastic_steps(self) -> int:
        """Steps with injected noise: all but the last, which lands on sigma = 0 deterministically."""
        return self.num_steps - 1


@section
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

    prompts_per_step: Int = 72
    fake_update_ratio: Int = 10
    random_stop: Bool = True
    teacher_guidance_min: Float = 4.5
    teacher_guidance_max: Float = 4.5
    gradient_normalization: Bool = True
    normalization: Literal["reference", "clean"] = "reference"
    stop_loss_weights: Tuple[Float] = ()


@section
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
    boundary_sigma_index: Int = 2
    end_timestep: Float = 1000.0
    timestep_offset: Float = 10.0
    include_terminal_without_random_stop: Bool = True
    min_renoise_step: Int = 20
    max_renoise_step: Int = 980
    renoise_clamp: Literal["above_start", "reference"] = "above_start"
    transition_eta: Float = 0.9
    move_scale_out: Bool = True
    fake_target: Literal["path", "x0"] = "path"
    fake_loss_weight_min: Float = 0.0
    fake_loss_weight_max: Float = 10.0
    consistency_weight: Float = 0.01
    consistency_max_jump_timesteps: Int = 200
    consistency_num_steps: Int = 1
    consistency_two_sample: Bool = True
    consistency_stopgrad_transitions: Bool = True


@section
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

    enabled: Bool = True
    range_start: Int = 0
    range_end: Int = 2
    num_train_steps: Int = 2

    @property
    def num_candidates(self) -> int:
        return self.range_end - self.range_start + 1


@section
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

    prompts_per_step: Int = 3
    images_per_prompt: Int = 24
    sample_batches_per_epoch: Int = 16
    sampler_micro_batch_images: Int = 0
    vae_decode_micro_batch_images: Int = 4
    micro_batch_images_per_rank: Int = 9
    optimizer_steps_per_epoch: Int = 1
    inner_epochs: Int = 1
    sde_type: Literal["cps", "sde"] = "cps"
    log_prob: Literal["reference", "gaussian"] = "reference"
    clip_range_low: Float = 1e-5
    clip_range_high: Float = 1e-5
    adv_clip_max: Float = 5.0
    max_policy_lag: Int = 0
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


@section
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

    enabled: Bool = True
    reward_weights: Map[Float] = field(
        default_factory=lambda: FrozenDict({"clipscore": 1.0, "hpsv2": 1.0, "pickscore": 1.0}))
    margin: Float = 3.0
    grad_scale: Float = 1e-4
    only_deterministic: Bool = True
    micro_batch_images: Int = 0


@section
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
    train_steps: Tuple[Int] = (-1,)
    weight: Float = 1e-3
    fake_score_micro_batch_images: Int = 0
    aux_sample_fraction: Float = 1.0
    bp: BPConfig = field(default_factory=BPConfig)


@section
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

    lr: Float = 3e-5
    warmup_steps: Int = 0
    beta1: Float = 0.9
    beta2: Float = 0.999
    eps: Float = 1e-8
    weight_decay: Float = 0.0
    max_grad_norm: Float = 1.0


@section
class SolversConfig:
    """Optimisers per role. The RL stage's generator uses solver.generator too (the reference used grpo.*).

    Attributes:
        generator: optimiser of the generator's LoRA (cold start and RL).
        fake_score: optimiser of the fake score's LoRA.
    """

    generator: SolverConfig = field(default_factory=SolverConfig)
    fake_score: SolverConfig = field(default_factory=SolverConfig)


@section
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

    enabled: Bool = True
    decay: Float = 0.99
    interval_steps: Int = 1
    warmup: Bool = False
    update: Literal["per_optimizer_step", "reference"] = "per_optimizer_step"


@section
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

    iterations: Int = 100_000
    seed: Int = 42
    output_dir: Str = "outputs/run"
    resume: Str = "auto"
    keep_last_checkpoints: Int = 3
    save_every_iterations: Int = 5000
    log_every_iterations: Int = 1
    autocast_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    trainable_param_dtype: Literal["fp32", "model"] = "fp32"
    ema: EMAConfig = field(default_factory=EMAConfig)


@section
class RewardServeConfig:
    """Ray Serve deployments of the training rewards (``rewards.serving: serve``): one deployment per reward,
    each with its own replicas, resources and micro-batching, autoscaled on its queue.

    Attributes:
        min_replicas: replicas a reward keeps while idle (>= 1: a job never waits for a cold start).
        max_replicas: replicas a reward may grow to while its queue is backed up.
        target_ongoing_requests: queued + running images per replica that autoscaling aims for; 0 = the
            reward's ``rewards.batch_images`` (one micro-batch waiting per replica).
        cpus_per_replica: logical CPUs each replica reserves.
        gpus_per_replica: GPUs each replica reserves (fractions share a GPU).
        batch_wait_timeout_s: how long a replica waits to fill a micro-batch of ``rewards.batch_images``.
        upscale_delay_s: how long the queue must stay above target before replicas are added.
        downscale_delay_s: how long the queue must stay below target before replicas are removed.
        per_reward: overrides of the fields above per reward {name: {field: value}}, e.g.
            {geneval2: {gpus_per_replica: 1, max_replicas: 4}}.
        runtime_env: a Ray runtime_env per reward {name: {pip: [...], env_vars: {...}}}: a reward with
            conflicting pins (GenEval's mmdet 2.x) gets its own environment.
        custom: custom Ray resources every reward replica asks for {name: amount}, e.g. {rtdmd_reward: 0.25}
            pins the replicas to the cluster's reward node group (whose autoscaler then adds nodes for them).
        custom_per_reward: a reward's own custom resources, replacing `custom` for it {reward: {name:
            amount}}, e.g. {ocr: {rtdmd_reward_cpu: 1}} (with per_reward.ocr.gpus_per_replica: 0) puts OCR on
            the CPU reward nodes.
        app_name: the Serve application a run starts ("" = "rtdmd-rewards-<pid>"); `rtdmd-ray
            serve-rewards` starts it under this name for `rewards.serve_app` to attach to.
        judge: the GenEval2 judge's own Serve app, started by the run (or `serve-rewards`) when
            `rewards.options.geneval2.serve_app` names an app that is not running: engine (transformers |
            vllm: Ray Serve LLM), model, replicas, resources, engine_kwargs (roles/judge_serve.py).
    """

    min_replicas: Int = 1
    max_replicas: Int = 1
    target_ongoing_requests: Float = 0.0
    cpus_per_replica: Float = 1.0
    gpus_per_replica: Float = 0.0
    batch_wait_timeout_s: Float = 0.01
    upscale_delay_s: Float = 2.0
    downscale_delay_s: Float = 30.0
    per_reward: Map[Map[Scalar]] = field(default_factory=FrozenDict)
    runtime_env: Map[Map[Any]] = field(default_factory=FrozenDict)
    custom: Map[Float] = field(default_factory=FrozenDict)
    custom_per_reward: Map[Map[Float]] = field(default_factory=FrozenDict)
    app_name: Str = ""
    judge: Map[Any] = field(default_factory=FrozenDict)

    def custom_for(self, name: str) -> dict[str, float]:
        """The custom Ray resources one replica of reward ``name`` asks for."""
        return {k: float(v) for k, v in self.custom_per_reward.get(name, self.custom).items()}

    def for_reward(self, name: str) -> dict[str, Any]:
        """The deployment fields of reward ``name``: the defaults above with its ``per_reward`` overrides."""
        out = {f: getattr(self, f) for f in SERVE_DEPLOYMENT_FIELDS}
        out.update(self.per_reward.get(name, {}))
        return out


@section
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
        serving: how the RL stage runs the scorers: "serve" (one Ray Serve deployment per reward, autoscaled,
            `rewards.serve`) or "actors" (the fixed pool of `resources.reward_worker` actors, each hosting
            every reward).
        serve_app: attach to the reward deployments of a running Serve application of this name (started by
            `rtdmd-ray serve-rewards CONFIG`) instead of starting them; "" = the run starts its own.
        serve: the deployments' replicas, resources and batching (serving: serve).
    """

    weights: Map[Float] = field(default_factory=lambda: FrozenDict(
        {"clipscore": 1.0, "hpsv2": 1.0, "pickscore": 1.0, "geneval": 1.0}))
    ckpt_dir: Str = ""
    device: Str = "auto"
    devices: Map[Str] = field(default_factory=FrozenDict)
    batch_images: Map[Int] = field(default_factory=FrozenDict)
    options: Map[Map[Scalar]] = field(default_factory=FrozenDict)
    serving: Str = "serve"
    serve_app: Str = ""
    serve: RewardServeConfig = field(default_factory=RewardServeConfig)

    def device_for(self, name: str) -> str:
        return self.devices.get(name, self.device)


@section
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

    count: Int = 1
    cpus_per_actor: Float = 1.0
    gpus_per_actor: Float = 0.0
    max_restarts: Int = 0
    max_task_retries: Int = 0
    placement: PlacementStrategy = "PACK"
    custom: Map[Float] = field(default_factory=FrozenDict)


@section
class ResourcesConfig:
    """Actor counts and per-actor resources per role, applied where the actors are created (roles/groups.py).

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
    fsdp_shard_ranks: Int = 0


@section
class SyncConfig:
    """Learner -> sampler weight sync (LoRA, or full weights when training full).

    Attributes:
        transport: "auto" (nccl on GPU, gloo on CPU), "nccl", "gloo" or "object_store".
        bucket_mib: flat bucket size in MiB.
        timeout_s: seconds before a sync is declared failed.
    """

    transport: Literal["auto", "nccl", "gloo", "object_store"] = "auto"
    bucket_mib: Int = 256
    timeout_s: Float = 600.0


@section
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
    dataset_dir: Str = "data/prompts"
    train_prompt_file: Str = "pickscore/train.txt"
    prompts: Tuple[Str] = ()
    balance_tags: Bool = False


@section
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

    enabled: Bool = True
    every_iterations: Int = 1000
    mode: Literal["distilled", "teacher"] = "distilled"
    num_steps: Int = 4
    noise_level: Float = 0.9
    guidance_scale: Float = 1.0
    use_ema: Bool = True
    batch_images: Int = 16
    seed: Int = 42
    reward_weights: Map[Float] = field(default_factory=lambda: FrozenDict({"pickscore": 1.0}))
    prompt_file: Str = "drawbench/test.txt"
    dataset_map: Map[Str] = field(default_factory=FrozenDict)
    num_prompts: Int = 0
    log_images: Int = 8
    rows: Map[Tuple[Str]] = field(default_factory=FrozenDict)


@section
class InferenceConfig:
    """LoRA stack of the sample/eval commands (rewards-inference.md §5.6).

    Attributes:
        lora_paths: adapters merged into the base in order (cold-start EMA, then RL EMA); empty = the base
            model.
        fallback_lora_rank: rank for adapter files without adapter_config.json.
        fallback_lora_alpha: alpha for adapter files without adapter_config.json.
    """

    lora_paths: Tuple[Str] = ()
    fallback_lora_rank: Int = 32
    fallback_lora_alpha: Float = 64.0


@section
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

    stdout: Bool = True
    jsonl: Bool = True
    wandb: Literal["disabled", "offline", "online"] = "offline"
    project: Str = "rtdmd-ray"
    run_name: Str = ""
    tags: Tuple[Str] = ()
    ray_metrics: Bool = True


@section
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
        problems = check(self)
        if problems:
            raise ConfigError("; ".join(problems))
        return self


def resolve_path(path: str | Path, base: str | Path | None = None) -> Path:
    """Absolute form of a config path: relative paths start at ``base`` (default: the repository root)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base if base is not None else REPO_ROOT) / p

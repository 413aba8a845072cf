"""Cross-field rules of a config: the batch arithmetic, names and ranges that no single field type can check.

``check(cfg)`` returns every problem as one message with the numbers involved and the key to change;
``Config.validate()`` joins them into one ``ConfigError`` line.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from rtdmd_ray.config.registries import (
    DIFFERENTIABLE_REWARDS,
    JUDGE_APP_FIELDS,
    KNOWN_REWARDS,
    NEEDS_PRETRAINED_PATH,
    RAY_BUILTIN_RESOURCES,
    RESOLUTION_MULTIPLE_PX,
    SERVE_DEPLOYMENT_FIELDS,
)

if TYPE_CHECKING:
    from rtdmd_ray.config.schema import Config, LoRAConfig, RoleResourcesConfig, SolverConfig


def check(cfg: Config) -> list[str]:
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

    # reward serving (Ray Serve deployments)
    rs = cfg.rewards.serve
    if cfg.rewards.serving not in ("serve", "actors"):
        p.append(f"rewards.serving='{cfg.rewards.serving}' must be serve (one Ray Serve deployment per "
                 "reward) or actors (the resources.reward_worker pool)")
    reward_names("rewards.serve.per_reward", rs.per_reward)
    reward_names("rewards.serve.runtime_env", rs.runtime_env)
    for name in ("", *rs.per_reward):
        d = rs.for_reward(name) if name else {f: getattr(rs, f) for f in SERVE_DEPLOYMENT_FIELDS}
        where = f"rewards.serve.per_reward.{name}" if name else "rewards.serve"
        for key in d:
            if key not in SERVE_DEPLOYMENT_FIELDS:
                close = difflib.get_close_matches(key, SERVE_DEPLOYMENT_FIELDS, n=1)
                fields = ", ".join(SERVE_DEPLOYMENT_FIELDS)
                hint = f"did you mean {close[0]}?" if close else f"fields: {fields}"
                p.append(f"{where}.{key} is not a deployment field: {hint}")
        known = {k: v for k, v in d.items() if k in SERVE_DEPLOYMENT_FIELDS}
        for key, value in known.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                p.append(f"{where}.{key}={value!r} must be a number")
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in known.values()):
            continue
        if known["min_replicas"] < 1 or known["max_replicas"] < known["min_replicas"]:
            p.append(f"{where}: min_replicas={known['min_replicas']}, max_replicas={known['max_replicas']} "
                     "need 1 <= min_replicas <= max_replicas")
        for key in ("target_ongoing_requests", "cpus_per_replica", "gpus_per_replica", "batch_wait_timeout_s",
                    "upscale_delay_s", "downscale_delay_s"):
            positive(f"{where}.{key}", known[key], zero_ok=True)

    if cfg.rewards.serve_app and cfg.rewards.serving != "serve":
        p.append(f"rewards.serve_app={cfg.rewards.serve_app} attaches to a Serve application: it needs "
                 "rewards.serving=serve (now actors)")
    reward_names("rewards.serve.custom_per_reward", rs.custom_per_reward)
    customs = [("rewards.serve.custom", rs.custom),
               *((f"rewards.serve.custom_per_reward.{n}", c) for n, c in rs.custom_per_reward.items())]
    for where, custom in customs:
        for key, amount in custom.items():
            positive(f"{where}.{key}", amount)
            if key in ("CPU", "GPU", "memory"):
                p.append(f"{where}.{key}: set cpus_per_replica / gpus_per_replica instead (custom holds the "
                         "cluster's own resources, e.g. rtdmd_reward)")
    for key in rs.judge:
        if key not in JUDGE_APP_FIELDS:
            close = difflib.get_close_matches(key, JUDGE_APP_FIELDS, n=1)
            hint = f"did you mean {close[0]}?" if close else f"fields: {', '.join(JUDGE_APP_FIELDS)}"
            p.append(f"rewards.serve.judge.{key} is not a judge app field: {hint}")
    if rs.judge.get("engine", "transformers") not in ("transformers", "vllm"):
        p.append(f"rewards.serve.judge.engine={rs.judge['engine']!r} must be transformers or vllm (Ray Serve "
                 "LLM, GPU extra)")
    judge_app = cfg.rewards.options.get("geneval2", {}).get("serve_app")
    if judge_app and cfg.rewards.options["geneval2"].get("endpoint"):
        p.append("rewards.options.geneval2: give endpoint or serve_app, not both (serve_app finds the "
                 "endpoint of the judge's Serve app by name)")

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

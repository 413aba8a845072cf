"""The rollout role: ``RolloutWorker`` (one sampler actor) and ``SamplerGroup`` (the samplers, fan-out per
phase).

A sampler holds the generator (base + the RL adapter stack, ``rl_step.build_sampler_generator``), the text
encoders and the VAE. Per call it samples one ``PromptBatch`` (spec algorithms.md §3.3): 4-step CPS
trajectories with log-probs, SubGRPO's prompt-seeded shared noise at the non-selected steps, the decoded
final images, and returns a typed ``RolloutBatch`` stamped with the policy version of its weights, plus a
small ``ScoreRequest`` (uint8 images, prompts, metadata) that the driver hands to the reward pool as soon as
it is ready. Samplers refuse to sample with weights of another version than the prompts ask for.

Randomness is per sample, never per call: sample ``i``'s initial noise and its noise at the trained steps come
from a generator seeded with ``PromptBatch.seeds[i]``, so a trajectory does not depend on how the epoch is
split over samplers or micro-batches (and a re-dispatched batch reproduces bit for bit).

Prompts (§3.2): ``epoch_prompt_jobs`` draws each rollout step's K-repeat groups with
``algorithms.grpo.k_repeat_indices`` (a pure function of seed and draw index), so the K copies of a prompt
land on different samplers and the learner ranks gather advantages globally.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rtdmd_ray.algorithms.cps import cps_step, sde_step
from rtdmd_ray.algorithms.grpo import k_repeat_indices, select_train_steps, shared_noise_batch
from rtdmd_ray.config import GRPOConfig, ModelConfig, SamplingConfig, TrainConfig
from rtdmd_ray.types import PromptBatch, RolloutBatch, quantize_images


@dataclass
class ScoreRequest:
    """What the reward pool needs from one rollout call (the latents stay in the object store).

    Attributes:
        images: uint8 ``[N, 3, H, W]``, the decoded final samples.
        prompts: ``N`` prompts; metadata: ``N`` metadata dicts (GenEval fields).
    """

    images: torch.Tensor
    prompts: list[str]
    metadata: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.prompts)


# ------------------------------------------------------------------------------------------ prompts (§3.2)
def sample_seed(seed: int, epoch: int, slot: int) -> int:
    """The initial-noise seed of global sample ``slot`` of ``epoch`` (63 bits of a hash: no collisions)."""
    digest = hashlib.sha256(f"rtdmd-rollout:{seed}:{epoch}:{slot}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def epoch_train_steps(grpo: GRPOConfig, seed: int, epoch: int) -> tuple[int, ...]:
    """The SubGRPO-trained steps of ``epoch`` (identical everywhere); every candidate when selection is
    off."""
    ss = grpo.step_selection
    candidates = list(range(ss.range_start, ss.range_end + 1))
    if not ss.enabled:
        return tuple(candidates)
    return tuple(select_train_steps(seed, epoch, candidates, ss.num_train_steps))


@dataclass(frozen=True)
class PromptJob:
    """One sampler call of an epoch: ``key = (rollout step, sampler, micro-batch)`` orders the epoch's
    samples."""

    key: tuple[int, int, int]
    sampler: int
    prompts: PromptBatch


def epoch_prompt_jobs(
    records: Sequence[dict[str, Any]],
    *,
    grpo: GRPOConfig,
    seed: int,
    epoch: int,
    num_samplers: int,
    policy_version: int,
) -> list[PromptJob]:
    """Every sampler call of ``epoch`` in sample order (step-major, then sampler, then micro-batch).

    Rollout step ``i`` draws ``images_per_step`` slots with ``k_repeat_indices(seed, epoch *
    sample_batches_per_epoch + i, ...)``; sampler ``s`` takes slots ``[s * share, (s + 1) * share)``, split
    into ``grpo.sampler_micro_batch_images`` chunks (0 = one call). A sample's group id is its dataset row, so
    a prompt drawn twice in an epoch is one group (the reference groups by prompt string).
    """
    per_step = grpo.images_per_step
    share = per_step // num_samplers
    micro = grpo.sampler_micro_batch_images or share
    jobs = []
    for i in range(grpo.sample_batches_per_epoch):
        rows = k_repeat_indices(
            seed, epoch * grpo.sample_batches_per_epoch + i, len(records), per_step, grpo.images_per_prompt
        )
        for s in range(num_samplers):
            for m, lo in enumerate(range(s * share, (s + 1) * share, micro)):
                slots = range(lo, min(lo + micro, (s + 1) * share))
                recs = [records[rows[k]] for k in slots]
                pb = PromptBatch(
                    prompts=[r["prompt"] for r in recs],
                    metadata=[dict(r) for r in recs],
                    group_ids=torch.tensor([rows[k] for k in slots], dtype=torch.int64),
                    seeds=torch.tensor(
                        [sample_seed(seed, epoch, i * per_step + k) for k in slots], dtype=torch.int64
                    ),
                    epoch=epoch,
                    policy_version=policy_version,
                )
                jobs.append(PromptJob(key=(i, s, m), sampler=s, prompts=pb))
    return jobs


# ------------------------------------------------------------------------------------------ noise (§3.3)
def trajectory_noise(
    prompts: PromptBatch,
    *,
    num_steps: int,
    shape: Sequence[int],
    train_steps: Sequence[int],
    share_untrained: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial latents and per-step CPS noise of every sample, CPU float32.

    Sample ``i``'s generator (seeded with ``seeds[i]``) draws ``x_0`` and then one noise per step in order, so
    the stream never depends on the batch. With ``share_untrained`` (SubGRPO step selection) the noise of
    every step outside ``train_steps`` is replaced by ``shared_noise(prompt, step, epoch)``: identical for a
    prompt's K copies on any sampler, so in-group reward differences come from ``x_0`` and the trained steps
    only.

    Returns:
        ``(x0 [N, C, H, W], noise [N, T, C, H, W])``.
    """
    x0, noise = [], []
    for seed in prompts.seeds.tolist():
        g = torch.Generator().manual_seed(int(seed))
        x0.append(torch.randn(tuple(shape), generator=g))
        noise.append(torch.stack([torch.randn(tuple(shape), generator=g) for _ in range(num_steps)]))
    x0_t, noise_t = torch.stack(x0), torch.stack(noise)
    if share_untrained:
        for j in range(num_steps):
            if j not in train_steps:
                noise_t[:, j] = shared_noise_batch(prompts.prompts, j, prompts.epoch, shape)
    return x0_t, noise_t


# ------------------------------------------------------------------------------------------ the actor
class RolloutWorker:
    """One sampler actor (created by ``SamplerGroup`` through ``groups.create_actor_group``).

    Args:
        model, sampling, grpo, train: config slices.
        sampler_id: this sampler's index (stamped on its samples).
        threads: intra-op CPU threads (the actor's ``cpus_per_actor``).
        record_noise: keep the per-step CPS noise in ``RolloutBatch.extras["step_noise"]`` (tests only).
    """

    def __init__(
        self,
        *,
        model: ModelConfig,
        sampling: SamplingConfig,
        grpo: GRPOConfig,
        train: TrainConfig,
        sampler_id: int,
        threads: int = 1,
        record_noise: bool = False,
    ):
        from rtdmd_ray.models.lora import lora_state
        from rtdmd_ray.roles.weight_sync import WeightReceiver
        from rtdmd_ray.stages.learner_state import TORCH_DTYPES, build_model_backbone, has_gpu
        from rtdmd_ray.stages.rl_state import build_sampler_generator

        torch.set_num_threads(max(1, threads))
        self.model, self.sampling, self.grpo, self.train = model, sampling, grpo, train
        self.sampler_id, self.record_noise = sampler_id, record_noise
        self.device = torch.device("cuda" if has_gpu() else "cpu")
        # the learner builds the same base from the same seed (tiny models) or the same files
        self.backbone = build_model_backbone(model, self.device, train.seed)
        self.stack = build_sampler_generator(self.backbone.transformer, model, seed=train.seed)
        steps = tuple(sampling.denoising_step_list[: sampling.num_steps])
        self.sigmas = [float(s) for s in self.backbone.sigma_schedule(steps, model.resolution_px)]
        self.latent_shape = tuple(self.backbone.latent_shape(model.resolution_px))
        self.autocast_dtype = TORCH_DTYPES[train.autocast_dtype]
        self.cond_key = f"{model.backbone}:{model.pretrained_path or 'seed' + str(train.seed)}"
        # the learner sends the generator LoRA as fp32 published-key tensors (LearnerState.full_lora)
        layout = {
            k: (tuple(v.shape), torch.float32)
            for k, v in lora_state(self.backbone.transformer, "generator").items()
        }
        self.receiver = WeightReceiver(expected_layout=layout)
        self.version = -1  # no weights received yet: sampling refuses until the first sync

    # ---------------------------------------------------------------- weight sync
    def join_weight_sync(self, endpoint: Any, rank: int) -> None:
        self.receiver.join(endpoint, rank)

    def recv_weights(self, ticket: Any) -> int:
        """Receive the generator LoRA of ``ticket`` into the adapter (bit-exact copy); returns the new
        version."""
        from rtdmd_ray.models.lora import load_lora_state

        named, version = self.receiver.recv(ticket)
        load_lora_state(self.backbone.transformer, "generator", named, strict=True)
        self.version = version
        return version

    def lora(self) -> tuple[dict[str, torch.Tensor], int]:
        """The generator LoRA this sampler samples with (published keys, clones) and its version."""
        from rtdmd_ray.models.lora import lora_state

        return {
            k: v.clone() for k, v in lora_state(self.backbone.transformer, "generator").items()
        }, self.version

    def policy_version(self) -> int:
        """The version of the weights held (-1 right after a (re)start: nothing received yet)."""
        return self.version

    def crash_on_next_sample(self) -> None:
        """Test hook (fault-tolerance tests): the next ``sample`` call kills this process mid-call, as a
        crash would; Ray then restarts the actor (``max_restarts``) without the flag."""
        self._crash = True

    # ---------------------------------------------------------------- sampling
    def _velocity(self, x: torch.Tensor, sigma: float, cond: Any) -> torch.Tensor:
        sig = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=self.device)
        enabled = self.autocast_dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled):
            v = self.backbone.velocity(x, sig, cond)
        return v.float()

    @torch.no_grad()
    def sample(self, prompts: PromptBatch, train_steps: tuple[int, ...]) -> tuple[RolloutBatch, ScoreRequest]:
        """Trajectories of ``prompts`` with the current weights (spec §3.3).

        Args:
            prompts: the call's prompts; ``prompts.policy_version`` must equal this sampler's weights'
            version. train_steps: the epoch's SubGRPO-trained steps (the others get shared noise).

        Returns:
            ``(RolloutBatch, ScoreRequest)``: the trajectories (latents ``[N, T, C, H, W]``, log-probs ``[N,
            T]``) and the images to score.
        """
        if prompts.policy_version != self.version:
            raise RuntimeError(
                f"sampler {self.sampler_id} holds policy version {self.version} but was asked to "
                f"sample with version {prompts.policy_version}: sync the weights first"
            )
        if getattr(self, "_crash", False):
            import os

            os._exit(1)
        t0 = time.perf_counter()
        n, t = len(prompts), len(self.sigmas) - 1
        x, noise = trajectory_noise(
            prompts,
            num_steps=t,
            shape=self.latent_shape,
            train_steps=train_steps,
            share_untrained=self.grpo.step_selection.enabled,
        )
        x, noise = x.to(self.device), noise.to(self.device)
        cond = self.backbone.encode_prompts(prompts.prompts)
        latents, next_latents, log_probs = [], [], []
        for j in range(t):
            v = self._velocity(x, self.sigmas[j], cond)
            if self.grpo.sde_type == "sde":
                st = sde_step(
                    x,
                    v,
                    self.sigmas[j],
                    self.sigmas[j + 1],
                    self.sampling.eta,
                    noise=noise[:, j],
                    sigma_max=self.sigmas[1],
                )
            else:
                st = cps_step(
                    x,
                    v,
                    self.sigmas[j],
                    self.sigmas[j + 1],
                    self.sampling.eta,
                    noise=noise[:, j],
                    log_prob=self.grpo.log_prob,
                )
            latents.append(x.float())
            next_latents.append(st.sample.float())
            log_probs.append(st.log_prob)
            x = st.sample
        micro = self.grpo.vae_decode_micro_batch_images or n
        images = torch.cat(
            [quantize_images(self.backbone.decode(x[lo : lo + micro])) for lo in range(0, n, micro)]
        )
        batch = RolloutBatch(
            latents=torch.stack(latents, 1).cpu(),
            next_latents=torch.stack(next_latents, 1).cpu(),
            log_probs=torch.stack(log_probs, 1).float().cpu(),
            sigmas=torch.tensor(self.sigmas, dtype=torch.float32),
            selected_steps=tuple(s for s in train_steps if self.sigmas[s + 1] > 0),
            images=images.cpu(),
            prompts=list(prompts.prompts),
            metadata=list(prompts.metadata),
            seeds=prompts.seeds.clone(),
            group_ids=prompts.group_ids.clone(),
            sampler_ids=torch.full((n,), self.sampler_id, dtype=torch.int64),
            epoch=prompts.epoch,
            policy_version=self.version,
            # the text-encoder stack's id (the learner re-encodes `prompts`); RolloutBatch.cat needs it equal
            conditioning_key=self.cond_key,
            extras={"step_noise": noise.cpu()} if self.record_noise else {},
        )
        self.last_sample_s = time.perf_counter() - t0
        return batch, ScoreRequest(images=batch.images, prompts=batch.prompts, metadata=batch.metadata)

    def sample_with_stats(
        self, prompts: PromptBatch, train_steps: tuple[int, ...]
    ) -> tuple[RolloutBatch, ScoreRequest, dict[str, float]]:
        """``sample`` plus a small stats dict (the call's images and seconds, measured where they live): the
        driver reads it without fetching the rollout, and a failed stats ref tells it the actor died."""
        batch, request = self.sample(prompts, train_steps)
        return batch, request, {"sampler": float(self.sampler_id), "images": float(len(batch)),
                                "seconds": self.last_sample_s}


# ------------------------------------------------------------------------------------------ the group
@dataclass
class RolloutJob:
    """One in-flight sampler call: the object refs of its ``RolloutBatch``, ``ScoreRequest`` and stats.

    Mutable on purpose: ``SamplerGroup.resubmit`` points a job whose sampler died at the new call in place, so
    the driver's list of the epoch's jobs stays the one to train on.
    """

    key: tuple[int, int, int]
    sampler: int
    num_images: int
    rollout_ref: Any
    request_ref: Any
    stats_ref: Any = None
    prompts: PromptBatch | None = None
    train_steps: tuple[int, ...] = ()


class SamplerGroup:
    """The sampler actors (``resources.sampler``), built through ``groups.create_actor_group``.

    Args:
        cfg: the whole config (the one place mapping its sections onto sampler actors).
        record_noise: forwarded to every ``RolloutWorker`` (tests).
    """

    def __init__(self, cfg: Any, *, record_noise: bool = False, timeout_s: float = 600.0):
        from rtdmd_ray.roles.groups import RoleResources, create_actor_group

        r = cfg.resources.sampler
        # a call retried by Ray on a restarted sampler would find no weights (version -1): re-sampling after a
        # re-sync is the driver's job (resubmit)
        res = RoleResources.from_config(r, max_task_retries=0)
        self.timeout_s, self.max_restarts = timeout_s, r.max_restarts
        self.restarts_seen = 0  # sampler restarts this group re-synced after (whole run)
        self.group = create_actor_group(
            RolloutWorker,
            res,
            role="sampler",
            strategy=r.placement,
            init_kwargs=lambda i: {
                "model": cfg.model,
                "sampling": cfg.sampling,
                "grpo": cfg.grpo,
                "train": cfg.train,
                "sampler_id": i,
                "threads": max(1, math.floor(r.cpus_per_actor)),
                "record_noise": record_noise,
            },
        )
        try:
            self.group.wait_ready(timeout_s=timeout_s)
        except BaseException:
            self.group.shutdown()
            raise

    def __len__(self) -> int:
        return len(self.group)

    def sample_async(self, jobs: Sequence[PromptJob], train_steps: tuple[int, ...]) -> list[RolloutJob]:
        """Submit every call of the epoch at once (each sampler runs its calls in order); returns the refs."""
        out = []
        for job in jobs:
            actor = self.group[job.sampler]
            refs = actor.sample_with_stats.options(num_returns=3).remote(job.prompts, train_steps)
            out.append(RolloutJob(job.key, job.sampler, len(job.prompts), *refs, job.prompts, train_steps))
        return out

    def resubmit(self, job: RolloutJob, resync: Callable[[int], None]) -> RolloutJob:
        """Sample ``job`` again after its sampler died; returns ``job``, pointed at the new call.

        Waits for Ray to restart the actor (``resources.sampler.max_restarts``); a restarted sampler holds
        no weights, so ``resync(version)`` first brings every sampler to the job's policy version (it
        re-forms the weight-sync group). The same prompts and seeds give the same trajectories bit for bit.
        """

        if self.max_restarts == 0:
            raise RuntimeError(
                f"sampler {job.sampler} died while sampling {job.key} and resources.sampler.max_restarts is "
                "0: set it (e.g. 3) so Ray restarts samplers and the epoch goes on"
            )
        actor = self.group[job.sampler]
        version = self._version_after_restart(job.sampler)
        want = job.prompts.policy_version
        if version != want:
            self.restarts_seen += 1
            resync(want)
        refs = actor.sample_with_stats.options(num_returns=3).remote(job.prompts, job.train_steps)
        job.rollout_ref, job.request_ref, job.stats_ref = refs
        return job

    def _version_after_restart(self, index: int) -> int:
        """Sampler ``index``'s policy version, waiting while Ray restarts it (calls on a dead actor fail fast
        until Ray notices the death, then wait for the restart); -1 means restarted, holding no weights."""
        import ray

        actor, deadline = self.group[index], time.monotonic() + self.timeout_s
        while True:
            try:
                return ray.get(actor.policy_version.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                if self.max_restarts == 0 or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"sampler {index} died and did not come back within {self.timeout_s} s "
                        f"(resources.sampler.max_restarts={self.max_restarts}: set it, e.g. 3, or it was "
                        f"used up): {e}"
                    ) from e
                time.sleep(0.2)

    def restarted_since_sync(self) -> bool:
        """Whether Ray restarted a sampler that died *between* calls (e.g. during the learner update): it
        holds no weights, so the next sync must re-form the group (``driver.connect_weight_sync``)."""
        fresh = [i for i in range(len(self)) if self._version_after_restart(i) < 0]
        self.restarts_seen += len(fresh)
        return bool(fresh)

    def epoch_stats(self, jobs: Sequence[RolloutJob]) -> dict[str, float]:
        """Per sampler: images per busy second and busy seconds of ``jobs`` (finished calls: no waiting)."""
        import ray

        per: dict[int, list[float]] = {i: [0.0, 0.0] for i in range(len(self))}
        for st in ray.get([j.stats_ref for j in jobs]):
            per[int(st["sampler"])][0] += st["images"]
            per[int(st["sampler"])][1] += st["seconds"]
        out: dict[str, float] = {}  # rollout/sampler_restarts is recorded by the driver after the sync
        for i, (images, seconds) in per.items():
            out[f"rollout/sampler_{i}/images_per_s"] = images / max(seconds, 1e-9)
            out[f"rollout/sampler_{i}/busy_s"] = seconds
        return out

    def join_weight_sync(self, endpoint: Any) -> None:
        from rtdmd_ray.roles.groups import gather

        gather(
            self.group.map_ranked_async(lambda i, a: a.join_weight_sync.remote(endpoint, i + 1)),
            timeout_s=self.timeout_s,
            what="sampler weight-sync join",
        )

    def recv_weights(self, ticket: Any) -> list[int]:
        return self.group.map(
            lambda a: a.recv_weights.remote(ticket),
            timeout_s=self.timeout_s,
            what=f"sampler weight sync v{ticket.version}",
        )

    def call(self, method: str, *args: Any) -> list[Any]:
        """Every sampler's result of ``method(*args)`` (inspection: ``lora``)."""
        return self.group.map(
            lambda a: getattr(a, method).remote(*args), timeout_s=self.timeout_s, what=method
        )

    def shutdown(self, grace_s: float = 0.0) -> None:
        self.group.shutdown(grace_s)

"""The learner role: one class per rank and one group per stage, side by side.

``Learner`` (one cold-start rank) and ``RLLearner`` (an RL rank: ``Learner`` plus the RL verbs) are plain
classes; ``groups.create_learner_group`` wraps them with ``ray.remote``, applies ``resources.learner``
(count, CPUs/GPUs per rank) and makes the actors ranks of one torch.distributed group (gloo on CPU, NCCL on
GPU). Every RPC is a verb that all ranks run together (``run_cold_start``, ``update``, ``save_checkpoint``,
``load_checkpoint``, ``evaluate``); ``LearnerGroup`` / ``RLLearnerGroup`` fan each out and gather once, and a
dead rank fails the job fast with ``LearnerFailure`` (``RankCalls``). The work of a rank on a batch is
Ray-free and lives in ``stages/`` (``cold_start_step``, ``rl_step``).

Over ~600 lines on purpose: both stages' ranks and their groups are one role, read together.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from rtdmd_ray.config import (
    ACDMDConfig,
    Config,
    DataConfig,
    DMDConfig,
    EvalConfig,
    GRPOConfig,
    LastStepLossConfig,
    ModelConfig,
    RewardsConfig,
    SamplingConfig,
    SolversConfig,
    TrainConfig,
    resolve_path,
)
from rtdmd_ray.runs import checkpoint as ckpt
from rtdmd_ray.stages.learner_state import has_gpu
from rtdmd_ray.stages.rl_state import RLLearnerState
from rtdmd_ray.stages.rl_step import RLUpdate, bp_scorer_fn, learner_sigmas
from rtdmd_ray.types import RolloutBatch, ScoredBatch

CALL_TIMEOUT_S = 3600.0  # one chunk of iterations or one eval; raise for very large models


class Learner:
    """One learner rank: its ``LearnerState`` plus the stage's per-rank loop.

    Args:
        model, sampling, dmd, ac_dmd, solver, train, data, eval_cfg, rewards: config slices.
        parallelism: ``resources.learner_parallelism`` ("ddp" | "fsdp2").
        rank, world_size: position in the learner group.
        threads: intra-op CPU threads (the rank's ``cpus_per_actor``; fixed, so runs are reproducible).
    """

    def __init__(
        self,
        *,
        model: ModelConfig,
        sampling: SamplingConfig,
        dmd: DMDConfig,
        ac_dmd: ACDMDConfig,
        solver: SolversConfig,
        train: TrainConfig,
        data: DataConfig,
        eval_cfg: EvalConfig,
        rewards: RewardsConfig,
        parallelism: str,
        rank: int,
        world_size: int,
        threads: int = 1,
    ):
        torch.set_num_threads(max(1, threads))
        torch.set_flush_denormal(True)  # denormal floats in tiny models slow CPU kernels down many-fold
        self.model, self.sampling, self.dmd, self.ac_dmd = model, sampling, dmd, ac_dmd
        self.solver, self.train, self.data, self.eval_cfg, self.rewards = (
            solver,
            train,
            data,
            eval_cfg,
            rewards,
        )
        self.parallelism, self.rank, self.world_size = parallelism, rank, world_size
        # hashed now, when the adapters are loaded, not at save time (a file replaced mid-run must not match)
        self.base = ckpt.base_fingerprint(model) if rank == 0 else {}
        self.state: Any = None
        self.iteration_fn: Any = None
        self.eval_hook: Any = None

    def _build_state(self, state_cls: type) -> str:
        """``self.state = state_cls(...)`` (``LearnerState`` or ``RLLearnerState``) on this rank's device (GPU
        when there is one), from this rank's config slices; returns the device."""
        device = "cuda" if has_gpu() else "cpu"
        self.state = state_cls(
            model=self.model,
            solver=self.solver,
            train=self.train,
            parallelism=self.parallelism,
            rank=self.rank,
            world_size=self.world_size,
            device=device,
        )
        return device

    def setup(self) -> dict[str, Any]:
        """Build the rank state (after the process group exists); returns parameter counts."""
        from rtdmd_ray.data.prompts import PromptStream, training_prompt_records
        from rtdmd_ray.stages.cold_start_step import ColdStartIteration
        from rtdmd_ray.stages.learner_state import LearnerState, to_local

        device = self._build_state(LearnerState)
        prompts = PromptStream(
            training_prompt_records(self.data),
            prompts_per_step=self.dmd.prompts_per_step,
            seed=self.train.seed,
        )
        self.iteration_fn = ColdStartIteration(
            state=self.state,
            sampling=self.sampling,
            dmd=self.dmd,
            ac_dmd=self.ac_dmd,
            train=self.train,
            prompts=prompts,
            resolution_px=self.model.resolution_px,
        )
        t = self.state.transformer
        return {
            "trainable_params": {
                r: sum(to_local(p).numel() for p in o.params) for r, o in self.state.optimizers.items()
            },
            "frozen_params": sum(to_local(p).numel() for p in t.parameters() if not p.requires_grad),
            "device": device,
            "sigmas": self.iteration_fn.sigmas,
        }

    # ------------------------------------------------------------------ training
    def run_cold_start(self, start_iteration: int, num_iterations: int) -> list[dict[str, float]]:
        """Run ``num_iterations`` iterations from ``start_iteration``; returns per-iteration metrics."""
        out = []
        for it in range(start_iteration, start_iteration + num_iterations):
            t0 = time.perf_counter()
            m = self.iteration_fn.run(it)
            m["timing/iteration_s"] = time.perf_counter() - t0
            out.append(m)
        return out

    def evaluate(self, image_path: str | None = None) -> dict[str, float]:
        """Eval metrics of the current (EMA) generator, identical on every rank."""
        if self.eval_hook is None:
            from rtdmd_ray.stages.validation import EvalHook

            self.eval_hook = EvalHook(
                state=self.state,
                eval_cfg=self.eval_cfg,
                sampling=self.sampling,
                data=self.data,
                rewards=self.rewards,
                resolution_px=self.model.resolution_px,
            )
        t0 = time.perf_counter()
        metrics = self.eval_hook.run(Path(image_path) if image_path else None)
        metrics["timing/eval_s"] = time.perf_counter() - t0
        return metrics

    # ------------------------------------------------------------------ checkpoints
    stage = "cold_start"  # the checkpoint kind this role writes and resumes from (RLLearner: "rtdmd")

    def checkpoint_meta(self) -> dict[str, Any]:
        """Stage-specific fields of ``meta.json`` (the RL learner overrides it)."""
        return {"prompts_consumed": self.state.iteration * self.dmd.prompts_per_step}

    def save_checkpoint(self, output_dir: str, keep_last: int) -> str:
        """Every rank writes its part into ``checkpoint-<it>.tmp``; rank 0 adds full LoRAs and finalises."""
        from rtdmd_ray.models.lora import save_lora, save_peft_dir
        from rtdmd_ray.stages.learner_state import ROLES

        s = self.state
        it = s.iteration
        tmp = ckpt.tmp_dir(output_dir, it)
        if self.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)  # a stale partial save of this iteration
        s.dist.barrier()
        ckpt.save_rank_part(tmp, self.rank, s.local_tensors(), s.aux_state())
        # full tensors are collectives under fsdp2: every rank gathers, rank 0 writes
        loras = {role: s.full_lora(role) for role in ROLES}
        ema = s.full_lora("generator", ema=True) if s.ema is not None else None
        s.dist.barrier()
        final = ckpt.tmp_dir(output_dir, it).with_name(ckpt.checkpoint_name(it))
        if self.rank == 0:
            lora_cfg = {role: getattr(self.model, f"{role}_lora") for role in ROLES}
            for role, tensors in loras.items():
                save_lora(
                    tmp / f"{role}.safetensors",
                    tensors,
                    rank=lora_cfg[role].rank,
                    alpha=lora_cfg[role].alpha,
                    target_modules=self.model.lora_targets(role),
                    family=s.backbone.family,
                )
            export = ema if ema is not None else loras["generator"]
            gl = lora_cfg["generator"]
            if ema is not None:
                save_lora(
                    tmp / "generator_ema.safetensors",
                    ema,
                    rank=gl.rank,
                    alpha=gl.alpha,
                    target_modules=self.model.lora_targets("generator"),
                    family=s.backbone.family,
                )
            save_peft_dir(
                tmp / "transformer",
                export,
                rank=gl.rank,
                alpha=gl.alpha,
                target_modules=list(self.model.lora_targets("generator")),
                init=gl.init,
            )
            meta = {
                "world_size": self.world_size,
                "parallelism": self.parallelism,
                "stage": self.stage,
                "backbone": self.model.backbone,
                "seed": self.train.seed,
                "fake_updates": s.optimizers["fake_score"].steps,
                "generator_updates": s.optimizers["generator"].steps,
                "base": self.base,
                **self.checkpoint_meta(),
            }
            ckpt.finalize(tmp, it, meta, keep_last)
        s.dist.barrier()
        return str(final)

    def load_checkpoint(self, path: str) -> int:
        """Restore this rank from a complete checkpoint; returns the iteration to continue from."""
        meta = ckpt.read_meta(path)
        if meta.get("stage") != self.stage:
            raise ValueError(f"{path} is a {meta.get('stage')} checkpoint, not a {self.stage} one")
        tensors, aux = ckpt.load_rank_part(Path(path), self.rank)
        self.state.load_state(tensors, aux)
        return self.state.iteration

    # ------------------------------------------------------------------ inspection (tests, weight sync)
    def lora(self, role: str, ema: bool = False) -> dict[str, torch.Tensor]:
        """Full published-format LoRA tensors of ``role`` (collective under fsdp2)."""
        return self.state.full_lora(role, ema=ema)

    def frozen_checksum(self) -> float:
        """Sum of |w| over frozen parameters (the base, teacher): must never change during training."""
        from rtdmd_ray.stages.learner_state import to_local

        with torch.no_grad():
            return float(
                sum(
                    to_local(p).double().abs().sum()
                    for p in self.state.transformer.parameters()
                    if not p.requires_grad
                )
            )

    def update_counts(self) -> dict[str, int]:
        return {role: o.steps for role, o in self.state.optimizers.items()}


class LearnerFailure(RuntimeError):
    """A learner rank's actor died: the job stopped every role; resubmitting the same command with
    ``train.resume: auto`` continues from ``checkpoint`` (a rank cannot rejoin its process group).

    Attributes: rank, progress (``"epoch 3"``, ``"iterations 40-49"``), checkpoint (the last complete one or
    None)."""

    def __init__(self, *, rank: int, progress: str, what: str, cause: BaseException, checkpoint: Path | None,
                 resume: str):
        self.rank, self.progress, self.checkpoint = rank, progress, checkpoint
        if checkpoint is None:
            where, fix = "none yet", "resubmit the same command; it starts again from scratch"
        else:
            where = str(checkpoint)
            how = "" if resume == "auto" else f" (pass train.resume=auto: this run has resume: {resume})"
            fix = f"resubmit the same command{how}; train.resume: auto continues from {checkpoint}"
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(
            f"learner rank {rank} died during {progress} ({what}): {type(cause).__name__}: {first}. "
            f"Every role of this job was stopped. Last complete checkpoint: {where}. Fix: {fix}"
        )


def gather_ranks(
    group: Any, refs: list[Any], *, timeout_s: float, what: str,
    on_death: Callable[[int, str, BaseException], NoReturn],
) -> list[Any]:
    """The results of one call per learner rank (rank order), failing fast: a rank whose actor died is
    reported the moment Ray knows, while the other ranks may still block in a collective waiting for it.

    ``on_death(rank, what, error)`` is called (and must raise) when a rank's actor is dead or unreachable,
    after the group is killed. A rank's ordinary exception (often the survivor's collective failing because
    its peer vanished) first gives the other ranks ``DEATH_GRACE_S`` to show a dead actor, which is then
    the reported cause; otherwise it is raised as is. Any failure kills the group: never wait on ranks
    that may block in a collective."""
    import ray

    from rtdmd_ray.roles.groups import gather

    rank_of = {r.hex(): i for i, r in enumerate(refs)}
    results: dict[str, Any] = {}  # fetched once, as each rank finishes
    pending, deadline = list(refs), time.monotonic() + timeout_s
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                return gather(refs, timeout_s=0, what=what)  # raises the TimeoutError naming the ranks
            for r in ready:
                try:
                    results[r.hex()] = ray.get(r)
                except ray.exceptions.RayActorError as e:
                    group.shutdown()
                    on_death(rank_of[r.hex()], what, e)
                except Exception:
                    if (dead := _dead_rank([x for x in refs if x.hex() != r.hex()])) is not None:
                        group.shutdown()
                        on_death(rank_of[dead[0].hex()], what, dead[1])
                    raise
        return [results[r.hex()] for r in refs]
    except BaseException:
        group.shutdown()
        raise


DEATH_GRACE_S = 10.0  # how long a rank's error waits for Ray to report a dead peer as the real cause


def _dead_rank(refs: list[Any]) -> tuple[Any, BaseException] | None:
    """The first of ``refs`` whose actor died (within ``DEATH_GRACE_S``) and its error, else None."""
    import ray

    pending, deadline = list(refs), time.monotonic() + DEATH_GRACE_S
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            return None
        try:
            ray.get(ready[0], timeout=0)
        except ray.exceptions.RayActorError as e:
            return ready[0], e
        except Exception:
            pass
    return None


class RankCalls:
    """Calls on every learner rank that fail fast: a dead rank kills the group and raises ``LearnerFailure``
    (``LearnerGroup`` and ``RLLearnerGroup``). Needs ``group``, ``timeout_s``, ``output_dir``,
    ``resume`` and ``progress`` (what the ranks are doing, for the message)."""

    group: Any
    timeout_s: float
    world_size: int
    output_dir: Path
    resume: str
    progress: str
    info: Any
    dist_info: Any

    def start_ranks(self, cfg: Config, actor_class: Any, *, extra_kwargs: dict[str, Any] | None = None,
                    timeout_s: float) -> None:
        """Create ``resources.learner.count`` rank actors of ``actor_class`` (``groups.create_learner_group``
        applies ``resources.learner``), join their process group and run ``setup``; ``extra_kwargs`` are the
        stage's constructor arguments beyond the shared sections."""
        from rtdmd_ray.roles.groups import RoleResources, create_learner_group

        r = cfg.resources.learner
        # config validation keeps max_restarts at 0: a restarted rank cannot rejoin its process group
        res = RoleResources.from_config(r)
        threads = max(1, int(r.cpus_per_actor))

        def kwargs(rank: int) -> dict[str, Any]:
            return {
                "model": cfg.model, "sampling": cfg.sampling, "dmd": cfg.dmd, "ac_dmd": cfg.ac_dmd,
                "solver": cfg.solver, "train": cfg.train, "data": cfg.data, "eval_cfg": cfg.eval,
                "rewards": cfg.rewards, "parallelism": cfg.resources.learner_parallelism,
                "rank": rank, "world_size": r.count, "threads": threads, **(extra_kwargs or {}),
            }

        self.timeout_s, self.world_size = timeout_s, r.count
        self.output_dir, self.resume = resolve_path(cfg.train.output_dir), cfg.train.resume
        self.progress = "start-up"
        self.group, self.dist_info = create_learner_group(
            actor_class, res, init_kwargs=kwargs, strategy=r.placement, timeout_s=min(timeout_s, 300.0)
        )
        self.info = self.map(lambda a: a.setup.remote(), what="learner setup")[0]

    def map(self, fn: Any, *, what: str) -> list[Any]:
        """``fn(actor)`` on every rank, in rank order (``gather_ranks``)."""
        return gather_ranks(self.group, self.group.map_async(fn), timeout_s=self.timeout_s, what=what,
                            on_death=self.died)

    def map_ranked(self, fn: Any, *, what: str) -> list[Any]:
        """``fn(rank, actor)`` on every rank, in rank order (``gather_ranks``)."""
        return gather_ranks(self.group, self.group.map_ranked_async(fn), timeout_s=self.timeout_s, what=what,
                            on_death=self.died)

    def died(self, rank: int, what: str, error: BaseException) -> NoReturn:
        last = ckpt.latest_checkpoint(self.output_dir)
        raise LearnerFailure(rank=rank, progress=self.progress, what=what, cause=error, checkpoint=last,
                             resume=self.resume) from error


class LearnerGroup(RankCalls):
    """The learner ranks of one run, created through ``groups.create_learner_group`` from ``cfg.resources``.

    Built from the whole config because it is the one place that maps config sections onto rank actors.
    """

    def __init__(self, cfg: Config, *, timeout_s: float = CALL_TIMEOUT_S):
        self.start_ranks(cfg, Learner, timeout_s=timeout_s)

    def run_cold_start(self, start_iteration: int, num_iterations: int) -> list[dict[str, float]]:
        """Rank 0's per-iteration metrics (already rank-averaged)."""
        self.progress = f"iterations {start_iteration + 1}-{start_iteration + num_iterations}"
        return self.map(lambda a: a.run_cold_start.remote(start_iteration, num_iterations),
                        what="cold-start iterations")[0]

    def evaluate(self, image_path: str | None = None) -> dict[str, float]:
        return self.map(lambda a: a.evaluate.remote(image_path), what="eval")[0]

    def save_checkpoint(self, output_dir: str, keep_last: int) -> str:
        return self.map(lambda a: a.save_checkpoint.remote(output_dir, keep_last), what="save checkpoint")[0]

    def load_checkpoint(self, path: str) -> int:
        its = self.map(lambda a: a.load_checkpoint.remote(path), what="load checkpoint")
        if len(set(its)) != 1:
            raise RuntimeError(f"learner ranks resumed at different iterations {its} from {path}")
        return its[0]

    def call(self, method: str, *args: Any) -> list[Any]:
        """Every rank's result of ``method(*args)`` (inspection helpers: lora, frozen_checksum, ...)."""
        return self.map(lambda a: getattr(a, method).remote(*args), what=method)

    def shutdown(self, grace_s: float = 0.0) -> None:
        self.group.shutdown(grace_s)


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
        device = self._build_state(RLLearnerState)
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
        from rtdmd_ray.roles.weight_sync import WeightSender

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
        """Every rank writes its part; returns the checkpoint directory (``runs/checkpoint.py`` layout)."""
        return self.call("save_checkpoint", output_dir, keep_last)[0]

    def load_checkpoint(self, path: str) -> int:
        """Restore every rank from ``path``; returns the epoch to continue from."""
        epochs = self.call("load_checkpoint", path)
        if len(set(epochs)) != 1:
            raise RuntimeError(f"learner ranks resumed at different epochs {epochs} from {path}")
        self.progress = f"epoch {epochs[0]}"
        return epochs[0]

    def evaluate(self, image_path: str | None = None) -> dict[str, float]:
        """Eval metrics of the (EMA) generator stack, the same on every rank (``validation.EvalHook``)."""
        return self.call("evaluate", image_path)[0]

    def call(self, method: str, *args: Any) -> list[Any]:
        """Every rank's result of ``method(*args)`` (inspection: ``lora``, ``last_advantages``, ...)."""
        return self.map(lambda a: getattr(a, method).remote(*args), what=method)

    def shutdown(self, grace_s: float = 0.0) -> None:
        self.group.shutdown(grace_s)

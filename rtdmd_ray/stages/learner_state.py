"""The state one learner rank owns, shared by the cold start and the RL stage (Ray-free, distributed-aware).

One base transformer carries two named LoRA adapters, ``"generator"`` and ``"fake_score"``; the teacher is
the same base with adapters disabled (``models.lora.use_adapters(t, None)``), so a rank holds one copy of the
base weights instead of the reference's three. Trainable parameters are the adapters' A/B matrices, kept in
fp32 (master weights) unless ``train.trainable_param_dtype: model``.

Parallelism (``resources.learner_parallelism``):

* ``ddp``: replicated parameters; after each backward the role's gradients are averaged across ranks with
  one flat all-reduce (what torch DDP would send for a LoRA). Not torch's ``DistributedDataParallel``: AC-DMD
  calls the same module 3 to 5 times per backward (fake loss + consistency paths), which DDP's reducer
  rejects without ``static_graph``.
* ``fsdp2``: ``fully_shard`` per transformer block and on the root, over ``init_device_mesh(device, (W,))``;
  gradients are reduce-scattered by FSDP, parameters are DTensors (checkpoints store each rank's shard).

Randomness comes from two ``torch.Generator``s: ``control`` is seeded identically on every rank and drives
every draw that decides control flow or is shared by the batch (random stop ``k``, teacher CFG scale, renoise
times, consistency jumps, prompt order), so all ranks run the same collectives without broadcasts; ``local``
is seeded per rank and draws the sample noise. Both states are checkpointed, so resume is bit-exact.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rtdmd_ray.algorithms.ema import EMA, rl_ema_decay
from rtdmd_ray.algorithms.schedules import warmup_constant_lr
from rtdmd_ray.config import (
    EMAConfig,
    LoRAConfig,
    ModelConfig,
    SolverConfig,
    SolversConfig,
    TrainConfig,
    resolve_path,
)
from rtdmd_ray.models import build_backbone
from rtdmd_ray.models.lora import (
    add_lora,
    load_lora_file,
    load_lora_state,
    lora_parameters,
    lora_state,
    use_adapters,
)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROLES = ("generator", "fake_score")
TEACHER = None  # the adapter set of the teacher: the base with every adapter disabled


def build_model_backbone(model: ModelConfig, device: torch.device, seed: int) -> Any:
    """The ``model`` section's backbone on ``device``: the learner ranks and the samplers build the same base
    from the same seed (tiny models) or the same files."""
    return build_backbone(
        model.backbone,
        pretrained_path=model.pretrained_path or None,
        dtype=model.dtype,
        device=device,
        seed=seed,
    )


def has_gpu() -> bool:
    """Whether this process was given a GPU (Ray sets ``CUDA_VISIBLE_DEVICES`` for actors with GPUs)."""
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()) and torch.cuda.device_count() > 0


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def to_local(t: torch.Tensor) -> torch.Tensor:
    """The rank's shard of a DTensor (a view of the parameter's storage), or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), or ``t`` itself."""
    return t.full_tensor() if _is_dtensor(t) else t


def local_like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Wrap a rank-local shard back into a DTensor laid out like ``param`` (plain tensors pass through)."""
    if not _is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local.to(param.device), param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )


class DistContext:
    """Rank, world size and the few collectives the learner uses; a no-op on a single process."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.active = world_size > 1 and dist.is_available() and dist.is_initialized()
        if world_size > 1 and not self.active:
            raise RuntimeError(
                f"learner rank {rank} of {world_size}: torch.distributed is not initialised; create learner "
                "ranks with groups.create_learner_group (it sets up the process group)"
            )

    @torch.no_grad()
    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` in place across ranks with one flat all-reduce."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
            offset += n

    @torch.no_grad()
    def broadcast_(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        if self.active:
            for t in tensors:
                dist.broadcast(t, src)

    def mean_scalars(self, values: dict[str, float]) -> dict[str, float]:
        """Rank-mean of a dict of floats whose keys are identical on every rank."""
        if not self.active or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist(), strict=True)}

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


@dataclass
class RoleOptimizer:
    """AdamW over one adapter's parameters with warm-up-constant LR, gradient averaging and clipping."""

    role: str
    named_params: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    solver: SolverConfig
    dist_ctx: DistContext
    average_grads: bool  # ddp: all-reduce here; fsdp2 reduce-scatters in backward already
    steps: int = 0

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_params]

    def lr(self) -> float:
        """The LR of the next step: ``solver.lr * warmup_constant_lr(steps, solver.warmup_steps)``."""
        return self.solver.lr * warmup_constant_lr(self.steps, self.solver.warmup_steps)

    def step(self) -> dict[str, float]:
        """Average grads (ddp), clip the global norm to ``solver.max_grad_norm``, AdamW step, zero grads.

        Returns ``{"grad_norm": pre-clip global norm, "lr": the LR used}``.
        """
        params = self.params
        for p in params:  # a parameter outside this backward's graph contributes a zero gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.average_grads:
            self.dist_ctx.all_reduce_mean_([to_local(p.grad) for p in params])
        max_norm = self.solver.max_grad_norm if self.solver.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {"grad_norm": float(full_tensor(norm)), "lr": lr}

    # ---------------------------------------------------------------- state (rank-local tensors)
    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        state = {
            i: {k: (to_local(v).detach().clone() if torch.is_tensor(v) else v) for k, v in s.items()}
            for i, s in sd["state"].items()
        }
        return {"optimizer": {"state": state, "param_groups": sd["param_groups"]}, "steps": self.steps}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        params = self.params
        state = {}
        for i, s in sd["optimizer"]["state"].items():
            p = params[int(i)]
            # Adam's scalar `step` stays a plain tensor; moments take the parameter's (DTensor) layout
            state[int(i)] = {
                k: (
                    local_like(v, p)
                    if torch.is_tensor(v) and v.shape == to_local(p).shape and v.ndim > 0
                    else v
                )
                for k, v in s.items()
            }
        self.optimizer.load_state_dict({"state": state, "param_groups": sd["optimizer"]["param_groups"]})
        self.steps = int(sd["steps"])


class LearnerState:
    """Backbone + adapters + optimisers + EMA + RNGs of one learner rank.

    Args:
        model: backbone, dtype and the two roles' LoRA settings.
        solver: AdamW settings per role.
        train: seed, autocast, trainable dtype, EMA.
        parallelism: ``"ddp"`` or ``"fsdp2"`` (module docstring).
        rank, world_size: this rank in the learner process group (already initialised when ``world_size >
            1``).
        device: torch device of the rank (``"cpu"`` or ``"cuda"``).
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
        if model.generator_init_path or model.fake_score_init_path or model.teacher_init_path:
            raise ValueError(
                "model.generator_init_path / fake_score_init_path / teacher_init_path are not supported: the "
                "learner keeps one base (the teacher) under both LoRA adapters; leave them empty"
            )
        if parallelism not in ("ddp", "fsdp2"):
            raise ValueError(f"resources.learner_parallelism must be ddp or fsdp2, got {parallelism!r}")
        self.model_cfg, self.solver_cfg, self.train_cfg = model, solver, train
        self.parallelism = parallelism
        self.dist = DistContext(rank, world_size)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.autocast_dtype = TORCH_DTYPES[train.autocast_dtype]

        # identical seeds on every rank: every rank builds the same base and the same adapter init
        self.backbone = build_model_backbone(model, self.device, train.seed)
        t = self.backbone.transformer
        for i, role in enumerate(ROLES):
            lora: LoRAConfig = getattr(model, f"{role}_lora")
            if not lora.enabled:
                raise ValueError(
                    f"model.{role}_lora.enabled is false: full fine-tuning is not implemented; "
                    "the learner trains LoRA adapters"
                )
            if lora.merge_before_training:
                raise ValueError(
                    f"model.{role}_lora.merge_before_training is an RL-stage option; the cold "
                    "start trains the adapter directly: set it to false"
                )
            add_lora(
                t,
                role,
                family=self.backbone.family,
                targets=model.lora_targets(role),
                rank=lora.rank,
                alpha=lora.alpha,
                init=lora.init,
                seed=train.seed + 1 + i,
            )
            if lora.load_path:  # relative to the repository root, like every config path
                lf = load_lora_file(resolve_path(lora.load_path), rank=lora.rank, alpha=lora.alpha)
                load_lora_state(t, role, lf.tensors, strict=lora.load_strict)
        if train.trainable_param_dtype == "model":  # the reference's bf16 adapters (spec §7.1.3)
            for role in ROLES:
                for p in lora_parameters(t, role):
                    p.data = p.data.to(TORCH_DTYPES[model.dtype])
        if model.gradient_checkpointing and hasattr(t, "enable_gradient_checkpointing"):
            t.enable_gradient_checkpointing()

        if parallelism == "ddp":
            # same seeds give the same weights already; the broadcast makes it a guarantee
            self.dist.broadcast_([p.data for role in ROLES for p in lora_parameters(t, role)])
        else:
            self._fully_shard(t)

        self.optimizers: dict[str, RoleOptimizer] = {}
        for role in ROLES:
            sv: SolverConfig = getattr(solver, role)
            named = [(n, p) for n, p in t.named_parameters() if p.requires_grad and f".{role}." in n]
            opt = torch.optim.AdamW(
                [p for _, p in named],
                lr=sv.lr,
                betas=(sv.beta1, sv.beta2),
                eps=sv.eps,
                weight_decay=sv.weight_decay,
            )
            self.optimizers[role] = RoleOptimizer(
                role, named, opt, sv, self.dist, average_grads=parallelism == "ddp"
            )
        self.ema: EMA | None = None
        if train.ema.enabled:
            self.ema = EMA(self.ema_named_params())
        self.control = torch.Generator().manual_seed(train.seed)
        self.local = torch.Generator().manual_seed(train.seed * 1_000_003 + 7919 * (rank + 1))
        self.iteration = 0  # training iterations completed (cold start) / epochs (RL)

    # ---------------------------------------------------------------- set-up helpers
    def _fully_shard(self, t: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        blocks = getattr(t, "transformer_blocks", None) or []
        for block in [*blocks, *(getattr(t, "single_transformer_blocks", None) or [])]:
            fully_shard(block, mesh=mesh)
        fully_shard(t, mesh=mesh)

    @property
    def transformer(self) -> nn.Module:
        return self.backbone.transformer

    def ema_named_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The generator adapter's parameters as rank-local tensors (shards under fsdp2), for the EMA."""
        for n, p in self.optimizers["generator"].named_params:
            yield n, to_local(p)

    # ---------------------------------------------------------------- forward passes
    def velocity(
        self,
        adapters: str | None,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Any,
        guidance: float = 1.0,
        uncond: Any = None,
    ) -> torch.Tensor:
        """``v [B, C, H, W]`` of the role ``adapters`` ("generator", "fake_score" or None = the teacher)."""
        enabled = self.autocast_dtype != torch.float32
        if x.shape[0] != cond.batch_size and x.shape[0] % cond.batch_size == 0:
            # several stacked paths of the same prompts (e.g. both consistency paths in one call)
            reps = x.shape[0] // cond.batch_size
            cond = type(cond).cat([cond] * reps)
            uncond = type(uncond).cat([uncond] * reps) if uncond is not None else None
        with (
            use_adapters(self.transformer, adapters),
            torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled),
        ):
            v = self.backbone.velocity(x, sigma, cond, guidance=guidance, uncond=uncond)
        return v.float()

    # ---------------------------------------------------------------- EMA
    def ema_update(self, generator_steps: int, ema_cfg: EMAConfig) -> bool:
        """One EMA pull if ``generator_steps`` (optimiser steps done) hits ``ema.interval_steps``."""
        if self.ema is None or generator_steps % ema_cfg.interval_steps:
            return False
        decay = rl_ema_decay(generator_steps - 1, ema_cfg.decay) if ema_cfg.warmup else ema_cfg.decay
        self.ema.update(self.ema_named_params(), decay)
        return True

    @contextlib.contextmanager
    def ema_applied(self, use_ema: bool = True) -> Iterator[None]:
        """Run a block with the EMA generator weights swapped in (no-op without an EMA or ``use_ema``)."""
        if self.ema is None or not use_ema:
            yield
            return
        self.ema.swap_in(self.ema_named_params())
        try:
            yield
        finally:
            self.ema.swap_out(self.ema_named_params())

    # ---------------------------------------------------------------- state
    def full_lora(self, role: str, *, ema: bool = False) -> dict[str, torch.Tensor]:
        """Published-format LoRA tensors of ``role`` (or its EMA), gathered in full on every rank (fp32 CPU).

        Under fsdp2 this is a collective: call it on every rank.
        """
        live = lora_state(self.transformer, role)
        if not ema:
            return {k: full_tensor(v).detach().float().cpu().clone() for k, v in live.items()}
        if self.ema is None:
            raise ValueError("train.ema.enabled is false: there is no generator EMA to export")
        by_param = {n: p for n, p in self.optimizers["generator"].named_params}
        out = {}
        # live keys and EMA names list the same adapter tensors in the same module order
        pub_of = {_param_name_to_published(n): n for n in by_param}
        for key in live:
            name = pub_of[key]
            shadow = self.ema.shadow[name]
            out[key] = full_tensor(local_like(shadow.to(to_local(by_param[name]).dtype), by_param[name]))
            out[key] = out[key].detach().float().cpu().clone()
        return out

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """Rank-local adapter tensors and EMA shadows, keyed ``"<role>/<param>"`` / ``"ema/<param>"``."""
        out = {}
        for role, ro in self.optimizers.items():
            for n, p in ro.named_params:
                out[f"{role}/{n}"] = to_local(p).detach().cpu().clone()
        if self.ema is not None:
            for n, t in self.ema.shadow.items():
                out[f"ema/{n}"] = t.detach().cpu().clone()
        return out

    def aux_state(self) -> dict[str, Any]:
        """Optimiser states, RNG states and counters (plain tensors/containers: ``weights_only`` loadable)."""
        return {
            "optimizers": {role: ro.state_dict() for role, ro in self.optimizers.items()},
            "rng": {
                "control": self.control.get_state(),
                "local": self.local.get_state(),
                "torch_cpu": torch.get_rng_state(),
            },
            "ema_num_updates": self.ema.num_updates if self.ema is not None else 0,
            "iteration": self.iteration,
            "rank": self.rank,
            "world_size": self.world_size,
            "parallelism": self.parallelism,
        }

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor], aux: dict[str, Any]) -> None:
        """Restore what ``local_tensors`` and ``aux_state`` saved (same world size and parallelism)."""
        if aux["world_size"] != self.world_size or aux["parallelism"] != self.parallelism:
            raise ValueError(
                f"checkpoint was written by {aux['world_size']} {aux['parallelism']} ranks; this run has "
                f"{self.world_size} {self.parallelism} ranks: resume with the same "
                "resources.learner.count and "
                "resources.learner_parallelism"
            )
        for role, ro in self.optimizers.items():
            for n, p in ro.named_params:
                to_local(p).copy_(tensors[f"{role}/{n}"])
        if self.ema is not None:
            self.ema.load_state_dict(
                {
                    "names": list(self.ema.names),
                    "shadow": {n: tensors[f"ema/{n}"] for n in self.ema.names},
                    "num_updates": aux["ema_num_updates"],
                }
            )
        for role, ro in self.optimizers.items():
            ro.load_state_dict(aux["optimizers"][role])
        self.control.set_state(aux["rng"]["control"])
        self.local.set_state(aux["rng"]["local"])
        torch.set_rng_state(aux["rng"]["torch_cpu"])
        self.iteration = int(aux["iteration"])


def _param_name_to_published(name: str) -> str:
    """``a.b.lora_A.generator.weight`` (a parameter name) -> ``a.b.lora_A.default.weight``."""
    from rtdmd_ray.models.lora import canonical_key, published_key

    ck = canonical_key(name)
    if ck is None:
        raise ValueError(f"{name} is not a LoRA parameter name")
    return published_key(*ck)


class Stopwatch:
    """``with sw("fake_update"): ...`` accumulates seconds per phase into ``sw.seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

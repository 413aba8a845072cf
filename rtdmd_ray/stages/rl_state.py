"""The RL adapter stack on one learner rank (spec algorithms.md §3.1): Ray-free.

The reference merges the cold-start LoRA into the base and trains a fresh LoRA on top. Here the teacher is
the base itself (one copy of the weights per rank), so merging is not an option; instead the cold-start LoRA
is loaded into a *frozen* adapter ``<role>_init`` and the fresh trainable adapter ``<role>`` sits beside it;
their deltas add, ``W + dW_init + dW_rl``, which is the merged model up to the merge's rounding. Only
``<role>`` is trained, checkpointed and synced to samplers. ``build_sampler_generator`` builds the same
stack on a sampler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from rtdmd_ray.algorithms.ema import EMA
from rtdmd_ray.config import (
    LoRAConfig,
    ModelConfig,
    SolversConfig,
    TrainConfig,
    resolve_path,
)
from rtdmd_ray.models.lora import (
    add_lora,
    load_lora_file,
    load_lora_state,
    lora_parameters,
    reinit_adapter,
    use_adapters_now,
)
from rtdmd_ray.stages.learner_state import ROLES, LearnerState

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

"""The one small interface every backbone family implements (samplers and learners only see this).

Conventions (spec algorithms.md §0): noise level ``sigma`` in [0, 1]; rectified flow
``x_sigma = (1 - sigma) * x0 + sigma * eps``; the network predicts the velocity ``v ~ eps - x0``.
Each family converts ``sigma`` to its own timestep convention inside ``velocity`` (SD3: ``t = 1000 * sigma``;
FLUX.1 / FLUX.2: ``sigma``). Latents are the family's latent space (packing happens inside ``velocity``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Conditioning:
    """Encoded prompts of one batch, family-specific tensors keyed by name.

    Every tensor has the batch as its first dimension (e.g. SD3: ``prompt_embeds [B, L, D]``,
    ``pooled [B, P]``). ``index``/``cat``/``to`` keep the keys, so roles can slice and move them
    without knowing the family.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def index(self, idx: torch.Tensor | slice | list[int]) -> Conditioning:
        return Conditioning({k: v[idx] for k, v in self.tensors.items()})

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Conditioning:
        out = {}
        for k, v in self.tensors.items():
            # only floating tensors change dtype (ids/masks keep theirs)
            cast = dtype if (dtype is not None and v.is_floating_point()) else None
            out[k] = v.to(device=device, dtype=cast)
        return Conditioning(out)

    def repeat(self, n: int) -> Conditioning:
        """Repeat each row ``n`` times along the batch (``expand`` semantics of the empty prompt)."""
        return Conditioning({k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()})

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        keys = items[0].tensors.keys()
        return Conditioning({k: torch.cat([c.tensors[k] for c in items], dim=0) for k in keys})


@runtime_checkable
class FlowBackbone(Protocol):
    """What a sampler or learner needs from a text-to-image flow model.

    ``transformer`` is the trainable denoiser (an ``nn.Module``; LoRA adapters are injected into it).
    """

    family: str  # "sd3" | "flux1" | "flux2" (ShapeWorld is an "sd3"-family model)
    transformer: torch.nn.Module

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Text conditioning for ``prompts`` (frozen encoders, no grad)."""
        ...

    def empty_conditioning(self, batch_size: int) -> Conditioning:
        """The unconditional embedding (the empty prompt ``""`` through the full text stack), cached."""
        ...

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, guidance: float = 1.0,
        uncond: Conditioning | None = None,
    ) -> torch.Tensor:
        """Predicted velocity ``v [B, C, H, W]`` at latents ``x [B, C, H, W]`` and noise levels ``sigma [B]``.

        ``guidance > 1`` applies the family's CFG convention (classic CFG with ``uncond`` for SD3 and FLUX.2;
        the distilled guidance scalar for FLUX.1-dev). ``guidance == 1`` is a single conditional pass.
        """
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] (``decode/2 + 0.5`` clamped). Differentiable."""
        ...

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of the latents for a square image of ``resolution`` pixels."""
        ...

    def sigma_schedule(self, step_list: tuple[int, ...], resolution: int) -> list[float]:
        """The shifted few-step schedule ending in 0.0 (spec §1.1)."""
        ...


def resolve_uncond(backbone: FlowBackbone, cond: Conditioning, uncond: Conditioning | None) -> Conditioning:
    """The unconditional side of classic CFG for ``cond``: ``uncond`` (a single row is repeated to ``cond``'s
    batch) or, when None, the backbone's cached empty-prompt conditioning."""
    batch = cond.batch_size
    if uncond is None:
        return backbone.empty_conditioning(batch)
    if uncond.batch_size == 1 and batch > 1:
        return uncond.repeat(batch)
    return uncond

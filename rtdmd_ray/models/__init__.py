"""Backbone registry: ``build_backbone(name, ...)`` for the real families and their tiny in-code twins.

Entries are callables or lazy ``"module:attr"`` strings (imported on first use, so optional domains such as
ShapeWorld cost nothing until asked for). Every factory takes
``(*, pretrained_path, dtype, device, seed)`` keyword arguments and returns a ``FlowBackbone``.

Layer 1: may import ``algorithms``, ``config`` and ``shapes`` (the ShapeWorld backbone in ``shapes.py``
decodes with the world's renderer); never a stage, role, driver or Ray.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rtdmd_ray.models.base import Conditioning, FlowBackbone

BackboneFactory = Callable[..., FlowBackbone]

# default hub ids when model.pretrained_path is not given (the inference YAMLs' values)
DEFAULT_PRETRAINED = {
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd35": "stabilityai/stable-diffusion-3.5-medium",
    "flux1": "black-forest-labs/FLUX.1-dev",
    "flux2": "black-forest-labs/FLUX.2-klein-4B",
}


def _real(family_module: str, class_name: str, default_key: str) -> BackboneFactory:
    def factory(
        *,
        pretrained_path: str | Path | None = None,
        dtype: str | torch.dtype = "bf16",
        device: torch.device | str = "cpu",
        seed: int = 0,
        **kwargs: Any,
    ) -> FlowBackbone:
        del seed  # real weights are deterministic
        cls = getattr(importlib.import_module(family_module), class_name)
        return cls.from_pretrained(
            pretrained_path or DEFAULT_PRETRAINED[default_key], dtype=dtype, device=device, **kwargs
        )

    factory.__name__ = f"build_{default_key}"
    return factory


def _tiny(family: str) -> BackboneFactory:
    def factory(
        *,
        pretrained_path: str | Path | None = None,
        dtype: str | torch.dtype = "fp32",
        device: torch.device | str = "cpu",
        seed: int = 0,
        **kwargs: Any,
    ) -> FlowBackbone:
        from rtdmd_ray.models.loading import parse_dtype
        from rtdmd_ray.models.tiny import backbone_class, tiny_backbone

        if pretrained_path:  # a saved tiny model goes through the real loader
            return backbone_class(family).from_pretrained(
                pretrained_path, dtype=dtype, device=device, **kwargs
            )
        bb = tiny_backbone(family, seed=seed, device=device)
        torch_dtype = parse_dtype(dtype)
        if torch_dtype != torch.float32:
            bb.transformer.to(torch_dtype)
            bb.dtype = torch_dtype
        return bb

    factory.__name__ = f"build_tiny_{family}"
    return factory


BACKBONES: dict[str, BackboneFactory | str] = {
    "sd3": _real("rtdmd_ray.models.sd3", "SD3Backbone", "sd3"),
    "sd35": _real("rtdmd_ray.models.sd3", "SD3Backbone", "sd35"),
    "flux1": _real("rtdmd_ray.models.flux1", "Flux1Backbone", "flux1"),
    "flux2": _real("rtdmd_ray.models.flux2", "Flux2Backbone", "flux2"),
    "tiny_sd3": _tiny("sd3"),
    "tiny_flux1": _tiny("flux1"),
    "tiny_flux2": _tiny("flux2"),
    # ShapeWorld's SD3-family model (its own text encoder and pixel-unshuffle codec), imported lazily
    "shapes": "rtdmd_ray.models.shapes:build_shapes_backbone",
}


def register_backbone(name: str, factory: BackboneFactory | str, *, overwrite: bool = False) -> None:
    """Add a backbone: a factory or a lazy ``"package.module:attr"`` string."""
    if name in BACKBONES and not overwrite:
        raise ValueError(f"backbone {name!r} is already registered (pass overwrite=True to replace it)")
    BACKBONES[name] = factory


def resolve_factory(name: str) -> BackboneFactory:
    """The factory of ``name``, importing a lazy ``"module:attr"`` entry on first use."""
    if name not in BACKBONES:
        raise ValueError(
            f"model.backbone={name!r} is not a registered backbone: use one of {', '.join(sorted(BACKBONES))}"
        )
    entry = BACKBONES[name]
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(
                f"model.backbone={name!r} points at {BACKBONES[name]!r}, which cannot be imported "
                f"({type(exc).__name__}: {exc})"
            ) from None
        BACKBONES[name] = entry
    return entry


def build_backbone(
    name: str,
    *,
    pretrained_path: str | Path | None = None,
    dtype: str | torch.dtype = "bf16",
    device: torch.device | str = "cpu",
    seed: int = 0,
    **kwargs: Any,
) -> FlowBackbone:
    """Build backbone ``name`` ("sd3", "sd35", "flux1", "flux2", "tiny_sd3", "tiny_flux1", "tiny_flux2",
    "shapes", or anything registered). Real families load ``pretrained_path`` (default: the published hub
    id) and fail with a one-line ``MissingWeightsError`` when the weights are absent; tiny ones are built in
    code from ``seed`` (or loaded from ``pretrained_path`` if given)."""
    return resolve_factory(name)(
        pretrained_path=pretrained_path, dtype=dtype, device=device, seed=seed, **kwargs
    )


__all__ = [
    "BACKBONES",
    "DEFAULT_PRETRAINED",
    "Conditioning",
    "FlowBackbone",
    "build_backbone",
    "register_backbone",
    "resolve_factory",
]

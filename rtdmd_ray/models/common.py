"""What the three diffusers-based families share: component bookkeeping, decode, caching, save/load layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rtdmd_ray.models.base import Conditioning, resolve_uncond
from rtdmd_ray.models.loading import load_component, parse_dtype, resolve_model_dir

# diffusers layout: subfolder -> (library, class) of every component a family loads
Layout = dict[str, tuple[str, str]]


def freeze(module: nn.Module | None) -> None:
    """Frozen encoders/VAEs: eval mode, no parameter grads (inputs can still carry grads through them)."""
    if module is not None:
        module.eval()
        module.requires_grad_(False)


class DiffusersBackbone:
    """Base of ``SD3Backbone``, ``Flux1Backbone`` and ``Flux2Backbone`` (each implements ``FlowBackbone``).

    Subclasses set ``family``, ``pipeline_class`` and ``layout`` and implement ``encode_prompts``,
    ``velocity``, ``latent_shape``, ``image_seq_len`` and ``_to_vae_latents``.
    """

    family: str = ""
    pipeline_class: str = ""  # the diffusers pipeline whose model_index.json layout we read and write
    layout: Layout = {}
    # subfolder -> class loaded instead of the one ``layout`` writes to model_index.json (same library)
    load_classes: dict[str, str] = {}

    def __init__(
        self,
        *,
        transformer: nn.Module,
        vae: nn.Module,
        scheduler: Any,
        text_encoders: dict[str, nn.Module],
        tokenizers: dict[str, Any],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler
        self.text_encoders = dict(text_encoders)
        self.tokenizers = dict(tokenizers)
        self.dtype = dtype
        self.device = torch.device(device)
        self._empty: Conditioning | None = None
        # the base transformer is frozen: only LoRA parameters (models/lora.py) become trainable
        self.transformer.requires_grad_(False)
        self.transformer.eval()  # no dropout in these models; roles switch to train() where it matters
        freeze(self.vae)
        for enc in self.text_encoders.values():
            freeze(enc)
        self.to(self.device)

    @classmethod
    def load_components(cls, path_or_repo: str | Path, *, dtype: str | torch.dtype,
                        config_key: str = "model.pretrained_path") -> dict[str, Any]:
        """Every ``layout`` component from a local diffusers directory or a hub id, as the constructor's
        keyword arguments (``transformer``, ``vae``, ``scheduler``, ``text_encoders``, ``tokenizers``,
        ``dtype``); a missing or unreadable component is a one-line error naming ``config_key``."""
        import importlib

        torch_dtype = parse_dtype(dtype)
        root = resolve_model_dir(path_or_repo, subfolders=list(cls.layout), config_key=config_key)
        loaded: dict[str, Any] = {}
        for sub, (library, class_name) in cls.layout.items():
            klass = getattr(importlib.import_module(library), cls.load_classes.get(sub, class_name))
            kwargs: dict[str, Any] = {}
            if sub not in ("scheduler",) and not sub.startswith("tokenizer"):
                # the two libraries spell the argument differently (transformers 5 renamed torch_dtype)
                kwargs["torch_dtype" if library == "diffusers" else "dtype"] = torch_dtype
            loaded[sub] = load_component(
                root, sub, lambda k=klass, s=sub, kw=kwargs: k.from_pretrained(root, subfolder=s, **kw))
        return {
            "transformer": loaded.pop("transformer"),
            "vae": loaded.pop("vae"),
            "scheduler": loaded.pop("scheduler"),
            "text_encoders": {k: v for k, v in loaded.items() if k.startswith("text_encoder")},
            "tokenizers": {k: v for k, v in loaded.items() if k.startswith("tokenizer")},
            "dtype": torch_dtype,
        }

    # ------------------------------------------------------------------ bookkeeping
    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The flow-match scheduler config (shift, dynamic shifting, mu parameters) as a plain dict."""
        return dict(self.scheduler.config)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per VAE latent cell (8 for the real VAEs: 2 ** (blocks - 1))."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def model_dtype(self) -> torch.dtype:
        """Compute dtype of the transformer: its first parameter's (the base, never a LoRA weight).

        Cheap on purpose: diffusers' ``ModelMixin.dtype`` walks every submodule on each access, which
        costs ~5% of a tiny model's forward when read per step.
        """
        return next(self.transformer.parameters()).dtype

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.get("num_train_timesteps", 1000))

    def to(self, device: torch.device | str) -> DiffusersBackbone:
        """Move every component (and the cached empty prompt) to ``device``."""
        self.device = torch.device(device)
        for m in (self.transformer, self.vae, *self.text_encoders.values()):
            m.to(self.device)
        if self._empty is not None:
            self._empty = self._empty.to(self.device)
        return self

    def empty_conditioning(self, batch_size: int) -> Conditioning:
        """``""`` through the full text stack, encoded once and repeated ``batch_size`` times."""
        if self._empty is None:
            self._empty = self.encode_prompts([""])
        return self._empty.repeat(batch_size)

    def sigma_vector(self, sigma: float | torch.Tensor, batch_size: int) -> torch.Tensor:
        """Noise levels as a float32 ``[B]`` tensor on the device (a float or ``[1]`` is broadcast)."""
        s = torch.as_tensor(sigma, dtype=torch.float32, device=self.device).reshape(-1)
        if s.numel() == 1:
            return s.expand(batch_size)
        if s.numel() != batch_size:
            raise ValueError(
                f"sigma has {s.numel()} entries for a batch of {batch_size}: pass a float or [B]"
            )
        return s

    def load_transformer(
        self,
        path_or_repo: str | Path,
        *,
        dtype: str | torch.dtype | None = None,
        config_key: str = "model.generator_init_path",
    ) -> nn.Module:
        """Another checkpoint's transformer of this family (e.g. the step-distilled FLUX.2-klein generator
        next to the base teacher), frozen, on this backbone's device. One-line error when absent."""
        import importlib

        from rtdmd_ray.models.loading import load_component, parse_dtype, resolve_model_dir

        library, class_name = self.layout["transformer"]
        klass = getattr(importlib.import_module(library), class_name)
        torch_dtype = parse_dtype(dtype) if dtype is not None else self.model_dtype
        root = resolve_model_dir(path_or_repo, subfolders=["transformer"], config_key=config_key)
        model = load_component(
            root,
            "transformer",
            lambda: klass.from_pretrained(root, subfolder="transformer", torch_dtype=torch_dtype),
        )
        model.requires_grad_(False)
        return model.eval().to(self.device)

    def _resolve_uncond(self, cond: Conditioning, uncond: Conditioning | None) -> Conditioning:
        return resolve_uncond(self, cond, uncond)

    def image_seq_len(self, resolution: int) -> int:
        """Image tokens the schedule's dynamic shift is computed from (family-specific)."""
        raise NotImplementedError

    def sigma_schedule(self, step_list: tuple[int, ...], resolution: int) -> list[float]:
        """The shifted few-step schedule ending in 0.0 (spec algorithms.md §1.1, ``algorithms.schedules``)."""
        from rtdmd_ray.algorithms.schedules import sigma_schedule

        cfg = self.scheduler_config
        kwargs: dict[str, Any] = {
            "shift": float(cfg.get("shift", 3.0)),
            "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000)),
            "time_shift_type": cfg.get("time_shift_type") or "exponential",
        }
        if self.family == "flux1":
            kwargs.update(
                base_shift=float(cfg.get("base_shift", 0.5)),
                max_shift=float(cfg.get("max_shift", 1.15)),
                base_seq_len=int(cfg.get("base_image_seq_len", 256)),
                max_seq_len=int(cfg.get("max_image_seq_len", 4096)),
                use_dynamic_shifting=bool(cfg.get("use_dynamic_shifting", True)),
            )
        if self.family == "flux2":
            kwargs["shift_terminal"] = cfg.get("shift_terminal") or None
        seq = None if self.family == "sd3" else self.image_seq_len(resolution)
        return list(sigma_schedule(self.family, tuple(step_list), seq, **kwargs))

    def check_resolution(self, resolution: int) -> None:
        div = self.latent_divisor
        if resolution % div:
            raise ValueError(
                f"image resolution {resolution} is not divisible by {div} for the {self.family} backbone: "
                f"choose a multiple of {div} (e.g. {max(div, resolution - resolution % div)})"
            )

    @property
    def latent_divisor(self) -> int:
        return self.vae_scale_factor

    # ------------------------------------------------------------------ decode
    def _to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] (``decode/2 + 0.5`` clamped) from latents ``[B, C, h, w]``.

        Differentiable with respect to ``latents`` (the VAE's own weights are frozen); float32 output.
        """
        z = self._to_vae_latents(latents).to(device=self.device, dtype=self.vae.dtype)
        image = self.vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def randn_latents(
        self,
        batch_size: int,
        resolution: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Initial noise ``[B, C, h, w]`` at sigma = 1 (drawn on the generator's device, then moved)."""
        shape = (batch_size, *self.latent_shape(resolution))
        gen_device = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(self.device)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        raise NotImplementedError

    # ------------------------------------------------------------------ save
    def components(self) -> dict[str, Any]:
        """Subfolder -> component (transformer, vae, scheduler, text encoders, tokenizers)."""
        out: dict[str, Any] = {"transformer": self.transformer, "vae": self.vae, "scheduler": self.scheduler}
        out.update(self.text_encoders)
        out.update(self.tokenizers)
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the diffusers layout (``model_index.json`` + one subfolder per component), loadable by the
        family's ``from_pretrained`` and by the matching diffusers pipeline."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        comps = self.components()
        for sub, comp in comps.items():
            comp.save_pretrained(root / sub)
        index: dict[str, Any] = {
            "_class_name": self.pipeline_class,
            "_diffusers_version": _diffusers_version(),
        }
        for sub in self.layout:
            index[sub] = list(self.layout[sub]) if sub in comps else [None, None]
        (root / "model_index.json").write_text(json.dumps(index, indent=2))
        return root


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def cast_conditioning(cond: Conditioning, device: torch.device, dtype: torch.dtype) -> Conditioning:
    """Move ``cond`` to the transformer's device and dtype (float tensors only)."""
    return cond.to(device=device, dtype=dtype)

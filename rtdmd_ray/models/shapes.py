"""``ShapesBackbone``: the ShapeWorld teacher as an SD3-family ``FlowBackbone``.

Same conventions as ``models/sd3.py``: transformer timestep ``t = 1000 * sigma``, classic CFG with the empty
prompt ``""`` through the full text stack (one doubled forward ``[uncond; cond]``), SD3 static shift 3 for
few-step schedules. Differences: one tiny ``CLIPTextModel`` (``prompt_embeds`` = its last hidden state
``[B, 12, 64]``, ``pooled`` = its EOS-pooled output ``[B, 64]``) and the exact pixel-unshuffle latent codec
instead of a VAE (latents ``[B, 12, 16, 16]`` for 32 px images).

Directory layout (``from_pretrained``/``save_pretrained``): ``transformer/`` (diffusers
``SD3Transformer2DModel``), ``text_encoder/`` (``CLIPTextModel``), ``tokenizer/``
(``PreTrainedTokenizerFast``), ``meta.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rtdmd_ray.models.base import Conditioning, resolve_uncond
from rtdmd_ray.shapes import ASSETS_DIR
from rtdmd_ray.shapes.render import RESOLUTION_PX, decode_latents

SHIPPED_TEACHER = ASSETS_DIR / "teacher"
SHIPPED_CLIP = ASSETS_DIR / "clip"
SHIFT = 3.0
NUM_TRAIN_TIMESTEPS = 1000


class ShapesWeightsMissing(FileNotFoundError):
    """The teacher directory does not exist or lacks a component."""


def resolve_teacher_dir(path: str | Path | None) -> Path:
    """``path``, or the shipped teacher for ``None`` / ``"shipped"``; a teaching error when absent."""
    p = SHIPPED_TEACHER if path in (None, "", "shipped", "builtin") else Path(path).expanduser()
    missing = [s for s in ("transformer", "text_encoder", "tokenizer") if not (p / s).is_dir()]
    if missing:
        raise ShapesWeightsMissing(
            f"ShapeWorld teacher dir {p} lacks {missing}: set model.pretrained_path to a teacher dir or "
            "train one with `rtdmd-ray shapes train-teacher --out DIR` (its DIR/final is a teacher dir)")
    return p


class ShapesBackbone:
    """``FlowBackbone`` of the ShapeWorld teacher (family ``"sd3"``)."""

    family = "sd3"

    def __init__(self, transformer: torch.nn.Module, text_encoder: torch.nn.Module, tokenizer: Any, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 meta: dict[str, Any] | None = None) -> None:
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.meta = dict(meta or {})
        self._empty: Conditioning | None = None
        # the base model is frozen: LoRA parameters (models/lora.py) are the only trainable ones
        self.transformer.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(False).eval()
        self.to(device)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, dtype: str | torch.dtype = "fp32",
                        device: torch.device | str = "cpu") -> ShapesBackbone:
        """Load a teacher dir (default: the shipped ``rtdmd_ray/shapes/assets/teacher``)."""
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModel, PreTrainedTokenizerFast

        from rtdmd_ray.models.loading import parse_dtype

        root = resolve_teacher_dir(path)
        torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        transformer = SD3Transformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch_dtype)
        # the text stack stays fp32: it runs once per prompt and is tiny
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
        meta_path = root / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return cls(transformer, text_encoder, tokenizer, dtype=torch_dtype, device=device, meta=meta)

    def save_pretrained(self, directory: str | Path) -> Path:
        from rtdmd_ray.shapes.train_teacher import save_pretrained_dir

        d = Path(directory)
        save_pretrained_dir(d, self.transformer, self.text_encoder, self.tokenizer, self.meta)
        return d

    # ------------------------------------------------------------------ bookkeeping
    def to(self, device: torch.device | str) -> ShapesBackbone:
        self.device = torch.device(device)
        self.transformer.to(self.device)
        self.text_encoder.to(self.device)
        if self._empty is not None:
            self._empty = self._empty.to(self.device)
        return self

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def num_train_timesteps(self) -> int:
        return NUM_TRAIN_TIMESTEPS

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return {"shift": SHIFT, "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "use_dynamic_shifting": False}

    @property
    def latent_divisor(self) -> int:
        return 2

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """``prompt_embeds [B, 12, 64]`` and ``pooled [B, 64]`` (model dtype)."""
        from rtdmd_ray.shapes.text import encode_text, tokenize

        ids = tokenize(self.tokenizer, list(prompts)).to(self.device)
        embeds, pooled = encode_text(self.text_encoder, ids)
        return Conditioning({"prompt_embeds": embeds.to(self.dtype), "pooled": pooled.to(self.dtype)})

    def empty_conditioning(self, batch_size: int) -> Conditioning:
        """``""`` through the text stack, encoded once and repeated ``batch_size`` times."""
        if self._empty is None:
            self._empty = self.encode_prompts([""])
        return self._empty.repeat(batch_size)

    # ------------------------------------------------------------------ denoiser
    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution != RESOLUTION_PX:
            raise ValueError(f"the ShapeWorld teacher generates {RESOLUTION_PX} px images, not {resolution}: "
                             f"set model.resolution_px={RESOLUTION_PX}")
        return (12, RESOLUTION_PX // 2, RESOLUTION_PX // 2)

    def image_seq_len(self, resolution: int) -> int:
        _, h, w = self.latent_shape(resolution)
        p = int(self.transformer.config.patch_size)
        return (h // p) * (w // p)

    def sigma_schedule(self, step_list: tuple[int, ...], resolution: int) -> list[float]:
        """SD3 static shift 3 (``algorithms.schedules.sigma_schedule("sd3", ...)``), ending in 0.0."""
        from rtdmd_ray.algorithms.schedules import sigma_schedule

        self.latent_shape(resolution)
        return list(sigma_schedule("sd3", tuple(step_list), None, shift=SHIFT))

    def sigma_vector(self, sigma: float | torch.Tensor, batch_size: int) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32, device=self.device).reshape(-1)
        if s.numel() == 1:
            return s.expand(batch_size)
        if s.numel() != batch_size:
            raise ValueError(f"sigma has {s.numel()} entries for a batch of {batch_size}: "
                             "pass a float or [B]")
        return s

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dt = self.model_dtype
        c = cond.to(self.device, dt)
        return self.transformer(hidden_states=x.to(dt), timestep=t,
                                encoder_hidden_states=c.tensors["prompt_embeds"],
                                pooled_projections=c.tensors["pooled"], return_dict=False)[0]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, guidance: float = 1.0,
                 uncond: Conditioning | None = None) -> torch.Tensor:
        """``v [B, 12, 16, 16]`` (dtype of ``x``) at latents ``x`` and ``sigma [B]``; classic CFG if > 1."""
        t = self.sigma_vector(sigma, x.shape[0]) * NUM_TRAIN_TIMESTEPS
        if guidance > 1.0:
            u = resolve_uncond(self, cond, uncond)
            pred = self._forward(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([u, cond]))
            v_u, v_c = pred.float().chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = self._forward(x, t, cond)
        return v.to(x.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, 32, 32]`` in [0, 1]: the exact inverse pixel shuffle (differentiable)."""
        return decode_latents(latents.float())

    def randn_latents(self, batch_size: int, resolution: int, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = (batch_size, *self.latent_shape(resolution))
        gen_device = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(self.device)


def build_shapes_backbone(*, pretrained_path: str | Path | None = None, dtype: str | torch.dtype = "fp32",
                          device: torch.device | str = "cpu", seed: int = 0, **kwargs: Any) -> ShapesBackbone:
    """Registry factory (``models.BACKBONES["shapes"]``); ``seed`` is unused (weights are loaded)."""
    return ShapesBackbone.from_pretrained(pretrained_path, dtype=dtype, device=device)

"""FLUX.1-dev (spec rewards-inference.md §4.2, algorithms.md §0 / §2.9).

Text: CLIP ``pooler_output`` (77 tokens) as ``pooled [B, 768]``; T5 at **512** tokens as
``prompt_embeds [B, 512, 4096]``; ``txt_ids`` are zeros ``[L, 3]``. Latents ``[B, 16, res/8, res/8]`` are
packed 2x2 into ``[B, (h/2)(w/2), 64]`` tokens inside ``velocity`` with ``img_ids = (0, row, col)``.
Timestep: ``sigma`` cast to the model dtype (the transformer multiplies by 1000 itself). Guidance: with
``guidance_embeds`` (dev) one forward with the distilled scalar; otherwise classic two-pass CFG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rtdmd_ray.models.base import Conditioning
from rtdmd_ray.models.common import DiffusersBackbone, cast_conditioning

FLUX1_DEV = "black-forest-labs/FLUX.1-dev"


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w] -> [B, (h/2)(w/2), 4C]``: each token carries one 2x2 patch, channel-major (c, i, j)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(
            f"FLUX latents must have even height/width to pack 2x2, got {h}x{w}: use a resolution "
            f"divisible by 16"
        )
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Exact inverse of ``pack_latents``: ``[B, (h/2)(w/2), 4C] -> [B, C, h, w]`` (h, w = height, width)."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"cannot unpack {n} tokens of {d} features into a {height}x{width} latent")
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Position ids ``[(h/2)(w/2), 3]`` of the packed grid: columns (0, row, column)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


class Flux1Backbone(DiffusersBackbone):
    """``FlowBackbone`` for FLUX.1 (dev: embedded guidance; schnell-like configs: classic CFG)."""

    family = "flux1"
    pipeline_class = "FluxPipeline"
    layout = {
        "transformer": ("diffusers", "FluxTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "T5TokenizerFast"),
    }

    def __init__(self, *, clip_max_length: int = 77, t5_max_length: int = 512, **kwargs: Any):
        self.clip_max_length = clip_max_length
        self.t5_max_length = t5_max_length
        super().__init__(**kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | Path = FLUX1_DEV,
        *,
        dtype: str | torch.dtype = "bf16",
        device: torch.device | str = "cpu",
        t5_max_length: int = 512,
        config_key: str = "model.pretrained_path",
    ) -> Flux1Backbone:
        """Load the diffusers layout from a local directory or a hub id (one-line error when absent)."""
        return cls(
            **cls.load_components(path_or_repo, dtype=dtype, config_key=config_key),
            device=device,
            t5_max_length=t5_max_length,
        )

    @property
    def guidance_embeds(self) -> bool:
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    @property
    def latent_divisor(self) -> int:
        return self.vae_scale_factor * 2  # the latent must pack 2x2

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """``prompt_embeds [B, t5_max_length, D_t5]`` (T5) and ``pooled [B, D_clip]`` (CLIP pooler output)."""
        prompts = list(prompts)
        clip: nn.Module = self.text_encoders["text_encoder"]
        ids = self.tokenizers["tokenizer"](
            prompts,
            padding="max_length",
            max_length=self.clip_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        pooled = clip(ids).pooler_output
        t5: nn.Module = self.text_encoders["text_encoder_2"]
        ids = self.tokenizers["tokenizer_2"](
            prompts, padding="max_length", max_length=self.t5_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        prompt_embeds = t5(ids).last_hidden_state
        return Conditioning({"prompt_embeds": prompt_embeds.to(self.dtype), "pooled": pooled.to(self.dtype)})

    # ------------------------------------------------------------------ denoiser
    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        self.check_resolution(resolution)
        side = resolution // self.vae_scale_factor
        return (int(self.transformer.config.in_channels) // 4, side, side)

    def image_seq_len(self, resolution: int) -> int:
        """Packed tokens ``(h/2)(w/2)``: 1024 at 512 px, 4096 at 1024 px for the real VAE."""
        _, h, w = self.latent_shape(resolution)
        return (h // 2) * (w // 2)

    def _forward(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, guidance: torch.Tensor | None
    ) -> torch.Tensor:
        _, _, h, w = x.shape
        dt = self.model_dtype
        c = cast_conditioning(cond, self.device, dt)
        emb = c.tensors["prompt_embeds"]
        out = self.transformer(
            hidden_states=pack_latents(x).to(dt),
            timestep=self.sigma_vector(sigma, x.shape[0]).to(dt),
            guidance=guidance,
            pooled_projections=c.tensors["pooled"],
            encoder_hidden_states=emb,
            txt_ids=torch.zeros(emb.shape[1], 3, device=self.device, dtype=dt),
            img_ids=latent_image_ids(h, w, self.device).to(dt),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance: float = 1.0,
        uncond: Conditioning | None = None,
    ) -> torch.Tensor:
        """``v [B, C, h, w]`` (dtype of ``x``). With ``guidance_embeds`` the scalar enters the model (one
        pass, ``uncond`` ignored); otherwise ``guidance > 1`` runs classic CFG with two passes."""
        b = x.shape[0]
        if self.guidance_embeds:
            g = torch.full((b,), float(guidance), device=self.device, dtype=torch.float32)
            v = self._forward(x, sigma, cond, g)
        elif guidance > 1.0:
            u = self._resolve_uncond(cond, uncond)
            v_c = self._forward(x, sigma, cond, None).float()
            v_u = self._forward(x, sigma, u, None).float()
            v = v_u + guidance * (v_c - v_u)
        else:
            v = self._forward(x, sigma, cond, None)
        return v.to(x.dtype)

    def _to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        return latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)

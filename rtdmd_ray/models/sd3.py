"""SD3-Medium and SD3.5-Medium (spec rewards-inference.md §4.1, algorithms.md §0 / §2.9).

Text: two CLIPs (penultimate hidden states, 77 tokens each, concatenated on features and zero-padded to T5's
width) followed on the sequence axis by T5 at **128** tokens -> ``prompt_embeds [B, 77 + 128, D_t5]``;
``pooled [B, P1 + P2]`` is the concatenation of the two CLIP projections. No attention masks.
Transformer timestep ``t = 1000 * sigma``. CFG: one doubled forward ``[uncond; cond]``.
Latents: 16 channels at resolution / 8; decode ``z / scaling_factor + shift_factor``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rtdmd_ray.models.base import Conditioning
from rtdmd_ray.models.common import DiffusersBackbone, cast_conditioning

SD3_MEDIUM = "stabilityai/stable-diffusion-3-medium-diffusers"
SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"


class SD3Backbone(DiffusersBackbone):
    """``FlowBackbone`` for SD3 / SD3.5 (and any ``SD3Transformer2DModel`` with the same text stack)."""

    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    layout = {
        "transformer": ("diffusers", "SD3Transformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_3": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "tokenizer_3": ("transformers", "T5TokenizerFast"),
    }

    def __init__(self, *, clip_max_length: int = 77, t5_max_length: int = 128, **kwargs: Any):
        self.clip_max_length = clip_max_length
        self.t5_max_length = t5_max_length
        super().__init__(**kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | Path = SD35_MEDIUM,
        *,
        dtype: str | torch.dtype = "bf16",
        device: torch.device | str = "cpu",
        t5_max_length: int = 128,
        config_key: str = "model.pretrained_path",
    ) -> SD3Backbone:
        """Load the diffusers layout from a local directory or a hub id (one-line error when absent)."""
        return cls(
            **cls.load_components(path_or_repo, dtype=dtype, config_key=config_key),
            device=device,
            t5_max_length=t5_max_length,
        )

    # ------------------------------------------------------------------ text
    def _clip(self, idx: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate hidden states ``[B, 77, D_i]`` and projected pooled ``[B, P_i]`` of CLIP ``idx``."""
        tok = self.tokenizers["tokenizer" + idx]
        enc: nn.Module = self.text_encoders["text_encoder" + idx]
        ids = tok(
            prompts,
            padding="max_length",
            max_length=self.clip_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        out = enc(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """``prompt_embeds [B, 77 + t5_max_length, D_t5]`` and ``pooled [B, P1 + P2]`` (model dtype)."""
        prompts = list(prompts)
        h1, p1 = self._clip("", prompts)
        h2, p2 = self._clip("_2", prompts)
        t5: nn.Module = self.text_encoders["text_encoder_3"]
        ids = self.tokenizers["tokenizer_3"](
            prompts, padding="max_length", max_length=self.t5_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        t5_h = t5(ids).last_hidden_state
        clip_h = torch.cat([h1, h2], dim=-1)
        # CLIP features are zero-padded up to T5's width so both fit one sequence
        clip_h = F.pad(clip_h, (0, t5_h.shape[-1] - clip_h.shape[-1]))
        prompt_embeds = torch.cat([clip_h.to(t5_h.dtype), t5_h], dim=-2)
        pooled = torch.cat([p1, p2], dim=-1)
        return Conditioning({"prompt_embeds": prompt_embeds.to(self.dtype), "pooled": pooled.to(self.dtype)})

    # ------------------------------------------------------------------ denoiser
    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        self.check_resolution(resolution)
        side = resolution // self.vae_scale_factor
        return (int(self.transformer.config.in_channels), side, side)

    def image_seq_len(self, resolution: int) -> int:
        _, h, w = self.latent_shape(resolution)
        p = int(self.transformer.config.patch_size)
        return (h // p) * (w // p)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dt = self.model_dtype
        c = cast_conditioning(cond, self.device, dt)
        return self.transformer(
            hidden_states=x.to(dt),
            timestep=t,
            encoder_hidden_states=c.tensors["prompt_embeds"],
            pooled_projections=c.tensors["pooled"],
            return_dict=False,
        )[0]

    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance: float = 1.0,
        uncond: Conditioning | None = None,
    ) -> torch.Tensor:
        """``v [B, C, h, w]`` (dtype of ``x``) at ``x``, ``sigma [B]``; the model sees ``t = 1000 sigma``."""
        t = self.sigma_vector(sigma, x.shape[0]) * self.num_train_timesteps
        if guidance > 1.0:
            u = self._resolve_uncond(cond, uncond)
            both = Conditioning.cat([u, cond])
            pred = self._forward(torch.cat([x, x]), torch.cat([t, t]), both)
            v_u, v_c = pred.float().chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = self._forward(x, t, cond)
        return v.to(x.dtype)

    def _to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        return latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)

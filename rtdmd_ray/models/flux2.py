"""FLUX.2-klein 4B / 9B (spec rewards-inference.md §4.3, algorithms.md §0 / §2.9).

Text: Qwen3 with the chat template (one user message, ``add_generation_prompt``, ``enable_thinking=False``),
padded to 512 tokens; hidden states of layers (9, 18, 27) stacked and concatenated on features ->
``prompt_embeds [B, 512, 3 D]``. Text ids ``(0, 0, 0, l)``; latent ids ``(0, h, w, 0)``, rows major.
Latents are already 2x2-patchified and batch-norm-normalised: ``[B, 128, res/16, res/16]``, flattened to
``[B, h w, 128]`` tokens. Timestep ``sigma`` in the model dtype. CFG (``guidance > 1``): two forwards.
Decode: ``z * sqrt(bn.running_var + eps) + bn.running_mean``, unpatchify (128 -> 32 channels, 2x size), VAE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rtdmd_ray.models.base import Conditioning
from rtdmd_ray.models.common import DiffusersBackbone, cast_conditioning

FLUX2_KLEIN_4B = "black-forest-labs/FLUX.2-klein-4B"
FLUX2_KLEIN_BASE_4B = "black-forest-labs/FLUX.2-klein-base-4B"
TEXT_LAYERS = (9, 18, 27)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, 2h, 2w] -> [B, 4C, h, w]``: sub-pixel ``(i, j)`` of channel ``c`` -> ``4c + 2i + j``."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Exact inverse of ``patchify``: ``[B, 4C, h, w] -> [B, C, 2h, 2w]``."""
    b, c4, h, w = latents.shape
    if c4 % 4:
        raise ValueError(f"unpatchify needs a channel count divisible by 4, got {c4}")
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def flatten_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w] -> [B, h w, C]`` (rows major), the FLUX.2 token layout."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unflatten_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``flatten_latents``: ``[B, h w, C] -> [B, C, h, w]``."""
    b, n, c = tokens.shape
    if n != height * width:
        raise ValueError(f"cannot unflatten {n} tokens into a {height}x{width} latent")
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


def latent_ids(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[h w, 4]`` coordinates ``(t=0, h=row, w=col, l=0)``, rows major."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=-1)


def text_ids(length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[L, 4]`` coordinates ``(t=0, h=0, w=0, l=index)``."""
    idx = torch.arange(length, device=device)
    zeros = torch.zeros_like(idx)
    return torch.stack([zeros, zeros, zeros, idx], dim=-1)


class Flux2Backbone(DiffusersBackbone):
    """``FlowBackbone`` for FLUX.2 (klein: no embedded guidance, classic CFG for the teacher)."""

    family = "flux2"
    pipeline_class = "Flux2KleinPipeline"
    layout = {
        "transformer": ("diffusers", "Flux2Transformer2DModel"),
        "vae": ("diffusers", "AutoencoderKLFlux2"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "Qwen3ForCausalLM"),
        "tokenizer": ("transformers", "Qwen2TokenizerFast"),
    }
    # the Qwen3 tokenizer class differs across transformers releases; AutoTokenizer reads it from the folder
    load_classes = {"tokenizer": "AutoTokenizer"}

    def __init__(self, *, max_length: int = 512, text_layers: tuple[int, ...] = TEXT_LAYERS, **kwargs: Any):
        self.max_length = max_length
        self.text_layers = tuple(text_layers)
        super().__init__(**kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | Path = FLUX2_KLEIN_4B,
        *,
        dtype: str | torch.dtype = "bf16",
        device: torch.device | str = "cpu",
        max_length: int = 512,
        text_layers: tuple[int, ...] = TEXT_LAYERS,
        config_key: str = "model.pretrained_path",
    ) -> Flux2Backbone:
        """Load the diffusers layout from a local directory or a hub id (one-line error when absent)."""
        return cls(
            **cls.load_components(path_or_repo, dtype=dtype, config_key=config_key),
            device=device,
            max_length=max_length,
            text_layers=text_layers,
        )

    @property
    def guidance_embeds(self) -> bool:
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    @property
    def latent_divisor(self) -> int:
        return self.vae_scale_factor * 2  # VAE factor x the 2x2 patchify

    # ------------------------------------------------------------------ text
    def chat_text(self, prompt: str) -> str:
        """The prompt wrapped in the Qwen3 chat template (user turn, generation prompt, no thinking)."""
        return self.tokenizers["tokenizer"].apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """``prompt_embeds [B, max_length, len(text_layers) * D]``: Qwen3 hidden states of ``text_layers``."""
        tok = self.tokenizers["tokenizer"]
        enc = tok(
            [self.chat_text(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        lm: nn.Module = self.text_encoders["text_encoder"]
        # the decoder stack alone: the LM head's [B, L, vocab] logits are never used
        body = getattr(lm, "model", lm)
        out = body(
            input_ids=enc.input_ids.to(self.device),
            attention_mask=enc.attention_mask.to(self.device),
            output_hidden_states=True,
            use_cache=False,
        )
        hs = torch.stack([out.hidden_states[k] for k in self.text_layers], dim=1)  # [B, n, L, D]
        b, n, length, d = hs.shape
        embeds = hs.permute(0, 2, 1, 3).reshape(b, length, n * d)
        return Conditioning({"prompt_embeds": embeds.to(self.dtype)})

    # ------------------------------------------------------------------ denoiser
    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        self.check_resolution(resolution)
        side = resolution // self.latent_divisor
        return (int(self.transformer.config.in_channels), side, side)

    def image_seq_len(self, resolution: int) -> int:
        """Latent tokens ``h w`` (already patchified): 1024 at 512 px, 4096 at 1024 px for the real VAE."""
        _, h, w = self.latent_shape(resolution)
        return h * w

    def _forward(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, guidance: float
    ) -> torch.Tensor:
        b, _, h, w = x.shape
        dt = self.model_dtype
        emb = cast_conditioning(cond, self.device, dt).tensors["prompt_embeds"]
        g = (
            torch.full((b,), float(guidance), device=self.device, dtype=torch.float32)
            if self.guidance_embeds
            else None
        )
        out = self.transformer(
            hidden_states=flatten_latents(x).to(dt),
            encoder_hidden_states=emb,
            timestep=self.sigma_vector(sigma, x.shape[0]).to(dt),
            img_ids=latent_ids(h, w, self.device),
            txt_ids=text_ids(emb.shape[1], self.device),
            guidance=g,
            return_dict=False,
        )[0]
        return unflatten_latents(out[:, : h * w], h, w)

    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        guidance: float = 1.0,
        uncond: Conditioning | None = None,
    ) -> torch.Tensor:
        """``v [B, C, h, w]`` (dtype of ``x``); ``guidance > 1``: ``v_u + g (v_c - v_u)``, two forwards."""
        v = self._forward(x, sigma, cond, guidance)
        if guidance > 1.0:
            v_u = self._forward(x, sigma, self._resolve_uncond(cond, uncond), guidance).float()
            v = v_u + guidance * (v.float() - v_u)
        return v.to(x.dtype)

    def _to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, torch.float32)
        std = torch.sqrt(
            bn.running_var.view(1, -1, 1, 1).to(latents.device, torch.float32)
            + self.vae.config.batch_norm_eps
        )
        return unpatchify(latents.float() * std + mean)

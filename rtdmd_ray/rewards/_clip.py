"""A transformers ``CLIPModel`` with its tokenizer and image settings: the shared body of PickScore,
CLIPScore,
HPSv2 and the aesthetic / GenEval colour heads.

Loads any saved CLIP directory generically: image size, crop and mean/std come from its
``preprocessor_config.json`` (so a 32 px ShapeWorld CLIP and the 224 px ViT-H go through the same code).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rtdmd_ray.rewards._common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    clip_preprocess,
    load_or_missing,
    processor_image_settings,
    resolve_device,
    upcast,
)


def load_image_processor(source: str) -> Any:
    """The PIL-backend CLIP image processor (the default backend needs torchvision)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(source)


def image_settings_of(processor: Any) -> dict[str, Any]:
    """Resize/crop sizes and mean/std of a loaded CLIP image processor."""
    d = processor.to_dict()
    return processor_image_settings(d)


class ClipTower:
    """``CLIPModel`` + tokenizer + image settings, frozen, on ``device``.

    Args:
        model: CLIPModel instance (already loaded).
        tokenizer: its tokenizer.
        image_settings: ``{"size", "crop_size", "mean", "std"}``.
        image_processor: optional PIL-backend processor (for the reference's PIL/bicubic scoring paths).
        device: torch device.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_settings: dict[str, Any],
        *,
        image_processor: Any = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = tokenizer
        self.image_settings = image_settings
        self.image_processor = image_processor
        self.max_text_len = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls,
        scorer: str,
        source: str,
        *,
        device: str | torch.device = "cpu",
        processor_source: str | None = None,
        option: str = "model",
    ) -> ClipTower:
        """Load model and tokenizer from ``source`` and image settings from ``processor_source or source``.

        A missing local dir or an unreachable hub id raises ``RewardWeightsMissing`` (one line).
        """
        from transformers import AutoTokenizer, CLIPModel

        model = load_or_missing(scorer, source, lambda s: CLIPModel.from_pretrained(s), option=option)
        psrc = processor_source or source
        tokenizer = load_or_missing(
            scorer, psrc, lambda s: AutoTokenizer.from_pretrained(s), option="processor"
        )
        try:
            processor = load_image_processor(psrc)
            settings = image_settings_of(processor)
        except OSError:
            # no preprocessor_config.json: fall back to the vision config's size and OpenAI statistics
            processor = None
            size = int(model.config.vision_config.image_size)
            settings = {"size": size, "crop_size": size, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD}
        return cls(model, tokenizer, settings, image_processor=processor, device=device)

    # ------------------------------------------------------------------------------------- text

    def tokenize(self, prompts: list[str], *, padding: str | bool, max_length: int = 77) -> dict[str, Any]:
        """Token ids and mask on device. ``padding="max_length"`` pads to ``min(max_length, model limit)``."""
        enc = self.tokenizer(
            prompts,
            padding=padding,
            truncation=True,
            max_length=min(max_length, self.max_text_len),
            return_tensors="pt",
        )
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
        }

    def text_embeds(self, prompts: list[str], *, padding: str | bool, max_length: int = 77) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, E]``; duplicated prompts (GRPO groups) are encoded once."""
        unique = list(dict.fromkeys(prompts))
        tok = self.tokenize(unique, padding=padding, max_length=max_length)
        out = self.model.text_model(**tok)
        emb = self.model.text_projection(out.pooler_output)
        emb = F.normalize(upcast(emb), dim=-1)
        index = torch.tensor([unique.index(p) for p in prompts], device=emb.device)
        return emb[index]

    # ----------------------------------------------------------------------------------- images

    def preprocess_tensor(self, images: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """Float ``[B, 3, H, W]`` in [0, 1] -> normalised pixel values (differentiable torch ops)."""
        s = self.image_settings
        return clip_preprocess(
            images, size=s["size"], crop_size=s["crop_size"], mean=s["mean"], std=s["std"], mode=mode
        )

    def preprocess_pil(self, pil_images: list[Any]) -> torch.Tensor:
        """The HF processor's PIL path (bicubic resize, crop, rescale, normalise) -> ``[B, 3, c, c]``."""
        if self.image_processor is None:
            raise RuntimeError("this CLIP directory has no preprocessor_config.json; the PIL path needs it")
        return self.image_processor(images=pil_images, return_tensors="pt")["pixel_values"]

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, E]`` of preprocessed pixels."""
        dtype = self.model.visual_projection.weight.dtype
        out = self.model.vision_model(pixel_values=pixel_values.to(self.device, dtype))
        emb = self.model.visual_projection(out.pooler_output)
        return F.normalize(upcast(emb), dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return upcast(self.model.logit_scale.exp())

"""HPSv3 (spec rewards-inference.md §1.3): Qwen2-VL-7B-Instruct with a RankNet head; the score is mu.

Two backends:

- ``transformers`` (default, our reimplementation of the ``hpsv3`` package's inference on maintained classes):
  transformers ``Qwen2VLForConditionalGeneration`` built from the base model's config and processor (default
  ``Qwen/Qwen2-VL-7B-Instruct``), the ``<|Reward|>`` special token added and the embeddings resized, the whole
  checkpoint (``HPSv3.safetensors``) loaded strictly after renaming its keys to the current layout
  (``visual.`` -> ``model.visual.``, ``model.`` -> ``model.language_model.``). Per image: resize to exactly
  256·28·28 pixels (``qwen_vl_utils.smart_resize`` then PIL bicubic), one user turn with the image and the
  HPSv3 instruction ending in ``<|Reward|>``, right padding; the fp32 head ``hidden -> 1024 -> 16 -> 2``
  (ReLU) reads the last hidden state at the ``<|Reward|>`` token; column 0 (mu) is the reward (about 8-16).
  Body in bf16 (the package's default), head in fp32.
- ``package`` (paper-exact when its stack installs): ``hpsv3.HPSv3RewardInferencer`` with the reference's
  compatibility patches, applied only while it is built. The package pins an older transformers and pulls
  torchvision, so it does not import on our CPU stack: give its reward actor its own Ray ``runtime_env``.

What is not real here: no HPSv3 weights can be downloaded on the CPU machines, so the transformers path is
tested on a tiny random Qwen2-VL with a synthetic checkpoint in the original key layout; the numeric match
with the package on the real 7B checkpoint is unverified.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rtdmd_ray.rewards._common import (
    as_scores,
    check_images,
    find_pretrained,
    load_or_missing,
    load_state_dict_file,
    load_strict,
    no_init,
    resolve_device,
    reward_ckpt_root,
    to_pil,
)
from rtdmd_ray.rewards.base import RewardWeightsMissing

BASE_HUB_ID = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
IMAGE_PIXELS = 256 * 28 * 28
CONFIG_ENV = "RTDMD_HPSV3_CONFIG_PATH"
CHECKPOINT_ENV = "RTDMD_HPSV3_CHECKPOINT_PATH"
CONFIG_NAMES = ("config.yaml", "config.yml", "hpsv3.yaml", "inferencer_config.yaml", "HPSv3_7B.yaml")
CHECKPOINT_NAMES = (
    "HPSv3.safetensors", "HPS_v3.1_compressed.pt", "HPS_v3_compressed.pt", "HPSv3.pt", "hpsv3.pt",
    "checkpoint.pt", "checkpoint.pth", "model.pt", "model.pth", "model.safetensors", "pytorch_model.bin",
)

# The package's prompt (hpsv3/dataset/data_collator_qwen.py), with the special-token suffix it always uses.
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 
Textual prompt - {text_prompt}


"""  # noqa: E501, W291 - verbatim prompt text, trailing spaces included
PROMPT_WITH_SPECIAL_TOKEN = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def hpsv3_text(prompt: str) -> str:
    """The user text of one HPSv3 query."""
    return INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``qwen_vl_utils.smart_resize``: sides rounded to multiples of ``factor``, area brought into
    [min_pixels, max_pixels] by one rescale (floor when shrinking, ceil when growing)."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def remap_hpsv3_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers-4.4x Qwen2-VL keys to the current layout (``model.visual.``,
    ``model.language_model.``).

    ``lm_head.*`` and ``rm_head.*`` keep their names; already-current keys are unchanged.
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module.") :]
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model.") and not k.startswith(("model.visual.", "model.language_model.")):
            k = "model.language_model." + k[len("model.") :]
        out[k] = v
    return out


def ranknet_head(hidden_size: int, output_dim: int = 2) -> nn.Sequential:
    """The package's ``ranknet`` head: h -> 1024 (ReLU, dropout), -> 16 (ReLU) -> 2."""
    return nn.Sequential(
        nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
        nn.Linear(16, output_dim),
    )


def find_checkpoint(ckpt_dir: str | os.PathLike[str] | None, explicit: str | None) -> Path:
    """``explicit`` > ``$RTDMD_HPSV3_CHECKPOINT_PATH`` > first known file name in ``<root>/hpsv3``,
    ``<root>/HPSv3``, ``<root>``; else ``RewardWeightsMissing``."""
    env = os.environ.get(CHECKPOINT_ENV, "").strip()
    for cand in (explicit, env):
        if cand and Path(cand).is_file():
            return Path(cand)
    root = reward_ckpt_root(ckpt_dir)
    if root is not None:
        for d in (root / "hpsv3", root / "HPSv3", root):
            for name in CHECKPOINT_NAMES:
                if (d / name).is_file():
                    return d / name
    raise RewardWeightsMissing(
        f"hpsv3: checkpoint HPSv3.safetensors (hub MizzenAI/HPSv3) not found; put it under "
        f"$RTDMD_REWARD_CKPT_PATH/hpsv3 or set ${CHECKPOINT_ENV} (or rewards.options.hpsv3.checkpoint)"
    )


class HPSv3Model(nn.Module):
    """Qwen2-VL body + RankNet head reading the hidden state at the ``<|Reward|>`` token: ``[B, 2]``."""

    def __init__(self, vlm: Any, reward_token_id: int) -> None:
        super().__init__()
        self.vlm = vlm
        self.rm_head = ranknet_head(int(vlm.config.text_config.hidden_size)).float()
        self.reward_token_id = int(reward_token_id)

    def forward(self, **inputs: Any) -> torch.Tensor:
        input_ids = inputs["input_ids"]
        hidden = self.vlm.model(**inputs).last_hidden_state  # [B, L, D]
        mask = input_ids == self.reward_token_id
        if not torch.equal(mask.sum(dim=1), torch.ones_like(mask.sum(dim=1))):
            raise RuntimeError("hpsv3: every query must contain exactly one <|Reward|> token")
        return self.rm_head(hidden[mask].float())  # [B, 2] (mu, sigma)


@contextlib.contextmanager
def _package_compat() -> Iterator[None]:
    """The reference's patches for the ``hpsv3`` package, undone on exit (the reference left them global)."""
    import safetensors.torch
    import transformers.image_utils as image_utils

    saved_load, had_video = safetensors.torch.load_file, hasattr(image_utils, "VideoInput")
    if not had_video:
        image_utils.VideoInput = object

    def load_file(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        return remap_hpsv3_keys(saved_load(path, device=device))

    safetensors.torch.load_file = load_file
    try:
        yield
    finally:
        safetensors.torch.load_file = saved_load
        if not had_video:
            del image_utils.VideoInput


class _PackageBackend:
    def __init__(self, config_path: str | None, checkpoint_path: str, device: torch.device) -> None:
        try:
            with _package_compat():
                from hpsv3 import HPSv3RewardInferencer

                self.inferencer = HPSv3RewardInferencer(
                    config_path=config_path, checkpoint_path=checkpoint_path, device=str(device)
                )
        except ImportError as exc:
            raise ImportError(
                "hpsv3 backend 'package' needs hpsv3==1.0.0 (its own stack: run the reward actor with a "
                "runtime_env), or use rewards.options.hpsv3.backend='transformers'"
            ) from exc

    def __call__(self, pils: list[Any], prompts: list[str]) -> torch.Tensor:
        out = self.inferencer.reward(prompts=prompts, image_paths=pils).float()
        return out[:, 0] if out.ndim == 2 else out


class HPSv3Scorer:
    """HPSv3 preference score (mu).

    Args:
        ckpt_dir: reward checkpoint root (``hpsv3/HPSv3.safetensors``; optionally ``Qwen2-VL-7B-Instruct/``).
        device: torch device.
        backend: ``"transformers"`` (default) or ``"package"``.
        checkpoint: explicit checkpoint path.
        base_model: base Qwen2-VL directory or hub id providing config + processor.
        config_path: the package's YAML config (``package`` backend).
        dtype: body dtype (bf16 as in the package); the head stays fp32.
        image_pixels: pixels per image after resizing (256·28·28).
    """

    name = "hpsv3"
    differentiable = False

    def __init__(
        self,
        *,
        ckpt_dir: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        backend: str = "transformers",
        checkpoint: str | None = None,
        base_model: str | None = None,
        config_path: str | None = None,
        dtype: str = "bfloat16",
        image_pixels: int = IMAGE_PIXELS,
    ) -> None:
        self.device = resolve_device(device)
        self.image_pixels = int(image_pixels)
        ckpt = find_checkpoint(ckpt_dir, checkpoint)
        if backend == "package":
            cfg = config_path or os.environ.get(CONFIG_ENV, "").strip() or None
            self._package: _PackageBackend | None = _PackageBackend(cfg, str(ckpt), self.device)
            return
        if backend != "transformers":
            raise ValueError(
                f"rewards.options.hpsv3.backend must be 'transformers' or 'package', got {backend!r}"
            )
        self._package = None
        from transformers import AutoConfig, Qwen2VLForConditionalGeneration

        from rtdmd_ray.rewards._vlm import load_vlm_processor

        base = find_pretrained(
            ckpt_dir, ["Qwen2-VL-7B-Instruct", BASE_HUB_ID], BASE_HUB_ID, explicit=base_model
        )
        config = load_or_missing(
            self.name, base, lambda s: AutoConfig.from_pretrained(s), option="base_model"
        )
        self.processor = load_or_missing(self.name, base, load_vlm_processor, option="base_model")
        self.processor.tokenizer.padding_side = "right"
        self.processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        reward_id = self.processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        with no_init():
            vlm = Qwen2VLForConditionalGeneration(config)
        vlm.resize_token_embeddings(len(self.processor.tokenizer))
        model = HPSv3Model(vlm, reward_id)
        sd = remap_hpsv3_keys(load_state_dict_file(ckpt))
        head = {k[len("rm_head.") :]: v for k, v in sd.items() if k.startswith("rm_head.")}
        body = {k: v for k, v in sd.items() if not k.startswith("rm_head.")}
        load_strict(model.vlm, body, self.name, ckpt)
        load_strict(model.rm_head, head, self.name, ckpt)
        model.vlm.to(getattr(torch, dtype))
        model.rm_head.float()
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.model.vlm.config.pad_token_id = self.processor.tokenizer.pad_token_id

    def resize(self, pil: Any) -> Any:
        """``qwen_vl_utils.fetch_image``: smart-resize to ``image_pixels`` (multiples of 28), PIL bicubic."""
        from PIL import Image

        h, w = smart_resize(pil.height, pil.width, 28, self.image_pixels, self.image_pixels)
        return pil.resize((w, h), Image.BICUBIC)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        check_images(images, prompts, self.name)
        if not prompts:
            return {self.name: torch.zeros(0)}
        pils = to_pil(images)
        if self._package is not None:
            return {self.name: as_scores(self._package(pils, prompts))}
        pils = [self.resize(p) for p in pils]
        convs = [[{"role": "user", "content": [{"type": "image", "image": im},
                                               {"type": "text", "text": hpsv3_text(t)}]}]
                 for im, t in zip(pils, prompts, strict=True)]
        texts = self.processor.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
        batch = self.processor(text=texts, images=pils, padding=True, return_tensors="pt").to(self.device)
        return {self.name: as_scores(self.model(**batch)[:, 0])}

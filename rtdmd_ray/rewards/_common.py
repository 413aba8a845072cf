"""Helpers shared by the scorers: 8-bit quantisation, tensor preprocessing with a gradient path, checkpoint
resolution with one-line errors, and small output utilities.

Images are float ``[B, 3, H, W]`` in [0, 1] unless a name says otherwise. Every preprocessing function here
uses torch ops only (no torchvision, no PIL), so gradients flow from the score back to the image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from rtdmd_ray.rewards.base import RewardWeightsMissing

REWARD_CKPT_ENV = "RTDMD_REWARD_CKPT_PATH"

# OpenAI CLIP statistics; PickScore, HPSv2, CLIPScore, Aesthetic and ImageReward all normalise with them.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Value the reference writes for "not applicable" entries (per-tag GenEval keys, empty GenEval2 VQA lists).
SENTINEL = -10.0

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- inputs


def check_images(images: torch.Tensor, prompts: Sequence[str], scorer: str) -> None:
    """Raise a teaching error unless ``images`` is ``[B, 3, H, W]`` float and ``len(prompts) == B``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{scorer}: images must be a float tensor [B, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(
            f"{scorer}: images must be float in [0, 1] (got {images.dtype}); divide uint8 images by 255"
        )
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{scorer}: {images.shape[0]} images but {len(prompts)} prompts (one per image)")


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` float in [0, 1] -> uint8 ``[B, 3, H, W]`` via ``round(x * 255)`` clamped to 0..255.

    Every non-differentiable scorer sees 8-bit images, so scores match what a saved PNG would get (spec §1.0).
    """
    return (images.detach().float() * 255.0).round().clamp(0, 255).to(torch.uint8)


def quantized_float(images: torch.Tensor) -> torch.Tensor:
    """The 8-bit quantised image back in float [0, 1] (what clipscore/hpsv2 receive in the reference)."""
    return quantize_uint8(images).float() / 255.0


def to_numpy_hwc(images: torch.Tensor) -> np.ndarray:
    """uint8 ``[B, H, W, 3]`` numpy array (RGB) of the quantised images."""
    return quantize_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Any]:
    """List of RGB ``PIL.Image`` of the quantised images."""
    from PIL import Image

    return [Image.fromarray(a) for a in to_numpy_hwc(images)]


# ------------------------------------------------------------------------------ differentiable preprocessing


def resize_shorter_side(images: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize so the shorter side is ``size`` (torchvision ``Resize(size)`` semantics, antialiased).

    The longer side becomes ``int(size * long / short)`` as in torchvision.
    """
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = size, int(size * long / short)
    new_hw = (new_short, new_long) if h <= w else (new_long, new_short)
    if new_hw == (h, w):
        return images
    return F.interpolate(images, size=new_hw, mode=mode, align_corners=False, antialias=True)


def center_crop(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Centre crop to ``size`` (torchvision offsets: ``int(round((H - h) / 2))``). Pads with 0 if smaller."""
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = images.shape[-2:]
    if h < th or w < tw:
        pad_h, pad_w = max(th - h, 0), max(tw - w, 0)
        images = F.pad(images, [pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2])
        h, w = images.shape[-2:]
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return images[..., top : top + th, left : left + tw]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Channel-wise ``(x - mean) / std`` on ``[B, 3, H, W]``."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def clip_preprocess(
    images: torch.Tensor,
    *,
    size: int,
    crop_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    mode: str = "bilinear",
) -> torch.Tensor:
    """CLIP tensor pipeline: shorter side to ``size``, centre crop, normalise. ``[B,3,H,W] -> [B,3,c,c]``.

    The reference's BP path (spec §1.10) uses torchvision's bilinear antialiased resize, not the PIL bicubic
    of the processor; ``mode`` selects it.
    """
    out = resize_shorter_side(images, size, mode=mode)
    out = center_crop(out, crop_size if crop_size is not None else size)
    return normalize(out, mean, std)


def resize_max_side_and_pad(images: torch.Tensor, size: int = 224, fill: float = 0.0) -> torch.Tensor:
    """open_clip ``ResizeMaxSize``: longer side to ``size`` (bicubic, antialiased), centre pad to a square.

    ``[B, 3, H, W] -> [B, 3, size, size]``. A 512x1024 (HxW) image becomes 112x224 padded with 56 rows of
    ``fill`` on top and bottom (spec §7.7).
    """
    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    if (new_h, new_w) != (h, w):
        images = F.interpolate(
            images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
        )
    pad_h, pad_w = size - new_h, size - new_w
    # open_clip pads [left, top, right, bottom] = [pw//2, ph//2, pw - pw//2, ph - ph//2]
    return F.pad(images, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=fill)


def processor_image_settings(processor_config: dict[str, Any], default_size: int = 224) -> dict[str, Any]:
    """Read resize/crop size and mean/std from a saved ``preprocessor_config.json`` dict (any CLIP family)."""
    size = processor_config.get("size", default_size)
    if isinstance(size, dict):
        size = size.get("shortest_edge") or size.get("height") or default_size
    crop = processor_config.get("crop_size", size)
    if isinstance(crop, dict):
        crop = (crop.get("height", size), crop.get("width", size))
    if not processor_config.get("do_center_crop", True):
        crop = size
    return {
        "size": int(size),
        "crop_size": crop if isinstance(crop, tuple) else int(crop),
        "mean": tuple(processor_config.get("image_mean", OPENAI_CLIP_MEAN)),
        "std": tuple(processor_config.get("image_std", OPENAI_CLIP_STD)),
    }


# ------------------------------------------------------------------------------------- checkpoints


def reward_ckpt_root(ckpt_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The reward checkpoint root: the ``ckpt_dir`` argument, else ``$RTDMD_REWARD_CKPT_PATH``, else None.

    Read at call time (the reference binds it at import time, so a later change was silently ignored).
    """
    if ckpt_dir:
        return Path(os.path.expanduser(str(ckpt_dir)))
    env = os.environ.get(REWARD_CKPT_ENV, "").strip()
    return Path(os.path.expanduser(env)) if env else None


def _root_text(root: Path | None) -> str:
    return f"{REWARD_CKPT_ENV}={root}" if root else f"${REWARD_CKPT_ENV} is unset"


def find_file(
    scorer: str,
    ckpt_dir: str | os.PathLike[str] | None,
    candidates: Sequence[str],
    *,
    explicit: str | os.PathLike[str] | None = None,
    option: str | None = None,
) -> Path:
    """First existing ``root/candidate`` (or ``explicit``); else raise ``RewardWeightsMissing`` (one line)."""
    if explicit:
        p = Path(os.path.expanduser(str(explicit)))
        if p.is_file():
            return p
        raise RewardWeightsMissing(
            f"{scorer}: weights file {p} does not exist; fix rewards.options.{scorer}.{option}"
        )
    root = reward_ckpt_root(ckpt_dir)
    if root is not None:
        for name in candidates:
            if (root / name).is_file():
                return root / name
    opt = f" or set rewards.options.{scorer}.{option}" if option else ""
    raise RewardWeightsMissing(
        f"{scorer}: weights file {candidates[0]} not found ({_root_text(root)}); download it into "
        f"${REWARD_CKPT_ENV} (or pass ckpt_dir){opt}"
    )


def find_pretrained(
    ckpt_dir: str | os.PathLike[str] | None,
    subdirs: Sequence[str],
    hub_id: str,
    explicit: str | os.PathLike[str] | None = None,
) -> str:
    """A local HF model directory (``root/subdir`` holding a config file) if one exists, else the hub id.

    ``explicit`` (a path or hub id given in the config) always wins.
    """
    if explicit:
        return os.path.expanduser(str(explicit))
    root = reward_ckpt_root(ckpt_dir)
    if root is not None:
        for sub in subdirs:
            d = root / sub if sub else root
            if any(
                (d / f).is_file()
                for f in ("config.json", "preprocessor_config.json", "tokenizer_config.json")
            ):
                return str(d)
    return hub_id


def load_or_missing(scorer: str, source: str, loader: Callable[[str], T], *, option: str | None = None) -> T:
    """Call ``loader(source)``; turn "not found / offline" errors into a one-line ``RewardWeightsMissing``."""
    try:
        return loader(source)
    except (OSError, ValueError) as exc:  # HF raises OSError (missing/offline) or ValueError (bad repo id)
        opt = f" or set rewards.options.{scorer}.{option}" if option else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RewardWeightsMissing(
            f"{scorer}: cannot load {source!r} ({first[:160]}); place it under ${REWARD_CKPT_ENV} (or pass "
            f"ckpt_dir){opt}, or allow a hub download (HF_HUB_OFFLINE=0)"
        ) from None


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` / ``.pt`` / ``.bin`` / ``.pth`` state dict on CPU (``weights_only``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    return obj


def strip_prefix(state_dict: dict[str, Any], prefixes: Sequence[str] = ("module.",)) -> dict[str, Any]:
    """Remove wrapper prefixes (DDP ``module.``) from every key."""
    out = {}
    for k, v in state_dict.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def load_strict(module: torch.nn.Module, state_dict: dict[str, Any], scorer: str, source: Path) -> None:
    """``load_state_dict(strict=True)`` with a short error naming the first missing/unexpected keys."""
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RewardWeightsMissing(
            f"{scorer}: {source} does not match the model (missing {list(missing)[:3]}..., unexpected "
            f"{list(unexpected)[:3]}...); is it the right checkpoint file?"
        )


# ------------------------------------------------------------------------------------------ outputs


def as_scores(values: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Float32 CPU ``[B]`` tensor, detached."""
    if isinstance(values, torch.Tensor):
        return values.detach().float().reshape(-1).cpu()
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def chunks(n: int, size: int | None) -> list[slice]:
    """Contiguous slices covering ``range(n)``, at most ``size`` items each (one slice if size is None)."""
    if not size or size >= n:
        return [slice(0, n)]
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def array_split_slices(n: int, max_per_chunk: int) -> list[slice]:
    """``numpy.array_split`` into ``ceil(n / max_per_chunk)`` nearly equal, order-preserving sections."""
    if n == 0:
        return []
    sections = math.ceil(n / max_per_chunk)
    base, extra = divmod(n, sections)
    out, start = [], 0
    for i in range(sections):
        size = base + (1 if i < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Half/bfloat16 -> float32; float32/float64 unchanged (float64 keeps finite-difference checks exact)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device``; "cuda" without CUDA is an error that names the fix."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"reward device {device!r} but CUDA is unavailable; set rewards.device='cpu'")
    return dev


def no_init() -> Any:
    """Context that skips random weight init while building a model whose weights are then loaded strictly."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()

"""OCR reward (spec rewards-inference.md §1.7): ``1 - min(lev(R, T), len(T)) / len(T)``, 1 on a substring hit.

T is the text between the prompt's first pair of double quotes, R the concatenation of every recognised line
with confidence > 0 (in the order returned, no separator); both are stripped of spaces and lower-cased.

Backends:

- ``paddleocr`` (paper-exact): PaddleOCR 2.x, ``PaddleOCR(use_angle_cls=False, lang="en", use_gpu=False)``,
  ``ocr(img, cls=False)``. It downloads its models at first use into the cache chosen as in the reference
  (``RTDMD_PADDLEOCR_HOME``, else ``<ckpt root>/.paddleocr``), so it needs a network or a populated cache.
- ``rapidocr`` (the convenient default): ``rapidocr-onnxruntime``, whose wheel ships the PP-OCRv4 ONNX
  detection and recognition weights, so the reward runs for real offline. Same PP-OCR model family, but v4
  weights on onnxruntime: numbers are close to, not identical with, the paper's PaddleOCR 2.9.1.

Images are 8-bit and processed one at a time on CPU. Not differentiable.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rtdmd_ray.rewards._common import as_scores, check_images, reward_ckpt_root, to_numpy_hwc

PADDLEOCR_HOME_ENV = "RTDMD_PADDLEOCR_HOME"
_MODEL_SUFFIXES = (".pdiparams", ".pdmodel", ".json", ".onnx")


# ------------------------------------------------------------------------------------------ arithmetic


def extract_target(prompt: str) -> str:
    """Text between the first pair of double quotes (``prompt.split('"')[1]``).

    Raises:
        IndexError: the prompt has no double quote (as in the reference; OCR prompts must quote their text).
    """
    parts = prompt.split('"')
    if len(parts) < 2:
        raise IndexError(f'ocr: prompt has no "quoted" target text: {prompt[:80]!r}; OCR prompts quote it')
    return parts[1]


def normalize_text(text: str) -> str:
    """Remove every space and lower-case."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert/delete/substitute, cost 1); uses the ``Levenshtein`` package when installed."""
    try:
        import Levenshtein

        return int(Levenshtein.distance(a, b))
    except ImportError:
        pass
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_similarity(recognized: str, target: str) -> float:
    """``1 - d / len(T)`` in [0, 1]; ``d = 0`` if T is a substring of R, else ``min(lev(R, T), len(T))``."""
    r, t = normalize_text(recognized), normalize_text(target)
    if not t:
        raise ValueError(f"ocr: the quoted target {target!r} is empty after removing spaces; fix the prompt")
    d = 0 if t in r else min(levenshtein(r, t), len(t))
    return 1.0 - d / len(t)


def join_lines(lines: list[tuple[str, float]]) -> str:
    """Concatenate recognised texts whose confidence is > 0, in order, with no separator."""
    return "".join(text for text, conf in lines if conf > 0)


# ---------------------------------------------------------------------------------------------- backends


class OCRBackend(Protocol):
    def recognize(self, image_rgb: np.ndarray) -> list[tuple[str, float]]:
        """``uint8 [H, W, 3]`` RGB -> ``[(text, confidence), ...]`` in reading order."""
        ...


class RapidOCRBackend:
    """PP-OCRv4 detection + recognition on onnxruntime (weights inside the ``rapidocr-onnxruntime`` wheel)."""

    def __init__(self) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise ImportError(
                "ocr backend 'rapidocr' needs rapidocr-onnxruntime: pip install rapidocr-onnxruntime==1.4.4 "
                "(or set rewards.options.ocr.backend='paddleocr')"
            ) from exc
        # PaddleOCR 2.x detector resizing (longer side capped at 960, never upscaled); rapidocr's own default
        # upscales the shorter side to 736, which is slower and differs from the paper's backend
        self.engine = RapidOCR(det_limit_side_len=960, det_limit_type="max")

    def recognize(self, image_rgb: np.ndarray) -> list[tuple[str, float]]:
        # ndarrays are taken as BGR (cv2 convention), so swap channels
        result, _ = self.engine(np.ascontiguousarray(image_rgb[..., ::-1]), use_cls=False)
        return [(str(r[1]), float(r[2])) for r in (result or [])]


def paddleocr_home(ckpt_dir: str | os.PathLike[str] | None, repo_root: Path | None = None) -> Path:
    """PaddleOCR cache dir, in the reference's order: env, populated ``<ckpt>/.paddleocr``, populated
    ``<repo>/.paddleocr``, else ``<ckpt>/.paddleocr`` (the download target)."""
    env = os.environ.get(PADDLEOCR_HOME_ENV, "").strip()
    if env:
        return Path(os.path.expanduser(env))
    root = reward_ckpt_root(ckpt_dir)
    ckpt_cache = (root or Path.home() / ".cache" / "rtdmd") / ".paddleocr"
    repo_cache = (repo_root or Path(__file__).resolve().parents[2]) / ".paddleocr"

    def populated(d: Path) -> bool:
        return d.is_dir() and any(p.suffix in _MODEL_SUFFIXES for p in d.rglob("*"))

    for d in (ckpt_cache, repo_cache):
        if populated(d):
            return d
    return ckpt_cache


class PaddleOCRBackend:
    """PaddleOCR 2.x exactly as the reference builds it (paper-exact numbers)."""

    def __init__(self, ckpt_dir: str | os.PathLike[str] | None = None, init_attempts: int = 3) -> None:
        try:
            import paddleocr
            from paddleocr import PaddleOCR
        except ImportError as exc:
            raise ImportError(
                "ocr backend 'paddleocr' needs paddleocr==2.9.1 + paddlepaddle (give the reward actor its "
                "own runtime_env, see README), or use rewards.options.ocr.backend='rapidocr'"
            ) from exc
        home = paddleocr_home(ckpt_dir)
        home.mkdir(parents=True, exist_ok=True)
        paddleocr.paddleocr.BASE_DIR = str(home)
        for attempt in range(1, init_attempts + 1):
            try:
                self.engine = PaddleOCR(use_angle_cls=False, lang="en", use_gpu=False, show_log=False)
                break
            except FileNotFoundError as exc:
                # two workers downloading the same archive race on its .tmp file: wait and retry
                if ".tmp" not in str(exc) or attempt == init_attempts:
                    raise
                time.sleep(1.5 * attempt)

    def recognize(self, image_rgb: np.ndarray) -> list[tuple[str, float]]:
        # the reference passes the RGB array as is (PaddleOCR assumes BGR); kept for paper-exact numbers
        result = self.engine.ocr(image_rgb, cls=False)
        page = result[0] if result else None
        return [(str(line[1][0]), float(line[1][1])) for line in (page or [])]


BACKENDS = ("rapidocr", "paddleocr")


class OCRScorer:
    """OCR text-rendering reward.

    Args:
        ckpt_dir: reward checkpoint root (PaddleOCR cache location).
        device: ignored: OCR runs on CPU, as in the reference.
        backend: ``"rapidocr"`` (default, offline) or ``"paddleocr"`` (paper-exact).
        engine: an already-built backend (tests).
    """

    name = "ocr"
    differentiable = False

    def __init__(
        self,
        *,
        ckpt_dir: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        backend: str = "rapidocr",
        engine: OCRBackend | None = None,
    ) -> None:
        del device
        if engine is not None:
            self.engine = engine
        elif backend == "rapidocr":
            self.engine = RapidOCRBackend()
        elif backend == "paddleocr":
            self.engine = PaddleOCRBackend(ckpt_dir)
        else:
            raise ValueError(f"rewards.options.ocr.backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def score_one(self, image_rgb: np.ndarray, prompt: str) -> float:
        """Reward of one ``uint8 [H, W, 3]`` image. OCR failures give 0; a prompt without quotes raises."""
        target = extract_target(prompt)
        try:
            recognized = join_lines(self.engine.recognize(image_rgb))
        except Exception:  # the reference scores an OCR crash as "nothing recognised"
            return 0.0
        return ocr_similarity(recognized, target)

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        check_images(images, prompts, self.name)
        arrays = to_numpy_hwc(images)
        return {self.name: as_scores([self.score_one(a, p) for a, p in zip(arrays, prompts, strict=True)])}

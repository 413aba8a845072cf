"""GenEval (spec rewards-inference.md §1.8): object detection + rule checks against per-prompt metadata.

Over 600 lines on purpose: the rules engine, the two detector backends and the colour classifier make one
scorer, kept side by side to be read against the official GenEval code.

The rules engine is backend-free and exact: detection selection (0.9 confidence for counting prompts, else
0.3;
at most 16 per class; no NMS, as NMS_THRESHOLD = 1.0 short-circuits it), GenEval's relative position, the
official lenient check ``evaluate`` and the reward variant ``evaluate_reward`` (strict correctness plus the
partial-credit score that enters the combined reward, including its inherited quirks: a failed position check
appends 0.0 *and* 1.0, exclude rules are ignored, over-counting gives negative credit).

Detector backends:

- ``mask2former`` (convenient default): transformers ``Mask2FormerForUniversalSegmentation`` (COCO instance,
  ``facebook/mask2former-swin-small-coco-instance``), post-processed like mmdet's ``MaskFormerFusionHead``
  (top-100 query x class scores times mask scores, boxes from masks). Same architecture family as the paper's
  detector but different (Detectron2-trained) weights, so numbers differ slightly.
- ``mmdet`` (paper-exact): mmdet's Mask2Former Swin-S checkpoint through ``inference_detector``. mmdet/mmcv
  pin
  an old stack; run the GenEval reward actor with its own Ray ``runtime_env`` (``MMDET_RUNTIME_ENV``).

Colours: zero-shot CLIP ViT-L/14 (OpenAI weights, here through transformers) over 10 colours x 3 templates on
each object's crop pasted over grey #999 through its mask.

Output keys: ``geneval`` (partial credit), ``accuracy`` (lenient 0/1, all 0 when ``only_strict``),
``strict_accuracy`` and ``{tag}_accuracy`` / ``{tag}_strict_accuracy`` with the -10 sentinel for other tags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from rtdmd_ray.rewards._common import (
    SENTINEL,
    array_split_slices,
    as_scores,
    check_images,
    find_pretrained,
    load_or_missing,
    resolve_device,
    to_numpy_hwc,
)

# The 80 COCO classes in COCO order with GenEval's names (object_names.txt).
OBJECT_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLORS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
)
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {cls}",
    "a photo of a {c}-colored {cls}",
    "a photo of a {c} object",
)
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
BATCH_IMAGES = 64
GREY_BACKGROUND = (153, 153, 153)  # "#999"

M2F_HUB_ID = "facebook/mask2former-swin-small-coco-instance"
CLIP_HUB_ID = "openai/clip-vit-large-patch14"
MMDET_CONFIG_ENV = "RTDMD_GENEVAL_MMDET_CONFIG_PATH"
MMDET_CKPT_ENV = "RTDMD_GENEVAL_MMDET_CKPT_PATH"
MMDET_CONFIG_NAMES = (
    "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py",
    "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py",
)
MMDET_CKPT_NAMES = (
    "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth",
    "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco_20220504_001756-c9d0c4f2.pth",
)
# A Ray runtime_env for a GenEval reward actor on the paper's detector stack (mmcv builds from source).
MMDET_RUNTIME_ENV: dict[str, Any] = {
    "pip": ["openmim==0.3.9", "mmengine==0.10.5", "mmcv==2.1.0", "mmdet==3.3.0"],
    "env_vars": {"MMCV_WITH_OPS": "1"},
}


@dataclass
class Detection:
    """One detected object: ``bbox`` (x1, y1, x2, y2) in pixels, confidence ``score``, bool mask [H, W]."""

    bbox: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None


# Raw detector output for one image: per class index, (boxes [M, 5] = x1, y1, x2, y2, score; masks [M, H, W]).
RawDetections = list[tuple[np.ndarray, np.ndarray | None]]


# ---------------------------------------------------------------------------------------------- rules


def select_detections(
    raw: RawDetections, tag: str, class_names: tuple[str, ...] = OBJECT_NAMES
) -> dict[str, list[Detection]]:
    """Per class: sort by score, keep scores above the threshold (0.9 counting, else 0.3), at most 16.

    No NMS (the reference's NMS threshold of 1.0 disables it). Classes with no detection are absent.
    """
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    out: dict[str, list[Detection]] = {}
    for index, name in enumerate(class_names):
        boxes, masks = raw[index]
        if len(boxes) == 0:
            continue
        order = np.argsort(boxes[:, 4], kind="stable")[::-1]
        order = order[boxes[order, 4] > threshold][:MAX_OBJECTS]
        if len(order):
            out[name] = [
                Detection(
                    tuple(float(v) for v in boxes[i, :4]),
                    float(boxes[i, 4]),  # type: ignore[arg-type]
                    None if masks is None else masks[i],
                )
                for i in order
            ]
    return out


def relative_position(obj_a: Detection, obj_b: Detection) -> set[str]:
    """Relations of A with respect to B among {left of, right of, above, below} (image y grows downward).

    Each axis offset between box centres is shrunk by 0.1 x (dim_A + dim_B); the shrunk offset divided by the
    norm of the unshrunk offset must exceed 0.5 in magnitude. Near-coincident centres give the empty set.
    """
    boxes = np.array([obj_a.bbox, obj_b.bbox], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


class ColorFn(Protocol):
    def __call__(self, image: Any, objects: list[Detection], class_name: str) -> list[str]:
        """Colour name (one of ``COLORS``) per object."""
        ...


def _position_ok(found: list[Detection], targets: list[Detection], relation: str) -> bool:
    return all(relation in relative_position(o, t) for o in found for t in targets)


def evaluate(
    image: Any, objects: dict[str, list[Detection]], metadata: dict[str, Any], colors: ColorFn
) -> bool:
    """The official (lenient) GenEval check: the top ``count`` detections must exist, have the colour and the
    position; an ``exclude`` class detected ``count`` or more times fails."""
    correct = True
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        matched = True
        found = objects.get(name, [])[:count]
        if len(found) < count:
            correct = matched = False
        else:
            if "color" in req and colors(image, found, name).count(req["color"]) < count:
                correct = matched = False
            if "position" in req and matched:
                relation, target = req["position"]
                if groups[target] is None or not _position_ok(found, groups[target], relation):
                    correct = matched = False
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        if len(objects.get(req["class"], [])) >= req["count"]:
            correct = False
    return correct


def evaluate_reward(
    image: Any, objects: dict[str, list[Detection]], metadata: dict[str, Any], colors: ColorFn
) -> tuple[bool, float]:
    """Strict correctness and the partial-credit score (mean of the appended credits, 0 if none).

    Uses **all** detections of a class; ``exclude`` is ignored; a failed position check appends 0.0 and then
    1.0 (inherited quirk); a count credit ``1 - |count - found| / count`` can be negative.
    """
    correct = True
    credits: list[float] = []
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        matched = True
        found = objects.get(name, [])
        credits.append(1 - abs(count - len(found)) / count)
        if len(found) != count:
            correct = matched = False
            if "color" in req or "position" in req:
                credits.append(0.0)
        else:
            if "color" in req:
                n_color = colors(image, found, name).count(req["color"])
                credits.append(1 - abs(count - n_color) / count)
                if n_color != count:
                    correct = matched = False
            if "position" in req and matched:
                relation, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    credits.append(0.0)
                else:
                    if not _position_ok(found, groups[target], relation):
                        correct = matched = False
                        credits.append(0.0)
                    credits.append(1.0)
        groups.append(found if matched else None)
    return correct, (sum(credits) / len(credits) if credits else 0.0)


def compute_geneval(
    images: list[Any],
    detections: list[dict[str, list[Detection]]],
    metadatas: list[dict[str, Any]],
    colors: ColorFn,
    *,
    only_strict: bool = False,
) -> dict[str, list[float]]:
    """Scores and accuracies for already-selected detections (one dict per image).

    Returns ``{"geneval", "accuracy", "strict_accuracy", "{tag}_accuracy", "{tag}_strict_accuracy"}`` lists;
    per-tag lists hold the image's 0/1 for its own tag and -10 elsewhere.
    """
    out: dict[str, list[float]] = {"geneval": [], "accuracy": [], "strict_accuracy": []}
    for tag in TAGS:
        out[f"{tag}_accuracy"], out[f"{tag}_strict_accuracy"] = [], []
    for image, objects, md in zip(images, detections, metadatas, strict=True):
        strict, score = evaluate_reward(image, objects, md, colors)
        lenient = False if only_strict else evaluate(image, objects, md, colors)
        out["geneval"].append(float(score))
        out["accuracy"].append(float(lenient))
        out["strict_accuracy"].append(float(strict))
        for tag in TAGS:
            own = tag == md["tag"]
            out[f"{tag}_accuracy"].append(float(lenient) if own else SENTINEL)
            out[f"{tag}_strict_accuracy"].append(float(strict) if own else SENTINEL)
    return out


def check_metadata(metadata: Any, n: int) -> list[dict[str, Any]]:
    """GenEval needs one metadata dict (tag, include, optional exclude) per image."""
    if metadata is None or not isinstance(metadata, list | tuple) or len(metadata) == 0 or len(metadata) != n:
        got = (
            None
            if metadata is None
            else (len(metadata) if isinstance(metadata, list | tuple) else type(metadata))
        )
        raise ValueError(
            f"geneval needs a list of {n} metadata dicts (tag, include[, exclude]) aligned with the images, "
            f"got {got}; use a GenEval metadata prompt set (e.g. geneval/test_metadata.jsonl)"
        )
    for md in metadata:
        if "tag" not in md or "include" not in md:
            raise KeyError(f"geneval metadata needs 'tag' and 'include', got keys {sorted(md)}")
    return list(metadata)


# ------------------------------------------------------------------------------------------- colours


class ClipColorClassifier:
    """Zero-shot colour of each object crop with CLIP (10 colours x 3 templates, classifier cached per class).

    Args:
        tower: a ``ClipTower`` (transformers CLIP + tokenizer + PIL image processor).
        batch_size: crops per forward pass (16 in the reference).
    """

    def __init__(self, tower: Any, batch_size: int = 16) -> None:
        self.tower = tower
        self.batch_size = batch_size
        self._cache: dict[str, torch.Tensor] = {}

    def classifier(self, class_name: str) -> torch.Tensor:
        """``[C, E]`` unit text embeddings: per colour, the renormalised mean of its template embeddings."""
        if class_name not in self._cache:
            rows = []
            for color in COLORS:
                texts = [t.format(c=color, cls=class_name) for t in COLOR_TEMPLATES]
                emb = self.tower.text_embeds(texts, padding="max_length", max_length=77).mean(dim=0)
                rows.append(emb / emb.norm())
            self._cache[class_name] = torch.stack(rows)
        return self._cache[class_name]

    @torch.no_grad()
    def __call__(self, image: Any, objects: list[Detection], class_name: str) -> list[str]:
        from PIL import Image

        image = image.convert("RGB")
        blank = Image.new("RGB", image.size, GREY_BACKGROUND)
        crops = []
        for obj in objects:
            img = image if obj.mask is None else Image.composite(image, blank, Image.fromarray(obj.mask))
            crops.append(img.crop(obj.bbox))
        clf = self.classifier(class_name)
        preds: list[str] = []
        for i in range(0, len(crops), self.batch_size):
            feats = self.tower.image_embeds(self.tower.preprocess_pil(crops[i : i + self.batch_size]))
            preds += [COLORS[j] for j in (feats @ clf.T).argmax(dim=1).tolist()]
        return preds


# ------------------------------------------------------------------------------------------ detectors


class Detector(Protocol):
    def detect(self, images_rgb: list[np.ndarray]) -> list[RawDetections]:
        """``uint8 [H, W, 3]`` RGB images -> per image, per class index, (boxes [M, 5], masks [M, H, W])."""
        ...


def mask_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """mmdet ``mask2bbox``: ``[N, H, W]`` bool -> ``[N, 4]`` (x1, y1, x2 + 1, y2 + 1); empty -> zeros."""
    n = masks.shape[0]
    boxes = torch.zeros(n, 4, dtype=torch.float32)
    x_any, y_any = masks.any(dim=1), masks.any(dim=2)
    for i in range(n):
        xs, ys = torch.where(x_any[i])[0], torch.where(y_any[i])[0]
        if len(xs) and len(ys):
            boxes[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return boxes


def instance_postprocess(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, num_classes: int, max_per_image: int = 100
) -> RawDetections:
    """mmdet ``MaskFormerFusionHead.instance_postprocess`` for one image.

    Args:
        class_logits: ``[Q, num_classes + 1]`` (last column = no object).
        mask_logits: ``[Q, H, W]`` at the original image size.
    """
    q = class_logits.shape[0]
    scores = class_logits.float().softmax(-1)[:, :-1]
    labels = torch.arange(num_classes).repeat(q)
    k = min(max_per_image, scores.numel())
    top_scores, top_idx = scores.flatten().topk(k, sorted=False)
    top_labels = labels[top_idx]
    masks = mask_logits[top_idx // num_classes].float()
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    det_scores = top_scores * mask_scores
    boxes = mask_to_boxes(binary)
    raw: RawDetections = []
    for c in range(num_classes):
        sel = top_labels == c
        b = torch.cat([boxes[sel], det_scores[sel, None]], dim=1).numpy()
        raw.append((b, binary[sel].numpy()))
    return raw


class Mask2FormerDetector:
    """transformers Mask2Former (COCO instance) with mmdet-style instance post-processing."""

    def __init__(self, source: str, device: str | torch.device = "cpu", scorer: str = "geneval") -> None:
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessorPil

        self.device = resolve_device(device)
        self.model = load_or_missing(
            scorer,
            source,
            lambda s: Mask2FormerForUniversalSegmentation.from_pretrained(s),
            option="detector_model",
        )
        self.model = self.model.eval().requires_grad_(False).to(self.device)
        self.processor = load_or_missing(
            scorer, source, lambda s: Mask2FormerImageProcessorPil.from_pretrained(s), option="detector_model"
        )
        self.num_classes = int(self.model.config.num_labels)

    @torch.no_grad()
    def detect(self, images_rgb: list[np.ndarray]) -> list[RawDetections]:
        import torch.nn.functional as F

        enc = self.processor(images=list(images_rgb), return_tensors="pt")
        out = self.model(
            pixel_values=enc["pixel_values"].to(self.device), pixel_mask=enc["pixel_mask"].to(self.device)
        )
        pad_h, pad_w = enc["pixel_values"].shape[-2:]
        results = []
        for i, img in enumerate(images_rgb):
            valid = enc["pixel_mask"][i].bool()
            rh, rw = int(valid.any(dim=1).sum()), int(valid.any(dim=0).sum())
            m = F.interpolate(
                out.masks_queries_logits[i : i + 1].float(),
                size=(pad_h, pad_w),
                mode="bilinear",
                align_corners=False,
            )[:, :, :rh, :rw]
            m = F.interpolate(m, size=img.shape[:2], mode="bilinear", align_corners=False)[0]
            results.append(instance_postprocess(out.class_queries_logits[i].cpu(), m.cpu(), self.num_classes))
        return results


def _mmdet_path(env: str, names: tuple[str, ...], dirs: list[str]) -> str | None:
    value = os.environ.get(env, "").strip()
    if value:
        if not os.path.isfile(value):
            raise FileNotFoundError(f"{env}={value} does not exist; fix or unset it")
        return value
    for d in dirs:
        for n in names:
            if os.path.isfile(os.path.join(d, n)):
                return os.path.join(d, n)
    return None


class MmdetDetector:
    """The paper's detector: mmdet Mask2Former Swin-S (COCO) via ``init_detector`` / ``inference_detector``.

    Config: ``$RTDMD_GENEVAL_MMDET_CONFIG_PATH`` or the mmdet package's bundled config; checkpoint:
    ``$RTDMD_GENEVAL_MMDET_CKPT_PATH`` or the reward checkpoint root. Images are passed as RGB arrays, as the
    reference does (mmdet assumes BGR: an inherited channel swap, kept for paper-exact numbers).
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        config_path: str | None = None,
        checkpoint_path: str | None = None,
    ) -> None:
        from rtdmd_ray.rewards._common import RewardWeightsMissing, reward_ckpt_root

        try:
            import mmdet
            from mmdet.apis import inference_detector, init_detector
        except ImportError as exc:
            raise ImportError(
                "geneval detector 'mmdet' needs mmdet + mmcv (not installable next to our torch stack): run "
                "the GenEval reward actor with runtime_env=rtdmd_ray.rewards.geneval.MMDET_RUNTIME_ENV, or "
                "use rewards.options.geneval.detector='mask2former'"
            ) from exc
        site = os.path.dirname(os.path.dirname(mmdet.__file__))
        cfg_dirs = [
            os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "mask2former"),
            os.path.join(site, "configs", "mask2former"),
        ]
        config = config_path or _mmdet_path(MMDET_CONFIG_ENV, MMDET_CONFIG_NAMES, cfg_dirs)
        root = reward_ckpt_root(ckpt_dir)
        ckpt = checkpoint_path or _mmdet_path(MMDET_CKPT_ENV, MMDET_CKPT_NAMES, [str(root)] if root else [])
        if config is None or ckpt is None:
            raise RewardWeightsMissing(
                f"geneval: mmdet {'config' if config is None else 'checkpoint'} not found; set "
                f"{MMDET_CONFIG_ENV} / {MMDET_CKPT_ENV} or put {MMDET_CKPT_NAMES[0]} under "
                "$RTDMD_REWARD_CKPT_PATH"
            )
        self._inference = inference_detector
        self.model = init_detector(config, ckpt, device=str(resolve_device(device)))

    def detect(self, images_rgb: list[np.ndarray]) -> list[RawDetections]:
        results = self._inference(self.model, list(images_rgb))
        out = []
        for res in results:
            if isinstance(res, tuple):  # mmdet 2.x: (bbox_per_class, segm_per_class)
                bboxes, segms = res[0], (res[1] if len(res) > 1 else None)
                per_class: RawDetections = []
                for c, b in enumerate(bboxes):
                    has_masks = segms is not None and len(b) > 0
                    m = np.stack([np.asarray(x, dtype=bool) for x in segms[c]]) if has_masks else None
                    per_class.append((np.asarray(b), m))
                out.append(per_class)
            else:  # mmdet 3.x DetDataSample
                inst = res.pred_instances
                boxes = torch.cat([inst.bboxes, inst.scores[:, None]], 1).cpu().numpy()
                labels = inst.labels.cpu().numpy()
                masks = inst.masks.cpu().numpy() if "masks" in inst else None
                out.append(
                    [
                        (boxes[labels == c], None if masks is None else masks[labels == c])
                        for c in range(len(OBJECT_NAMES))
                    ]
                )
        return out


# --------------------------------------------------------------------------------------------- scorer


class GenEvalScorer:
    """GenEval reward: detector + colour CLIP + rules; needs per-image metadata.

    Args:
        ckpt_dir: reward checkpoint root (``mask2former-swin-small-coco-instance/``,
            ``clip-vit-large-patch14/``,
            or the mmdet checkpoint).
        device: torch device.
        detector: ``"mask2former"`` (default, transformers) or ``"mmdet"`` (paper-exact, own runtime_env).
        detector_model: Mask2Former directory or hub id.
        clip_model: colour CLIP directory or hub id.
        only_strict: zero the lenient ``accuracy`` as the reference's training call does (it never enters the
            reward); default False computes it.
        batch_images: images per detector call (the reference splits into ceil(N / 64) equal chunks).
        detector_obj, color_fn: already-built components (tests).
    """

    name = "geneval"
    differentiable = False

    def __init__(
        self,
        *,
        ckpt_dir: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        detector: str = "mask2former",
        detector_model: str | None = None,
        clip_model: str | None = None,
        only_strict: bool = False,
        batch_images: int = BATCH_IMAGES,
        mmdet_config: str | None = None,
        mmdet_checkpoint: str | None = None,
        detector_obj: Detector | None = None,
        color_fn: ColorFn | None = None,
    ) -> None:
        self.only_strict = only_strict
        self.batch_images = int(batch_images)
        if detector_obj is not None:
            self.detector: Detector = detector_obj
        elif detector == "mask2former":
            src = find_pretrained(
                ckpt_dir,
                ["mask2former-swin-small-coco-instance", M2F_HUB_ID],
                M2F_HUB_ID,
                explicit=detector_model,
            )
            self.detector = Mask2FormerDetector(src, device=device, scorer=self.name)
            if self.detector.num_classes != len(OBJECT_NAMES):
                raise ValueError(
                    f"geneval: {src} has {self.detector.num_classes} labels; a COCO-instance model "
                    f"with {len(OBJECT_NAMES)} classes is required"
                )
        elif detector == "mmdet":
            self.detector = MmdetDetector(ckpt_dir, device, mmdet_config, mmdet_checkpoint)
        else:
            raise ValueError(
                f"rewards.options.geneval.detector must be 'mask2former' or 'mmdet', got {detector!r}"
            )
        if color_fn is not None:
            self.colors: ColorFn = color_fn
        else:
            from rtdmd_ray.rewards._clip import ClipTower

            src = find_pretrained(
                ckpt_dir, ["clip-vit-large-patch14", CLIP_HUB_ID], CLIP_HUB_ID, explicit=clip_model
            )
            self.colors = ClipColorClassifier(
                ClipTower.from_pretrained(self.name, src, device=device, option="clip_model")
            )

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        from PIL import Image

        check_images(images, prompts, self.name)
        metas = check_metadata(metadata, images.shape[0])  # prompts are ignored: metadata carries its own
        arrays = to_numpy_hwc(images)
        raw: list[RawDetections] = []
        for sl in array_split_slices(len(arrays), self.batch_images):
            raw += self.detector.detect(list(arrays[sl]))
        selected = [select_detections(r, md["tag"]) for r, md in zip(raw, metas, strict=True)]
        pils = [Image.fromarray(a) for a in arrays]
        result = compute_geneval(pils, selected, metas, self.colors, only_strict=self.only_strict)
        return {k: as_scores(v) for k, v in result.items()}

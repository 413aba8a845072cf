"""Sampling for `rtdmd-ray sample` / `rtdmd-ray eval` (spec rewards-inference.md §5.5-§5.8).

* The model: ``model.backbone`` with the LoRA stack ``inference.lora_paths`` merged into the base weights in
  list order (none = the teacher; the cold-start EMA = AC-DMD; cold start then RL = RTDMD). Each entry is a
  published ``generator_ema.pt``, a PEFT directory (or ``<checkpoint>/transformer``) or our ``.safetensors``
  (``models.lora.load_lora_file``); files without a recorded rank/alpha use
  ``inference.fallback_lora_rank`` / ``fallback_lora_alpha``.
* ``eval.mode: distilled``: the few-step CPS sampler on the backbone's shifted schedule of
  ``sampling.denoising_step_list[:eval.num_steps]`` with ``eta = eval.noise_level``; the final step lands on
  ``x0_hat`` (spec §5.7). ``eval.mode: teacher``: ``eval.num_steps`` Euler steps with CFG
  ``eval.guidance_scale`` on the backbone's schedule of evenly spaced raw timesteps (``teacher_step_list``).
* Seeds: image ``i`` of a run with base seed ``s`` uses ``image_seed(s, i)``; its initial latent and every
  CPS noise draw come from its own CPU generator, in a fixed order. An image therefore depends only on its
  prompt, its index and the base seed, never on the batch it shares or the worker that made it (unlike the
  reference's ``seed + rank`` global stream, §5.8).
* One path: ``sample_images`` is the sampler of every evaluation (this pipeline, the in-run validation
  ``stages/validation.EvalHook`` through the learner's adapters, and the ShapeWorld table ``eval/shapes.py``),
  and every scorer sees the 8-bit image (``eight_bit``) as in training and in the PNGs, so an in-run
  validation figure and an offline eval of the same weights, prompts and seeds agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from rtdmd_ray.algorithms.cps import cps_step, euler_step
from rtdmd_ray.config import Config, resolve_path

# image seed = base * SEED_STRIDE + index (the training eval hook uses the same rule)
SEED_STRIDE = 1_000_003
# PNG text-chunk keys written with every image; resume compares them
PNG_SEED_KEY = "rtdmd_seed"
PNG_HASH_KEY = "rtdmd_config_hash"
PNG_PROMPT_KEY = "prompt"


def image_seed(base_seed: int, index: int) -> int:
    """Seed of image ``index`` (its position in the prompt set) under ``base_seed`` (``eval.seed``)."""
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}")
    return int(base_seed) * SEED_STRIDE + int(index)


def eight_bit(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] rounded to the 256 levels a PNG (and a training reward) sees, still float."""
    return (images.detach().float().clamp(0, 1) * 255).round() / 255


VelocityFn = Callable[..., torch.Tensor]  # (x, sigma [B], cond, guidance=...) -> v, as FlowBackbone.velocity


@torch.no_grad()
def sample_images(
    backbone: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sigmas: Sequence[float],
    *,
    eta: float | None,
    guidance: float = 1.0,
    guidance_max_sigma: float = 1.0,
    resolution_px: int,
    velocity: VelocityFn | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` float32 in [0, 1] on the CPU: the one sampler of every evaluation.

    Args:
        backbone: a ``FlowBackbone`` (latent shape, text encoding, decode; its ``velocity`` by default).
        seeds: one per prompt; image ``i``'s initial latent, then one draw per stochastic CPS step, come from
            ``torch.Generator().manual_seed(seeds[i])`` on the CPU, so an image does not depend on its batch.
        sigmas: decreasing noise levels ending at 0.
        eta: CPS noise level (``cps_step``; the last step lands on ``x0_hat``), or None for Euler steps.
        guidance: CFG scale, applied on the steps that start at ``sigma <= guidance_max_sigma`` (a limited
            guidance interval; 1.0 = every step).
        velocity: ``(x, sigma, cond, guidance=g) -> v``; default ``backbone.velocity`` (a learner passes its
            adapter stack's).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"sample_images: {len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        raise ValueError("sample_images: no prompts")
    velocity = velocity or backbone.velocity
    dev = torch.device(device) if device is not None else torch.device(getattr(backbone, "device", "cpu"))
    shape = tuple(backbone.latent_shape(resolution_px))
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def draw() -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)

    x = draw()
    cond = backbone.encode_prompts(list(prompts))
    n = len(prompts)
    for k in range(len(sigmas) - 1):
        s, s_next = float(sigmas[k]), float(sigmas[k + 1])
        sigma = torch.full((n,), s, dtype=torch.float32, device=dev)
        g = guidance if s <= guidance_max_sigma + 1e-6 else 1.0
        v = velocity(x, sigma, cond, guidance=g)
        if eta is None:
            x = euler_step(x, v, s, s_next)
        else:
            stochastic = s_next > 0 and eta > 0
            x = cps_step(x, v, s, s_next, eta, noise=draw() if stochastic else None).sample
    return backbone.decode(x.float()).float().cpu()


def teacher_step_list(num_steps: int, num_train_timesteps: int = 1000) -> tuple[float, ...]:
    """Evenly spaced raw timesteps ``N, N (n-1)/n, ..., N/n`` for an ``n``-step teacher Euler schedule.

    The backbone's own shift turns them into sigmas (SD3 static shift; FLUX dynamic shift with its token
    count, FLUX.2 also with ``n``), the way ``FlowMatchEulerDiscreteScheduler.set_timesteps(n)`` spaces them.
    """
    if num_steps < 1:
        raise ValueError(f"eval.num_steps must be >= 1 for teacher sampling, got {num_steps}")
    return tuple(num_train_timesteps * (num_steps - k) / num_steps for k in range(num_steps))


@dataclass(frozen=True)
class SamplerSettings:
    """How images are drawn (everything but the weights).

    Attributes:
        mode: "distilled" (CPS, no CFG) or "teacher" (Euler + CFG).
        num_steps: network evaluations per image (teacher with CFG: twice as many forward rows).
        eta: CPS noise level (distilled only).
        guidance_scale: CFG scale (teacher only; 1.0 = a single conditional pass).
        step_list: raw distilled timesteps (distilled only).
        resolution_px: square image side.
    """

    mode: Literal["distilled", "teacher"]
    num_steps: int
    eta: float
    guidance_scale: float
    step_list: tuple[int, ...]
    resolution_px: int

    @classmethod
    def from_config(cls, cfg: Config) -> SamplerSettings:
        e = cfg.eval
        if e.mode == "distilled" and e.num_steps > len(cfg.sampling.denoising_step_list):
            raise ValueError(
                f"eval.num_steps={e.num_steps} exceeds len(sampling.denoising_step_list)="
                f"{len(cfg.sampling.denoising_step_list)}: lower it or use eval.mode=teacher"
            )
        return cls(
            mode=e.mode,
            num_steps=e.num_steps,
            eta=float(e.noise_level),
            guidance_scale=float(e.guidance_scale),
            step_list=tuple(cfg.sampling.denoising_step_list[: e.num_steps]),
            resolution_px=cfg.model.resolution_px,
        )

    def sigmas(self, backbone: Any) -> list[float]:
        """The ``num_steps + 1`` noise levels from 1 (or the first step's sigma) down to 0."""
        if self.mode == "distilled":
            return list(backbone.sigma_schedule(self.step_list, self.resolution_px))
        return list(backbone.sigma_schedule(teacher_step_list(self.num_steps), self.resolution_px))

    def describe(self) -> dict[str, Any]:
        """The settings that matter for ``mode`` (the others are left out of the config hash)."""
        d: dict[str, Any] = {
            "mode": self.mode,
            "num_steps": self.num_steps,
            "resolution_px": self.resolution_px,
        }
        if self.mode == "distilled":
            d |= {"eta": self.eta, "step_list": list(self.step_list)}
        else:
            d |= {"guidance_scale": self.guidance_scale}
        return d


@dataclass(frozen=True)
class LoraEntry:
    """One merged adapter of the stack: where it came from and what merged."""

    path: str
    sha256: str
    rank: int
    alpha: float
    merged_pairs: int
    skipped_pairs: int


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (sorted relative names + contents)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for q in files:
        if p.is_dir():
            h.update(str(q.relative_to(p)).encode())
        with q.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# local base models up to this size are fingerprinted by content, larger ones by file sizes and times
CONTENT_HASH_MAX_BYTES = 256 << 20


def dir_fingerprint(path: Path) -> str:
    """sha256 of a local model dir: its files' contents when small (a copied or re-saved identical model
    keeps its hash), else their relative names, sizes and modification times (hashing 20 GB would take
    minutes; a changed file changes its size or time)."""
    files = sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]
    if sum(q.stat().st_size for q in files) <= CONTENT_HASH_MAX_BYTES:
        return file_sha256(path)
    h = hashlib.sha256()
    for q in files:
        st, name = q.stat(), q.relative_to(path) if path.is_dir() else q.name
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return "stat:" + h.hexdigest()


def model_identity(cfg: Config, lora_paths: Sequence[str] | None = None) -> dict[str, Any]:
    """What determines the weights: backbone, base (path and, when local, a fingerprint of its files),
    dtype, (tiny: seed) and the LoRA files' sha256."""
    m = cfg.model
    paths = list(cfg.inference.lora_paths if lora_paths is None else lora_paths)
    ident: dict[str, Any] = {"backbone": m.backbone, "pretrained_path": m.pretrained_path, "dtype": m.dtype}
    if not m.pretrained_path:
        ident["seed"] = cfg.train.seed  # in-code tiny weights come from this seed
    elif resolve_path(m.pretrained_path).exists():
        ident["pretrained_fingerprint"] = dir_fingerprint(resolve_path(m.pretrained_path))
    ident["loras"] = [
        file_sha256(resolve_path(p)) if resolve_path(p).exists() else f"missing:{p}" for p in paths
    ]
    return ident


def config_hash(cfg: Config, lora_paths: Sequence[str] | None = None) -> str:
    """16 hex digits over the weights' identity and the sampler settings: images with the same hash and seed
    are the same images (resume reuses them)."""
    blob = {"model": model_identity(cfg, lora_paths), "sampler": SamplerSettings.from_config(cfg).describe()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pretrained(path: str) -> str | None:
    """A local directory (absolute, relative to the repo root) or the hub id as given; None when empty."""
    if not path:
        return None
    local = resolve_path(path)
    return str(local) if local.exists() else path


class BaseWeights:
    """One loaded base backbone that LoRA stacks are merged into and taken out of again.

    ``get`` rebuilds the backbone only when the base changes (backbone, path, dtype, seed, device); otherwise
    it restores the weights a previous stack modified (exact copies kept by ``snapshot``), so the teacher,
    AC-DMD and RTDMD rows of one eval load the base once.
    """

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.backbone: Any = None
        self._originals: dict[str, torch.Tensor] = {}

    def get(self, cfg: Config, device: torch.device) -> Any:
        from rtdmd_ray.models import build_backbone

        m = cfg.model
        key = (
            m.backbone,
            m.pretrained_path,
            m.dtype,
            None if m.pretrained_path else cfg.train.seed,
            str(device),
        )
        if key != self.key:
            self.backbone, self.key, self._originals = None, None, {}
            self.backbone = build_backbone(
                m.backbone,
                pretrained_path=_pretrained(m.pretrained_path),
                dtype=m.dtype,
                device=device,
                seed=cfg.train.seed,
            )
            self.key = key
        else:
            self.restore()
        return self.backbone

    @torch.no_grad()
    def snapshot(self, lora_tensors: dict[str, torch.Tensor]) -> None:
        """Keep a copy of every base weight the LoRA ``lora_tensors`` will modify (first touch only)."""
        from rtdmd_ray.models.lora import canonical_key

        params = dict(self.backbone.transformer.named_parameters())
        for k in lora_tensors:
            ck = canonical_key(k)
            if ck is None:
                continue
            for name in (f"{ck[0]}.base_layer.weight", f"{ck[0]}.weight"):
                if name in params and name not in self._originals:
                    self._originals[name] = params[name].detach().clone()

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the base weights modified since the last restore (bit-exact)."""
        params = dict(self.backbone.transformer.named_parameters())
        for name, value in self._originals.items():
            params[name].copy_(value)
        self._originals = {}


@dataclass
class InferencePipeline:
    """A backbone with its LoRA stack merged, and the sampler settings.

    Build with ``InferencePipeline.from_config``; call ``generate(prompts, seeds)``.
    """

    backbone: Any
    settings: SamplerSettings
    loras: list[LoraEntry] = field(default_factory=list)

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        *,
        lora_paths: Sequence[str] | None = None,
        device: torch.device | str | None = None,
        base: BaseWeights | None = None,
    ) -> InferencePipeline:
        """Load ``model.backbone`` and merge ``lora_paths`` (default ``inference.lora_paths``) in order.

        ``base`` reuses an already loaded backbone (its previous merges are undone first).

        Raises:
            FileNotFoundError: a LoRA path does not exist (the message names ``inference.lora_paths``).
        """
        from rtdmd_ray.models.lora import load_lora_file, merge_lora_into_base

        settings = SamplerSettings.from_config(cfg)
        paths = list(cfg.inference.lora_paths if lora_paths is None else lora_paths)
        missing = [p for p in paths if not resolve_path(p).exists()]
        if missing:
            raise FileNotFoundError(
                f"LoRA file(s) {missing} not found (config inference.lora_paths or --lora, relative to the "
                f"repo root): train them first, or drop them for the base model (inference.lora_paths=[])"
            )
        dev = torch.device(device) if device is not None else default_device()
        base = base if base is not None else BaseWeights()
        backbone = base.get(cfg, dev)
        entries = []
        for p in paths:
            lf = load_lora_file(
                resolve_path(p),
                rank=cfg.inference.fallback_lora_rank,
                alpha=cfg.inference.fallback_lora_alpha,
            )
            base.snapshot(lf.tensors)
            rep = merge_lora_into_base(backbone.transformer, lf.tensors, rank=lf.rank, alpha=lf.alpha)
            entries.append(
                LoraEntry(
                    path=str(p),
                    sha256=file_sha256(resolve_path(p)),
                    rank=lf.rank,
                    alpha=float(lf.alpha),
                    merged_pairs=rep.merged,
                    skipped_pairs=rep.skipped,
                )
            )
        return cls(backbone=backbone, settings=settings, loras=entries)

    @property
    def device(self) -> torch.device:
        return torch.device(getattr(self.backbone, "device", "cpu"))

    def describe(self) -> dict[str, Any]:
        return {"sampler": self.settings.describe(), "loras": [asdict(e) for e in self.loras]}

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` float32 in [0, 1] on the CPU for ``prompts``, one seed each.

        Each image's noise (initial latent, then one draw per stochastic CPS step) comes from
        ``torch.Generator().manual_seed(seed)`` on the CPU, so the result does not depend on the batch.
        """
        st = self.settings
        teacher = st.mode == "teacher"
        return sample_images(
            self.backbone,
            prompts,
            seeds,
            st.sigmas(self.backbone),
            eta=None if teacher else st.eta,
            guidance=st.guidance_scale if teacher else 1.0,
            resolution_px=st.resolution_px,
            device=self.device,
        )


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] -> ``uint8 [B, H, W, 3]`` (``round(255 x)``, the reference's PIL step)."""
    return (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )


def from_uint8(arrays: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [0, 1] (what the scorers see)."""
    arr = np.stack(list(arrays)) if not isinstance(arrays, np.ndarray) else arrays
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()


def encode_png(image_u8: np.ndarray, info: dict[str, str] | None = None) -> bytes:
    """PNG bytes of ``uint8 [H, W, 3]`` with ``info`` as text chunks (seed, config hash, prompt)."""
    import io

    from PIL import Image, PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    for k, v in (info or {}).items():
        meta.add_itxt(k, str(v))
    buf = io.BytesIO()
    Image.fromarray(image_u8).save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def read_png(path: str | Path) -> tuple[np.ndarray, dict[str, str]]:
    """``(uint8 [H, W, 3], text chunks)`` of a PNG written by ``encode_png``."""
    from PIL import Image

    with Image.open(path) as im:
        info = {k: str(v) for k, v in getattr(im, "text", {}).items()}
        return np.asarray(im.convert("RGB")).copy(), info


def png_info(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG (no pixel decode); empty if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return {k: str(v) for k, v in getattr(im, "text", {}).items()}
    except (OSError, ValueError):
        return {}


def sample_to_dir(
    cfg: Config,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    lora_paths: Sequence[str] | None = None,
    seed: int | None = None,
    images_per_prompt: int = 1,
    device: torch.device | str | None = None,
) -> list[Path]:
    """`rtdmd-ray sample`: write ``{prompt index:03d}_{image:02d}.png`` for every prompt into ``out_dir``.

    Image ``j`` of prompt ``p`` has index ``p * images_per_prompt + j`` under the base seed (``--seed``, else
    ``eval.seed``); the PNGs carry prompt, seed and config hash. Returns the written paths.
    """
    if not prompts:
        raise ValueError("rtdmd-ray sample needs at least one --prompt")
    if images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be >= 1, got {images_per_prompt}")
    base = cfg.eval.seed if seed is None else int(seed)
    pipe = InferencePipeline.from_config(cfg, lora_paths=lora_paths, device=device)
    chash = config_hash(cfg, lora_paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (p, j, pi * images_per_prompt + j) for pi, p in enumerate(prompts) for j in range(images_per_prompt)
    ]
    written = []
    bs = cfg.eval.batch_images
    for start in range(0, len(jobs), bs):
        chunk = jobs[start : start + bs]
        seeds = [image_seed(base, idx) for _, _, idx in chunk]
        images = to_uint8(pipe.generate([p for p, _, _ in chunk], seeds))
        for (p, j, idx), im, s in zip(chunk, images, seeds, strict=True):
            path = out / f"{idx // images_per_prompt:03d}_{j:02d}.png"
            path.write_bytes(encode_png(im, {PNG_PROMPT_KEY: p, PNG_SEED_KEY: str(s), PNG_HASH_KEY: chash}))
            written.append(path)
    (out / "sample.json").write_text(
        json.dumps(
            {
                "prompts": list(prompts),
                "base_seed": base,
                "config_hash": chash,
                **pipe.describe(),
                "images": [p.name for p in written],
            },
            indent=2,
        )
    )
    return written

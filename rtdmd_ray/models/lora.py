"""LoRA through peft: injection, named adapters on one base, published-format I/O, diffusers export, merging.

Over 600 lines on purpose: injection, adapter switching, file I/O and merging all hang on the one flat-name
convention below; one file keeps that convention in one place.

Conventions (spec algorithms.md §4.3, rewards-inference.md §5.6 / §5.12):

* Targets per family (``lora_targets``); rank 32, alpha 64 (scale ``alpha / r = 2``); peft ``gaussian`` init
  (A ~ N(0, 1/r), B = 0).
* Several named adapters may live on ONE base transformer ("generator", "fake_score", ...); the teacher is
  the same base with adapters disabled. ``use_adapters(module, names)`` switches the active set without
  touching ``requires_grad`` (peft's own ``set_adapter`` flips it, which would silently freeze the other
  role's LoRA mid-graph). Several adapters may be active at once: their deltas add, which is how a frozen
  cold-start LoRA can be stacked under a fresh RL LoRA without a second copy of the base.
* LoRA A/B weights are fp32 even when the base is bf16 (fp32 master weights); only they are trainable.
* Flat names everywhere use the published ``generator_ema.pt`` format, adapter-independent:
  ``<module path>.lora_A.default.weight [r, in]`` and ``<module path>.lora_B.default.weight [out, r]``.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

LORA_RANK = 32
LORA_ALPHA = 64

# SD3 / SD3.5 / FLUX.1: image- and text-stream attention projections of the joint blocks (peft suffix match)
SD3_FLUX1_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
# FLUX.2: suffixes for the double-stream blocks + the fused single-stream qkv/mlp projection; the
# single-stream output projection is a bare Linear ``attn.to_out``, listed per block (``to_out.0`` misses it)
FLUX2_SUFFIX_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "to_qkv_mlp_proj",
)
PUBLISHED_ADAPTER = "default"
_PREFIXES = ("module.", "_orig_mod.", "base_model.model.", "transformer.")
_LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_DIFFUSERS_PIPELINES = {
    "sd3": "StableDiffusion3Pipeline",
    "flux1": "FluxPipeline",
    "flux2": "Flux2KleinPipeline",
}


# ---------------------------------------------------------------------- targets and injection
def lora_targets(family: str, transformer: nn.Module | None = None) -> list[str]:
    """peft ``target_modules`` for ``family`` ("sd3" | "flux1" | "flux2"; "shapes" is SD3-family).

    FLUX.2 needs ``transformer`` to enumerate its single-stream blocks (20 for 4B, 24 for 9B).
    """
    if family in ("sd3", "sd35", "flux1", "shapes"):
        return list(SD3_FLUX1_TARGETS)
    if family == "flux2":
        if transformer is None:
            raise ValueError("lora_targets('flux2') needs the transformer to list its single-stream blocks")
        n_single = len(transformer.single_transformer_blocks)
        return [
            *FLUX2_SUFFIX_TARGETS,
            *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(n_single)),
        ]
    raise ValueError(f"no LoRA target list for backbone family {family!r}: use sd3, flux1 or flux2")


def lora_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(module path, peft LoRA layer)`` for every injected layer."""
    from peft.tuners.lora import LoraLayer

    for name, sub in module.named_modules():
        if isinstance(sub, LoraLayer):
            yield name, sub


def adapter_names(module: nn.Module) -> list[str]:
    names: set[str] = set()
    for _, layer in lora_layers(module):
        names.update(layer.lora_A.keys())
    return sorted(names)


def add_lora(
    transformer: nn.Module,
    adapter: str,
    *,
    family: str | None = None,
    targets: Sequence[str] | None = None,
    rank: int = LORA_RANK,
    alpha: float = LORA_ALPHA,
    init: str | bool = "gaussian",
    seed: int | None = None,
) -> list[str]:
    """Inject a LoRA adapter named ``adapter`` into ``transformer``; returns the injected module paths.

    Targets come from ``targets`` or ``lora_targets(family, transformer)``. The adapter's A/B weights are
    fp32 and trainable; every other parameter of ``transformer`` (base and other adapters' trainability) is
    left as it was, except that base weights are frozen. ``seed`` makes the peft init reproducible without
    touching the global RNG. The active adapter set is unchanged (the first adapter becomes active).
    """
    from peft import LoraConfig

    if targets is None:
        if family is None:
            raise ValueError("add_lora needs family= (to pick the target modules) or targets=")
        targets = lora_targets(family, transformer)
    if adapter in adapter_names(transformer):
        raise ValueError(f"LoRA adapter {adapter!r} already exists on this transformer: pick another name")
    previous = _active_state(transformer)
    grads = {n: p.requires_grad for n, p in transformer.named_parameters()}
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights=init,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
    )
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if hasattr(transformer, "add_adapter"):  # diffusers models: registers the peft config as well
            with warnings.catch_warnings():
                # peft warns on every second adapter; several named adapters on one base are intended here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                transformer.add_adapter(config, adapter_name=adapter)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, transformer, adapter_name=adapter)
    injected = []
    for name, layer in lora_layers(transformer):
        if adapter in layer.lora_A:
            injected.append(name)
            layer.lora_A[adapter].to(torch.float32)
            layer.lora_B[adapter].to(torch.float32)
    if not injected:
        raise ValueError(f"LoRA targets {list(targets)} matched no module of {type(transformer).__name__}")
    # restore the trainability peft changed, then: base frozen, this adapter trainable
    for n, p in transformer.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            p.requires_grad_(grads.get(n, False) or _param_adapter(n) == adapter)
        else:
            p.requires_grad_(False)
    if previous is None:
        use_adapters_now(transformer, adapter)
    else:
        _restore_active(transformer, previous)
    return injected


def _param_adapter(param_name: str) -> str | None:
    m = _LORA_KEY.match(param_name)
    return m.group("adapter") if m else None


def lora_parameters(module: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The A/B parameters of ``adapter`` (what the role's optimiser owns), in a stable order."""
    return [p for n, p in module.named_parameters() if _param_adapter(n) == adapter]


def set_trainable(module: nn.Module, adapters: Iterable[str]) -> None:
    """Exactly the LoRA parameters of ``adapters`` require grad; every other parameter is frozen."""
    keep = set(adapters)
    for n, p in module.named_parameters():
        p.requires_grad_(_param_adapter(n) in keep)


# ---------------------------------------------------------------------- switching
def _active_state(module: nn.Module) -> tuple[tuple[str, ...], bool] | None:
    for _, layer in lora_layers(module):
        return tuple(layer.active_adapters), bool(layer.disable_adapters)
    return None


def _restore_active(module: nn.Module, state: tuple[tuple[str, ...], bool]) -> None:
    names, disabled = state
    for _, layer in lora_layers(module):
        layer._active_adapter = list(names)
        layer._disable_adapters = disabled


def use_adapters_now(module: nn.Module, names: str | Sequence[str] | None) -> None:
    """Activate adapter ``names`` (a name, several names whose deltas add, or ``None`` = the plain base).

    Unlike peft's ``set_adapter`` this never changes ``requires_grad``.
    """
    if isinstance(names, str):
        names = [names]
    known = set(adapter_names(module))
    if names is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise KeyError(
                f"LoRA adapter(s) {unknown} not on this transformer (it has {sorted(known)}): "
                f"add them with add_lora first"
            )
    for _, layer in lora_layers(module):
        if names is None:
            layer._disable_adapters = True
        else:
            layer._active_adapter = list(names)
            layer._disable_adapters = False


@contextmanager
def use_adapters(module: nn.Module, names: str | Sequence[str] | None) -> Iterator[nn.Module]:
    """Context manager form of ``use_adapters_now``; restores the previous active set on exit.

    ``with use_adapters(t, "fake_score"): v = ...``; ``with use_adapters(t, None):`` runs the teacher (base).
    """
    previous = _active_state(module)
    use_adapters_now(module, names)
    try:
        yield module
    finally:
        if previous is not None:
            _restore_active(module, previous)


# ---------------------------------------------------------------------- flat named tensors
def canonical_key(key: str) -> tuple[str, str] | None:
    """``(module path, "A" | "B")`` of a LoRA weight key in any of the known formats, else ``None``.

    Accepts ``module.`` / ``_orig_mod.`` / ``base_model.model.`` / ``transformer.`` prefixes (repeated) and
    ``.lora_A.weight``, ``.lora_A.<adapter>.weight``.
    """
    changed = True
    while changed:
        changed = False
        for pre in _PREFIXES:
            if key.startswith(pre):
                key, changed = key[len(pre) :], True
    m = _LORA_KEY.match(key)
    if m is None:
        return None
    return m.group("path"), m.group("ab")


def published_key(path: str, ab: str) -> str:
    return f"{path}.lora_{ab}.{PUBLISHED_ADAPTER}.weight"


def lora_state(module: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """Adapter ``adapter``'s weights as ``{published key: tensor}`` (detached views, no copy; clone to keep).

    Keys: ``<module path>.lora_A.default.weight [r, in]`` / ``...lora_B.default.weight [out, r]``.
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(module):
        if adapter in layer.lora_A:
            out[published_key(name, "A")] = layer.lora_A[adapter].weight.detach()
            out[published_key(name, "B")] = layer.lora_B[adapter].weight.detach()
    if not out:
        raise KeyError(f"no LoRA adapter {adapter!r} on this module (adapters: {adapter_names(module)})")
    return out


@dataclass
class LoadReport:
    """Result of ``load_lora_state``: LoRA keys of the adapter not provided, and provided keys not used."""

    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


@torch.no_grad()
def load_lora_state(
    module: nn.Module,
    adapter: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
) -> LoadReport:
    """Copy ``tensors`` (any known key format) into adapter ``adapter``; bit-exact for same-dtype tensors.

    ``strict`` raises on missing or unexpected LoRA keys or shape mismatches; non-strict still raises if
    nothing matched (a key-format mismatch must never be a silent no-op, unlike the reference).
    """
    targets = lora_state(module, adapter)
    provided: dict[str, torch.Tensor] = {}
    report = LoadReport()
    for key, value in tensors.items():
        ck = canonical_key(key)
        if ck is None:
            report.unexpected.append(key)
            continue
        provided[published_key(*ck)] = value
    for key, value in provided.items():
        dst = targets.get(key)
        if dst is None:
            report.unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(dst.shape):
            raise ValueError(
                f"LoRA tensor {key} has shape {tuple(value.shape)} but adapter {adapter!r} expects "
                f"{tuple(dst.shape)}: the checkpoint's rank or targets differ from model.lora"
            )
        dst.copy_(value.to(device=dst.device, dtype=dst.dtype))
        report.loaded += 1
    report.missing = [k for k in targets if k not in provided]
    if report.loaded == 0:
        raise ValueError(
            f"no LoRA tensor matched adapter {adapter!r} (got {len(tensors)} keys, e.g. "
            f"{next(iter(tensors), None)!r}; expected e.g. {next(iter(targets))!r})"
        )
    if strict and (report.missing or report.unexpected):
        raise ValueError(
            f"LoRA state for adapter {adapter!r}: {len(report.missing)} missing (e.g. "
            f"{report.missing[:1]}), {len(report.unexpected)} unexpected (e.g. {report.unexpected[:1]}); "
            f"pass strict=False to load the overlap"
        )
    return report


# ---------------------------------------------------------------------- files
@dataclass
class LoraFile:
    """A LoRA read from disk: published-format tensors plus its rank/alpha (and targets when recorded)."""

    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    target_modules: list[str] | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def is_lora_checkpoint(tensors: Mapping[str, Any]) -> bool:
    """True iff non-empty and every key contains ``lora_A`` or ``lora_B``."""
    return bool(tensors) and all(("lora_A" in k or "lora_B" in k) for k in tensors)


def _normalise(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    if not is_lora_checkpoint(tensors):
        bad = next((k for k in tensors if "lora_A" not in k and "lora_B" not in k), None)
        raise ValueError(
            f"{source} is not a LoRA-only checkpoint (key {bad!r} is not lora_A/lora_B; empty: "
            f"{not tensors}): pass a generator_ema.pt / adapter_model.safetensors LoRA file"
        )
    out = {}
    for k, v in tensors.items():
        ck = canonical_key(k)
        if ck is None:
            raise ValueError(
                f"{source}: cannot parse LoRA key {k!r} (expected '<module>.lora_A[.adapter].weight')"
            )
        out[published_key(*ck)] = v
    return out


def _peft_dir(path: Path) -> Path | None:
    for cand in (path, path / "transformer"):
        if cand.is_dir() and (
            (cand / "adapter_model.safetensors").exists() or (cand / "adapter_config.json").exists()
        ):
            return cand
    return None


def load_lora_file(path: str | Path, *, rank: int = LORA_RANK, alpha: float = LORA_ALPHA) -> LoraFile:
    """Read a LoRA from a PEFT directory, ``<dir>/transformer``, a ``.pt`` (``weights_only=True``), our
    ``.safetensors`` or a diffusers ``pytorch_lora_weights.safetensors``. Rank/alpha come from the file's
    config or metadata when present, else the fallbacks ``rank``/``alpha`` (32/64).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    peft_dir = _peft_dir(p)
    targets = None
    if peft_dir is not None:
        cfg_path = peft_dir / "adapter_config.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            rank, alpha = int(cfg.get("r", rank)), float(cfg.get("lora_alpha", alpha))
            targets = cfg.get("target_modules")
        st, pt = peft_dir / "adapter_model.safetensors", peft_dir / "adapter_model.pt"
        if st.exists():
            raw = load_file(str(st))
        elif pt.exists():
            raw = torch.load(pt, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(
                f"{peft_dir} has adapter_config.json but no adapter_model.safetensors/.pt"
            )
        return LoraFile(_normalise(raw, str(peft_dir)), rank, alpha, targets)
    if p.is_dir():
        cands = sorted(p.glob("*.safetensors"))
        if len(cands) != 1:
            raise FileNotFoundError(
                f"LoRA directory {p} has no adapter_config.json and {len(cands)} .safetensors "
                f"files: point lora_paths at the file itself"
            )
        p = cands[0]
    if not p.is_file():
        raise FileNotFoundError(
            f"LoRA path {p} not found: expected a PEFT directory, <checkpoint>/transformer, "
            f"a generator_ema.pt or a .safetensors file"
        )
    if p.suffix == ".safetensors":
        raw = load_file(str(p))
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        if "rank" in meta:  # our own format
            rank, alpha = int(meta["rank"]), float(meta["alpha"])
            targets = json.loads(meta.get("target_modules", "null"))
        elif "lora_adapter_metadata" in meta:  # diffusers export
            md = json.loads(meta["lora_adapter_metadata"])
            rank = int(md.get("transformer.r", md.get("r", rank)))
            alpha = float(md.get("transformer.lora_alpha", md.get("lora_alpha", alpha)))
        return LoraFile(_normalise(raw, str(p)), rank, alpha, targets)
    raw = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{p} holds a {type(raw).__name__}, not a LoRA state dict")
    return LoraFile(_normalise(raw, str(p)), rank, alpha, targets)


def save_lora(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    rank: int = LORA_RANK,
    alpha: float = LORA_ALPHA,
    target_modules: Sequence[str] | None = None,
    family: str | None = None,
) -> Path:
    """Write published-format LoRA tensors: ``.pt`` = the reference's ``generator_ema.pt`` (torch.save of the
    LoRA-only dict); ``.safetensors`` = our format (rank, alpha, targets, family in the metadata)."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in _normalise(tensors, "tensors").items()}
    if p.suffix == ".pt":
        torch.save(cpu, p)
    elif p.suffix == ".safetensors":
        meta = {
            "format": "rtdmd-ray-lora",
            "rank": str(rank),
            "alpha": str(alpha),
            "target_modules": json.dumps(list(target_modules) if target_modules else None),
            "family": family or "",
        }
        save_file(cpu, str(p), metadata=meta)
    else:
        raise ValueError(f"LoRA file {p} must end in .pt (published format) or .safetensors (ours)")
    return p


def save_peft_dir(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    rank: int = LORA_RANK,
    alpha: float = LORA_ALPHA,
    target_modules: Sequence[str],
    init: str | bool = "gaussian",
) -> Path:
    """The reference checkpoint's ``transformer/`` folder: ``adapter_model.safetensors`` (``.default.`` keys)
    and a hand-written ``adapter_config.json``."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in _normalise(tensors, "tensors").items()}
    save_file(cpu, str(d / "adapter_model.safetensors"))
    cfg = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "peft_type": "LORA",
        "task_type": None,
        "init_lora_weights": init,
        "use_rslora": False,
    }
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return d


def export_diffusers_lora(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    family: str,
    rank: int = LORA_RANK,
    alpha: float = LORA_ALPHA,
    target_modules: Sequence[str] | None = None,
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(directory)`` and
    ``transformer.load_lora_adapter(file, prefix="transformer")`` accept: keys
    ``transformer.<module>.lora_A.weight``, rank/alpha in the ``lora_adapter_metadata`` so the scale
    alpha/r survives. Returns the file path."""
    import importlib

    from peft import LoraConfig

    if family not in _DIFFUSERS_PIPELINES:
        raise ValueError(
            f"no diffusers pipeline for family {family!r}: use one of {sorted(_DIFFUSERS_PIPELINES)}"
        )
    pipe_cls = getattr(importlib.import_module("diffusers"), _DIFFUSERS_PIPELINES[family])
    layers = {
        f"{path}.lora_{ab}.weight": v.detach().to("cpu").contiguous()
        for k, v in _normalise(tensors, "tensors").items()
        for path, ab in [canonical_key(k)]
    }
    modules = (
        sorted({canonical_key(k)[0] for k in tensors}) if target_modules is None else list(target_modules)
    )
    meta = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0, bias="none"
    ).to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pipe_cls.save_lora_weights(d, transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta)
    return d / "pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------------- merging
@dataclass
class MergeReport:
    merged: int
    skipped: int


@torch.no_grad()
def merge_lora_into_base(
    transformer: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    rank: int = LORA_RANK,
    alpha: float = LORA_ALPHA,
) -> MergeReport:
    """``W += (alpha / rank) * B @ A`` for every complete A/B pair, summed in fp32, rounded once to W's dtype.

    ``tensors`` in any known key format; works on a plain or a peft-injected transformer. A delta whose shape
    only fits transposed is applied transposed; unmatched or incomplete pairs are counted as skipped.
    Raises if nothing merged (a silent no-op would hide a key-format mismatch).
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        ck = canonical_key(k)
        if ck is not None:
            pairs.setdefault(ck[0], {})[ck[1]] = v
    params = dict(transformer.named_parameters())
    scale = float(alpha) / float(rank)
    merged = skipped = 0
    for path, ab in pairs.items():
        w = next((params[n] for n in (f"{path}.base_layer.weight", f"{path}.weight") if n in params), None)
        if w is None or "A" not in ab or "B" not in ab:
            skipped += 1
            continue
        delta = ab["B"].to(w.device, torch.float32) @ ab["A"].to(w.device, torch.float32)
        if delta.shape != w.shape:
            if delta.T.shape != w.shape:
                skipped += 1
                continue
            delta = delta.T
        w.copy_((w.float() + scale * delta).to(w.dtype))
        merged += 1
    if merged == 0:
        raise RuntimeError(
            f"merged 0 of {len(pairs)} LoRA pairs into {type(transformer).__name__}: the keys "
            f"(e.g. {next(iter(tensors), None)!r}) do not name its modules; wrong backbone?"
        )
    return MergeReport(merged, skipped)


def merge_lora_files(
    transformer: nn.Module, paths: Sequence[str | Path], **fallback: Any
) -> list[MergeReport]:
    """Merge each LoRA file into the base in list order (cold start first, then RL), as inference does."""
    reports = []
    for p in paths:
        lf = load_lora_file(p, **fallback)
        reports.append(merge_lora_into_base(transformer, lf.tensors, rank=lf.rank, alpha=lf.alpha))
    return reports


@torch.no_grad()
def merge_adapter(transformer: nn.Module, adapter: str) -> int:
    """Fold adapter ``adapter`` into the base weights (``W += scale * B @ A``, fp32, then W's dtype); the
    adapter itself is left in place (re-initialise or delete it). Returns the number of merged layers."""
    n = 0
    for _, layer in lora_layers(transformer):
        if adapter not in layer.lora_A:
            continue
        w = layer.get_base_layer().weight
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        delta = b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        w.copy_((w.float() + layer.scaling[adapter] * delta).to(w.dtype))
        n += 1
    return n


@torch.no_grad()
def reinit_adapter(
    transformer: nn.Module,
    adapter: str,
    *,
    a_std: float | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """B = 0 and A ~ N(0, a_std) (default ``1 / r``, peft's gaussian init; the reference's
    ``merge_before_training`` uses 1.0)."""
    for _, layer in lora_layers(transformer):
        if adapter not in layer.lora_A:
            continue
        a = layer.lora_A[adapter].weight
        std = a_std if a_std is not None else 1.0 / layer.r[adapter]
        a.copy_(torch.randn(a.shape, generator=generator, dtype=torch.float32).to(a) * std)
        layer.lora_B[adapter].weight.zero_()


def merge_before_training(
    transformer: nn.Module,
    adapter: str,
    lora: LoraFile | Mapping[str, torch.Tensor],
    *,
    reinit_a_std: float | None = None,
    generator: torch.Generator | None = None,
    strict: bool = True,
) -> LoadReport:
    """The RL start (spec algorithms.md §3.1): load the cold-start LoRA into ``adapter``, fold it into the
    base, then re-initialise the adapter (B = 0, A ~ N(0, 1/r) or ``reinit_a_std``): a fresh LoRA on top.

    The adapter's own rank/alpha (set by ``add_lora``) define the scale; a ``LoraFile`` whose alpha/rank
    differ is rejected, because folding it with the adapter's scale would be wrong.
    """
    tensors = lora.tensors if isinstance(lora, LoraFile) else lora
    if isinstance(lora, LoraFile):
        for _, layer in lora_layers(transformer):
            if adapter in layer.lora_A:
                if abs(layer.scaling[adapter] - lora.scale) > 1e-12:
                    raise ValueError(
                        f"cold-start LoRA scale {lora.alpha}/{lora.rank} differs from adapter "
                        f"{adapter!r} scale {layer.scaling[adapter]}: set model.lora rank/alpha to match"
                    )
                break
    report = load_lora_state(transformer, adapter, tensors, strict=strict)
    merge_adapter(transformer, adapter)
    reinit_adapter(transformer, adapter, a_std=reinit_a_std, generator=generator)
    return report


@torch.no_grad()
def merged_state_dict(transformer: nn.Module, adapters: str | Sequence[str]) -> dict[str, torch.Tensor]:
    """A plain (non-peft) state dict with ``adapters`` folded in: ``.base_layer`` stripped, LoRA keys dropped.

    This is what the reference's merge tool meant to save (it saved the unmodified base, spec §5.12).
    """
    if isinstance(adapters, str):
        adapters = [adapters]
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(transformer):
        w = layer.get_base_layer().weight
        total = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for ad in adapters:
            if ad in layer.lora_A:
                total += layer.scaling[ad] * (
                    layer.lora_B[ad].weight.float() @ layer.lora_A[ad].weight.float()
                )
        deltas[f"{name}.weight"] = total
    out: dict[str, torch.Tensor] = {}
    for k, v in transformer.state_dict().items():
        if ".lora_" in k:
            continue
        plain = k.replace(".base_layer.", ".")
        if plain in deltas:
            v = (v.float() + deltas[plain]).to(v.dtype)
        out[plain] = v
    return out


def save_merged_transformer(
    transformer: nn.Module, adapters: str | Sequence[str], directory: str | Path
) -> Path:
    """Save a diffusers transformer with ``adapters`` merged (loadable by ``<Class>.from_pretrained``)."""
    state = merged_state_dict(transformer, adapters)
    fresh = type(transformer).from_config(transformer.config)
    fresh.load_state_dict(state, strict=True)
    fresh.to(dtype=transformer.dtype)
    d = Path(directory)
    fresh.save_pretrained(d)
    return d

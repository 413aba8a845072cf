"""Checkpoint directories: atomic writes, completeness, rotation and ``resume: auto`` (Ray-free).

Layout of ``<output_dir>/checkpoint-<iteration:08d>/``::

    meta.json                      written last, by rank 0: {"complete": true, "iteration", "world_size", ...}
    generator.safetensors          full LoRA tensors of each role (published keys, fp32), rank 0
    fake_score.safetensors
    generator_ema.safetensors      the EMA generator (what eval, export and the RL stage use)
    transformer/                   PEFT folder of the EMA generator (adapter_model.safetensors + config)
    rank<r>/local.safetensors      rank r's adapter tensors and EMA shadows (its shard under fsdp2)
    rank<r>/state.pt               rank r's optimiser states, RNG states, counters (torch.load weights_only)

A checkpoint is written into ``checkpoint-<it>.tmp``; after every rank has written its part, rank 0 writes
``meta.json`` and renames the directory, so a crash mid-save never leaves a directory that looks complete.
Only the newest ``train.keep_last_checkpoints`` complete checkpoints are kept. All ranks must see the same
filesystem (one machine, or a shared volume).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

CKPT_RE = re.compile(r"^checkpoint-(\d{8})$")
META = "meta.json"


def checkpoint_name(iteration: int) -> str:
    return f"checkpoint-{iteration:08d}"


def tmp_dir(output_dir: str | Path, iteration: int) -> Path:
    return Path(output_dir) / f"{checkpoint_name(iteration)}.tmp"


def is_complete(path: str | Path) -> bool:
    """A directory holds a complete checkpoint: ``meta.json`` with ``complete: true`` is present."""
    meta = Path(path) / META
    if not meta.is_file():
        return False
    try:
        return bool(json.loads(meta.read_text()).get("complete"))
    except (json.JSONDecodeError, OSError):
        return False


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as ``(iteration, path)``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str, output_dir: str | Path, base: dict[str, Any] | None = None) -> Path | None:
    """``train.resume`` -> the checkpoint to load: ``auto`` (newest complete or None), ``never`` or a path.

    With ``base`` (this run's ``base_fingerprint``), a checkpoint of a different base is refused
    (``check_resume_base``) and its warnings go to stderr.
    """
    if resume == "never":
        return None
    if resume == "auto":
        found = latest_checkpoint(output_dir)
    else:
        found = Path(resume)
        if not is_complete(found):
            raise FileNotFoundError(
                f"train.resume={resume!r} is not a complete checkpoint directory (no {META} with complete: "
                "true); "
                "use auto, never, or a checkpoint-<iteration> directory"
            )
    if base is not None:
        for warning in check_resume_base(found, base):
            print(warning, file=sys.stderr)
    return found


def prepare_run_dir(cfg: Any) -> tuple[Path, Path | None]:
    """A training stage's start: create ``train.output_dir``, resolve ``train.resume`` in it
    (``resolve_resume`` against this run's base), write the resolved ``config.yaml``; returns
    ``(output_dir, checkpoint to resume or None)``."""
    from rtdmd_ray.config import dump_yaml, resolve_path

    out = resolve_path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume_from = resolve_resume(cfg.train.resume, out, base=base_fingerprint(cfg.model))
    (out / "config.yaml").write_text(dump_yaml(cfg, comments=False))
    return out, resume_from


def export_final(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """Copy the checkpoint's PEFT folder (its generator LoRA) to ``<output_dir>/final``; returns that path."""
    final = Path(output_dir) / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(Path(checkpoint) / "transformer", final)
    return final


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename (readers never see a partial file)."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_rank_part(ckpt_tmp: Path, rank: int, tensors: dict[str, torch.Tensor], aux: dict[str, Any]) -> None:
    """Rank ``rank``'s files: local tensors (safetensors) and optimiser/RNG state (torch.save)."""
    from safetensors.torch import save_file

    d = ckpt_tmp / f"rank{rank}"
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "local.safetensors"))
    torch.save(aux, d / "state.pt")


def load_rank_part(ckpt: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    d = Path(ckpt) / f"rank{rank}"
    if not d.is_dir():
        raise FileNotFoundError(
            f"{ckpt} has no rank{rank}/ part: it was written by fewer learner ranks; resume with the same "
            "resources.learner.count"
        )
    return load_file(str(d / "local.safetensors")), torch.load(d / "state.pt", weights_only=True)


def finalize(ckpt_tmp: Path, iteration: int, meta: dict[str, Any], keep_last: int) -> Path:
    """Rank 0, after every rank wrote its part: write ``meta.json``, rename into place, rotate old ones."""
    final = ckpt_tmp.with_name(checkpoint_name(iteration))
    write_atomic_bytes(
        ckpt_tmp / META, json.dumps({**meta, "iteration": iteration, "complete": True}, indent=2).encode()
    )
    if final.exists():  # a re-save of the same iteration (e.g. after a resume) replaces the old one
        shutil.rmtree(final)
    os.replace(ckpt_tmp, final)
    for _, old in list_checkpoints(final.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / META).read_text())


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def base_fingerprint(model: Any) -> dict[str, Any]:
    """What a checkpoint's adapters are deltas on (``meta.json["base"]``), keyed by config path.

    The backbone, each trainable role's LoRA rank and alpha, and each adapter loaded before training by the
    sha256 of its file (content, not path: a moved file still matches, a retrained one does not). The base
    weights are named by ``model.pretrained_path`` only: hashing a multi-GB model each start costs too much.
    """
    from rtdmd_ray.config import resolve_path

    fp: dict[str, Any] = {"model.backbone": model.backbone, "model.pretrained_path": model.pretrained_path}
    for role in ("generator_lora", "fake_score_lora"):
        lc = getattr(model, role)
        fp[f"model.{role}"] = f"rank {lc.rank}, alpha {lc.alpha}" if lc.enabled else "full weights"
        path = resolve_path(lc.load_path) if lc.load_path else None  # the file the learner loads
        if path is not None and path.is_file():
            fp[f"model.{role}.load_path"] = f"sha256 {_sha256(path)}"
        elif lc.load_path:
            fp[f"model.{role}.load_path"] = lc.load_path  # a hub id or directory: named, not hashed
    return fp


def check_resume_base(checkpoint: Path | None, current: dict[str, Any]) -> list[str]:
    """Refuse to resume ``checkpoint`` onto a different base: its adapters would be applied to weights they
    were not trained on, silently. Raises ``ConfigError`` naming the keys that differ and the fix; returns
    warnings (a different ``model.pretrained_path`` may be the same weights moved, so it only warns).
    Checkpoints written before the fingerprint existed are not checked."""
    from rtdmd_ray.config import ConfigError

    if checkpoint is None:
        return []
    saved = read_meta(checkpoint).get("base")
    if not saved:
        return []
    diff = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    soft = [k for k in diff if k == "model.pretrained_path"]
    hard = [k for k in diff if k not in soft]
    if hard:
        what = "; ".join(f"{k}: checkpoint {saved.get(k, 'unset')!r}, config {current.get(k, 'unset')!r}"
                         for k in hard)
        raise ConfigError(
            f"train.resume: {checkpoint} was trained on a different base ({what}); resuming would apply its "
            "adapters to weights they were not trained on. Fix: a new train.output_dir for the new run (or "
            "move the old run away), or the original files back"
        )
    return [f"train.resume: {checkpoint} was trained from model.pretrained_path={saved.get(k)!r}, the config "
            f"says {current.get(k)!r}; resuming, assuming the same weights moved" for k in soft]

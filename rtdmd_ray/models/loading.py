"""Start-up helpers shared by the backbone loaders: dtype names, model-directory resolution, one-line errors.

Weights are never present on the CPU development machines, so every loader resolves its directory *before*
touching diffusers/transformers and fails with one line that names the config key, the path or hub id, and
how to provide it. A hub id is looked up in the local Hugging Face cache first (no network); only when the
hub is online is it downloaded, limited to the subfolders the backbone needs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
# a hub id is "owner/name" (one slash, no path-like prefix)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class MissingWeightsError(FileNotFoundError):
    """The model weights are not where the config says; the message is one line that says how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # guarantee one line


class BackboneLoadError(RuntimeError):
    """A component exists but could not be loaded (corrupt file, wrong class). One-line message."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16" | "fp16" | "fp32"`` (or a ``torch.dtype``) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"model.dtype={dtype!r} is not a known dtype: use one of bf16, fp16, fp32") from None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_model_dir(
    path_or_repo: str | os.PathLike,
    *,
    subfolders: Sequence[str],
    config_key: str = "model.pretrained_path",
) -> Path:
    """Local directory holding the diffusers layout of ``path_or_repo`` with every name in ``subfolders``.

    ``path_or_repo`` is a local directory or a hub id (``owner/name``). Raises ``MissingWeightsError`` (one
    line) when it is absent or incomplete; with ``HF_HUB_OFFLINE=1`` a hub id is only looked up in the local
    cache, so it fails immediately instead of hanging on the network.
    """
    text = str(path_or_repo).strip()
    if not text:
        raise MissingWeightsError(
            f"{config_key} is empty: set it to a local diffusers model directory or a hub id"
        )
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MissingWeightsError(
                f"{config_key}={text} is a file, not a model directory: point it at the diffusers folder "
                f"that contains {', '.join(subfolders)}"
            )
        _check_subfolders(path, subfolders, config_key, text)
        return path
    if not _REPO_ID.match(text):
        raise MissingWeightsError(
            f"{config_key}={text} not found: download the model (e.g. `huggingface-cli download <repo> "
            f"--local-dir {text}`) or set {config_key} to an existing diffusers directory or a hub id"
        )
    allow = ["model_index.json", *(f"{s}/*" for s in subfolders)]
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(text, local_files_only=True, allow_patterns=allow))
    except Exception:
        local = None
    if local is None or not all((local / s).is_dir() for s in subfolders):
        if hub_offline():
            raise MissingWeightsError(
                f"{config_key}={text} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: run "
                f"`huggingface-cli download {text}` where the hub is reachable (gated models need an "
                f"accepted licence and HF_TOKEN), or set {config_key} to a local diffusers directory"
            )
        try:
            local = Path(snapshot_download(text, allow_patterns=allow))
        except Exception as exc:  # network, auth, gated repo: one line, no library stack
            raise MissingWeightsError(
                f"{config_key}={text} could not be downloaded ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}): check HF_TOKEN / the licence, or "
                f"set {config_key} to a local diffusers directory"
            ) from None
    _check_subfolders(local, subfolders, config_key, text)
    return local


def _check_subfolders(root: Path, subfolders: Sequence[str], config_key: str, text: str) -> None:
    missing = [s for s in subfolders if not (root / s).is_dir()]
    if missing:
        raise MissingWeightsError(
            f"{config_key}={text} is incomplete: missing subfolder(s) {', '.join(missing)} in {root}; "
            f"re-download the full diffusers layout"
        )


def load_component(root: Path, subfolder: str, loader: Callable[[], T]) -> T:
    """Run ``loader`` (a ``from_pretrained`` call); any failure becomes a one-line ``BackboneLoadError``."""
    try:
        return loader()
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise BackboneLoadError(
            f"loading {root / subfolder} failed ({type(exc).__name__}: {first}); the folder is present but "
            f"unreadable: re-download it or check that it belongs to this backbone family"
        ) from exc

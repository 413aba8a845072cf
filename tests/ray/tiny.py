"""The tiny-SD3 RL job the local-Ray system tests run (`configs/debug/tiny_sd3.yaml`), with the overrides they
all share; each test adds its own."""

from __future__ import annotations

from pathlib import Path

from rtdmd_ray.config import Config, load_config

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug" / "tiny_sd3.yaml"


def tiny_rl_config(out: Path, epochs: int, *overrides: str) -> Config:
    """``epochs`` epochs written under ``out``, one sample batch per epoch (2 prompts x 4 images), no per-step
    stdout; ``overrides`` come last, so they win."""
    return load_config(TINY_CONFIG, [
        f"train.iterations={epochs}", f"train.output_dir={out}", "grpo.sample_batches_per_epoch=1",
        "logging.stdout=false", *overrides,
    ])

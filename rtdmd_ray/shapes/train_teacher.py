"""Train the ShapeWorld teacher: a tiny SD3-family flow model (diffusers ``SD3Transformer2DModel``) with a
tiny ``CLIPTextModel`` trained jointly, by rectified flow matching with CFG dropout, on CPU.

Recipe (feasibility lessons, spec shapeworld-feasibility.md): 4 layers × width 128, batch 64, AdamW 1e-3
held for most of the run then cosine-annealed, logit-normal σ shifted toward high noise, EMA in fp32.
Data are rendered on the fly; batch ``k`` is a pure function of ``(seed, k)``, so a run is deterministic
from its seed and resumes exactly from a checkpoint.

The run is sized by wall time (``--minutes``): throughput is measured over the first steps and fixed into a
step count (``total_steps``, recorded in ``meta.json``); the schedule is then keyed to steps. If the machine
slows down, progress is also pushed by wall time (cap 1.25 × budget). ``--steps N`` skips the calibration
and reproduces a run bit-for-bit on the same machine and thread count.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import SD3Transformer2DModel
from tqdm import tqdm

from rtdmd_ray.shapes.prompts import sample_training_prompt
from rtdmd_ray.shapes.render import encode_latents, render_batch
from rtdmd_ray.shapes.text import TEXT_WIDTH, build_text_encoder, build_tokenizer, encode_text, tokenize


@dataclass
class TeacherTrainConfig:
    out: str
    minutes: float = 75.0
    steps: int | None = None  # fixes the step count (bit-reproducible); else calibrated from --minutes
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    lr_min: float = 5e-5
    warmup_steps: int = 200
    hold_fraction: float = 0.6  # lr held at `lr` until this fraction of the run, then cosine to lr_min
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1  # fraction of captions replaced by the empty prompt ""
    sigma_logit_mean: float = 0.5  # > 0: more training at high noise, where layout and count are decided
    sigma_logit_std: float = 1.0
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    ckpt_minutes: float = 5.0
    threads: int = 2
    calib_steps: int = 40
    stop_after_steps: int | None = None  # checkpoint and return early (simulates an interruption in tests)


def build_transformer(cfg: TeacherTrainConfig) -> SD3Transformer2DModel:
    """SD3 transformer on the 12×16×16 pixel-unshuffle latents (patch 2 -> 64 image tokens)."""
    width = cfg.num_heads * cfg.head_dim
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=12, out_channels=12, num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads, joint_attention_dim=TEXT_WIDTH,
        caption_projection_dim=width, pooled_projection_dim=TEXT_WIDTH, pos_embed_max_size=16,
    )


def lr_at(progress: float, step: int, cfg: TeacherTrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, hold until ``hold_fraction``, cosine to ``lr_min`` at 1."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    if progress <= cfg.hold_fraction:
        return cfg.lr * warm
    frac = min(1.0, (progress - cfg.hold_fraction) / (1.0 - cfg.hold_fraction))
    return warm * (cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * frac)))


def training_batch(step: int, cfg: TeacherTrainConfig, tokenizer) -> dict[str, torch.Tensor]:
    """Batch ``step`` of the run: ``x0 [B,12,16,16]``, ``input_ids [B,L]``, ``eps``, ``sigma [B]``."""
    rng = np.random.default_rng([cfg.seed, step])
    metas = [sample_training_prompt(rng) for _ in range(cfg.batch_size)]
    x0 = encode_latents(render_batch(metas, rng))
    drop = rng.random(cfg.batch_size) < cfg.cfg_dropout
    prompts = ["" if d else m["prompt"] for d, m in zip(drop, metas, strict=True)]
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    eps = torch.randn(x0.shape, generator=g)
    u = torch.randn(cfg.batch_size, generator=g)
    sigma = torch.sigmoid(cfg.sigma_logit_mean + cfg.sigma_logit_std * u)
    return {"x0": x0, "input_ids": tokenize(tokenizer, prompts), "eps": eps, "sigma": sigma}


def flow_loss(transformer, text_encoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rectified-flow MSE on ``v = eps - x0`` at ``x_sigma = (1 - sigma) x0 + sigma eps``."""
    x0, eps, sigma = batch["x0"], batch["eps"], batch["sigma"]
    s = sigma.view(-1, 1, 1, 1)
    x = (1 - s) * x0 + s * eps
    embeds, pooled = encode_text(text_encoder, batch["input_ids"])
    v = transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                    timestep=1000.0 * sigma).sample
    return torch.nn.functional.mse_loss(v, eps - x0)


def save_pretrained_dir(path: Path, transformer, text_encoder, tokenizer, meta: dict[str, Any]) -> None:
    """A teacher dir ``{transformer, text_encoder, tokenizer}/`` + ``meta.json``, written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if path.exists():
        import shutil

        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def train_teacher(cfg: TeacherTrainConfig) -> Path:
    """Run (or resume) training; returns the final EMA teacher dir ``<out>/final``."""
    torch.set_num_threads(cfg.threads)
    # denormal floats appear in the weights/optimizer state after a few steps and make CPU matmuls 3-4x
    # slower (measured 1.7 s vs 0.37 s per step); flushing them to zero changes nothing measurable
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer)
    transformer = build_transformer(cfg)
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema_tr = copy.deepcopy(transformer).requires_grad_(False)
    ema_te = copy.deepcopy(text_encoder).requires_grad_(False)
    ema_params = list(ema_tr.parameters()) + list(ema_te.parameters())

    step, elapsed_s, total_steps = 0, 0.0, cfg.steps
    ckpt_path = out / "ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        transformer.load_state_dict(ck["transformer"])
        text_encoder.load_state_dict(ck["text_encoder"])
        ema_tr.load_state_dict(ck["ema_transformer"])
        ema_te.load_state_dict(ck["ema_text_encoder"])
        opt.load_state_dict(ck["optimizer"])
        if "torch_rng" in ck:  # absent from checkpoints written before it was stored
            torch.set_rng_state(ck["torch_rng"])
        step, elapsed_s, total_steps = ck["step"], ck["elapsed_s"], ck["total_steps"]
        print(f"resumed from {ckpt_path} at step {step} ({elapsed_s / 60:.1f} min)", flush=True)
    n_params = sum(p.numel() for p in params)
    print(f"teacher: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M transformer + "
          f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.3f}M text encoder params", flush=True)

    budget_s = cfg.minutes * 60.0
    log_f = (out / "train_log.jsonl").open("a")

    def meta() -> dict[str, Any]:
        return {"config": asdict(cfg), "step": step, "total_steps": total_steps,
                "elapsed_s": round(elapsed_s, 1), "n_params": n_params,
                "latent": "pixel_unshuffle(2) of the image in [-1, 1]"}

    def checkpoint() -> None:
        # only tensors, state dicts and plain numbers, so that resume loads it with ``weights_only=True``
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"transformer": transformer.state_dict(), "text_encoder": text_encoder.state_dict(),
                    "ema_transformer": ema_tr.state_dict(), "ema_text_encoder": ema_te.state_dict(),
                    "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "step": int(step),
                    "elapsed_s": float(elapsed_s),
                    "total_steps": None if total_steps is None else int(total_steps)}, tmp)
        os.replace(tmp, ckpt_path)
        save_pretrained_dir(out / "latest", ema_tr, ema_te, tokenizer, meta())

    bar = tqdm(total=total_steps, initial=step, desc="teacher", mininterval=20, ncols=110)
    t_last_ckpt = time.time()
    t_start = time.time() - elapsed_s
    calib_t0: float | None = None
    loss_acc, n_acc, gn_acc = 0.0, 0, 0.0
    while True:
        elapsed_s = time.time() - t_start
        if total_steps is None and step == 5:
            calib_t0 = time.time()
        if total_steps is None and calib_t0 is not None and step == 5 + cfg.calib_steps:
            sec_per_step = (time.time() - calib_t0) / cfg.calib_steps
            total_steps = max(step + 1, int(budget_s / sec_per_step))
            bar.total = total_steps
            bar.refresh()
            print(f"calibrated: {sec_per_step:.3f} s/step -> total_steps={total_steps}", flush=True)
        if total_steps is not None:
            progress = step / total_steps
            if cfg.steps is None:  # wall-time cap: a slowed-down machine anneals and stops anyway
                progress = max(progress, elapsed_s / (1.25 * budget_s))
            if progress >= 1.0:
                break
        else:
            progress = 0.0
        lr = lr_at(progress, step, cfg)
        for grp in opt.param_groups:
            grp["lr"] = lr
        batch = training_batch(step, cfg, tokenizer)
        loss = flow_loss(transformer, text_encoder, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        step += 1
        loss_acc, n_acc, gn_acc = loss_acc + float(loss.detach()), n_acc + 1, gn_acc + gn
        bar.update(1)
        if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
            elapsed_s = time.time() - t_start
            checkpoint()
            bar.close()
            return out / "latest"
        if step % 50 == 0:
            rec = {"step": step, "elapsed_s": round(time.time() - t_start, 1), "loss": loss_acc / n_acc,
                   "grad_norm": gn_acc / n_acc, "lr": lr, "progress": round(progress, 4)}
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.1e}")
            loss_acc, n_acc, gn_acc = 0.0, 0, 0.0
        if time.time() - t_last_ckpt > cfg.ckpt_minutes * 60:
            elapsed_s = time.time() - t_start
            checkpoint()
            t_last_ckpt = time.time()
    bar.close()
    elapsed_s = time.time() - t_start
    checkpoint()
    save_pretrained_dir(out / "final", ema_tr, ema_te, tokenizer, {**meta(), "weights": "ema"})
    save_pretrained_dir(out / "final_raw", transformer, text_encoder, tokenizer, {**meta(), "weights": "raw"})
    print(f"done: {step} steps in {elapsed_s / 60:.1f} min -> {out / 'final'}", flush=True)
    return out / "final"

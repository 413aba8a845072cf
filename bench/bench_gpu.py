"""GPU benchmark (issue 10): an SD3.5-Medium-sized transformer with random weights on one GPU.

Builds diffusers' ``SD3Transformer2DModel`` with SD3.5-M's published transformer config (24 MMDiT layers,
24 heads x 64, dual attention in layers 0-12, RMS qk-norm) with random bf16 weights, plus our rank-32
generator LoRA (``add_lora``, family sd3), and measures (median of ``--runs`` after warm-up,
CUDA-synchronised):

* rollout: 4-step CPS sampling with log-probs (``algorithms.cps.cps_step``, eta 0.9) of ``--batch`` latents
  at ``--resolution`` -> latents/s (= images/s without the VAE decode, which is excluded);
* learner step: one denoiser call with grad (flow-matching MSE on the velocity), backward through the LoRA,
  AdamW step on the LoRA parameters -> step seconds;
* MFU: FLOPs of one forward (rollout: x4 steps) and of one forward+backward counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on the same inputs, divided by the time and ``--peak-tflops``.

No text encoders and no VAE: the conditioning is random tensors of SD3's shapes (``--text-tokens`` x 4096,
pooled 2048). ``--tiny`` runs the same code on a tiny config on CPU in seconds (what the unit test runs).

    .venv/bin/python bench/bench_gpu.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from rtdmd_ray.algorithms.cps import cps_step
from rtdmd_ray.algorithms.schedules import sigma_schedule
from rtdmd_ray.models.lora import add_lora, lora_parameters

STEPS = (1000, 750, 500, 250)
VAE_SCALE = 8  # SD3's VAE downsamples by 8; latents have 16 channels
# transformer/config.json of stabilityai/stable-diffusion-3.5-medium
SD35_MEDIUM_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
TINY_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 48,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 40,
    "pos_embed_max_size": 16,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}
# dense bf16 peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, runs: int, warmup: int) -> list[float]:
    """Wall seconds of ``runs`` calls of ``fn`` after ``warmup`` untimed calls, synchronised per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def build_transformer(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """Random-weight ``SD3Transformer2DModel`` in ``dtype`` on ``device`` with the fp32 "generator" LoRA."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:  # initialise in place, in the target dtype: no 10 GB fp32 copy on the host
        with torch.device(device):
            model = SD3Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    add_lora(model, "generator", family="sd3", seed=seed)  # rank 32 / alpha 64, A/B fp32 on the base's device
    model.to(device)
    return model


class Bench:
    """The transformer, random SD3-shaped conditioning and the two measured callables."""

    def __init__(self, args: argparse.Namespace, config: dict[str, Any], device: torch.device):
        self.device, self.eta = device, args.eta
        dtype = getattr(torch, args.dtype)
        self.model = build_transformer(config, device, dtype, args.seed)
        if args.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.dtype = dtype
        self.side = args.resolution // VAE_SCALE
        self.channels = int(config["in_channels"])
        g = torch.Generator(device="cpu").manual_seed(args.seed)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

        self.cond = {
            b: (
                randn(b, args.text_tokens, config["joint_attention_dim"]),
                randn(b, config["pooled_projection_dim"]),
            )
            for b in {args.batch, args.learner_batch}
        }
        self.x_init = {
            b: randn(b, self.channels, self.side, self.side) for b in {args.batch, args.learner_batch}
        }
        self.sigmas = sigma_schedule("sd3", STEPS, None, shift=3.0)
        self.noise_gen = torch.Generator(device=device).manual_seed(args.seed)
        self.params = lora_parameters(self.model, "generator")
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, weight_decay=1e-4)

    def velocity(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """The SD3 call as ``SD3Backbone._forward`` makes it (timestep ``1000 sigma``)."""
        b = x.shape[0]
        t = torch.as_tensor(sigma, dtype=torch.float32, device=self.device).expand(b) * 1000.0
        emb, pooled = self.cond[b]
        return self.model(
            hidden_states=x.to(self.dtype),
            timestep=t,
            encoder_hidden_states=emb,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def rollout(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """4-step CPS with log-probs, storing the trajectory as the rollout role does."""
        x = self.x_init[batch]
        latents, log_probs = [], []
        for i in range(len(self.sigmas) - 1):
            v = self.velocity(x, self.sigmas[i])
            step = cps_step(x, v, self.sigmas[i], self.sigmas[i + 1], self.eta, generator=self.noise_gen)
            latents.append(x)
            log_probs.append(step.log_prob)
            x = step.sample
        return x, torch.stack(log_probs, 1)

    def loss(self, batch: int) -> torch.Tensor:
        """Flow-matching MSE on the velocity at one random noise level per sample (one denoiser call)."""
        x0 = self.x_init[batch]
        g = self.noise_gen
        eps = torch.randn(x0.shape, generator=g, device=self.device, dtype=torch.float32)
        sigma = torch.rand(batch, generator=g, device=self.device)
        s = sigma.view(-1, 1, 1, 1)
        xt = ((1 - s) * x0.float() + s * eps).to(self.dtype)
        v = self.velocity(xt, sigma)
        return F.mse_loss(v.float(), eps - x0.float())

    def learner_step(self, batch: int) -> float:
        loss = self.loss(batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def count_flops(self, batch: int) -> tuple[int, int]:
        """(one forward, one forward + backward) FLOPs at ``batch``; grads are discarded afterwards."""
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            self.velocity(self.x_init[batch], self.sigmas[0])
        fwd = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            self.loss(batch).backward()
        self.opt.zero_grad(set_to_none=True)
        return fwd, fc.get_total_flops()


def resolve_peak(arg: float | None, device: torch.device) -> tuple[float, str]:
    if arg is not None:
        return arg, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_TFLOPS.items():
            if key in name:
                return peak, f"{name} dense bf16"
        raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16 peak of this device)")
    raise SystemExit(f"no known peak for device {device}: pass --peak-tflops")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny config, CPU-sized defaults (seconds)")
    ap.add_argument("--batch", type=int, default=None, help="rollout batch (default 8; tiny 2)")
    ap.add_argument("--learner-batch", type=int, default=None, help="learner batch (default --batch)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default 512 -> 64x64; tiny 64)")
    ap.add_argument("--text-tokens", type=int, default=None, help="text sequence (default 333; tiny 16)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs, median (default 10; tiny 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--eta", type=float, default=0.9)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--peak-tflops", type=float, default=None, help="default: 989 on H100/H200")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute the transformer blocks in backward (model.gradient_checkpointing)")
    args = ap.parse_args(argv)
    defaults = (
        {"batch": 2, "resolution": 64, "text_tokens": 16, "runs": 3}
        if args.tiny
        else {"batch": 8, "resolution": 512, "text_tokens": 333, "runs": 10}
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.learner_batch is None:
        args.learner_batch = args.batch
    if args.resolution % (VAE_SCALE * 2):
        ap.error(f"--resolution must be a multiple of {VAE_SCALE * 2} (VAE x8, patch 2)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak_tflops, peak_src = resolve_peak(args.peak_tflops, device)
    config = TINY_CONFIG if args.tiny else SD35_MEDIUM_CONFIG
    t0 = time.perf_counter()
    bench = Bench(args, config, device)
    n_params = sum(p.numel() for p in bench.model.parameters())
    n_lora = sum(p.numel() for p in bench.params)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{'tiny' if args.tiny else 'SD3.5-M-sized'} SD3Transformer2DModel, random {args.dtype} weights: "
        f"{n_params / 1e6:.4g} M params ({n_lora / 1e6:.3g} M LoRA, rank 32, fp32) on {dev_name}; built in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    print(
        f"random conditioning (no text encoders, no VAE): prompt_embeds [B, {args.text_tokens}, "
        f"{config['joint_attention_dim']}], pooled [B, {config['pooled_projection_dim']}]; latents "
        f"[B, {bench.channels}, {bench.side}, {bench.side}] (resolution {args.resolution}); "
        "VAE decode excluded"
    )
    fwd_flops, fb_flops = bench.count_flops(args.batch)
    if args.learner_batch != args.batch:
        _, fb_flops = bench.count_flops(args.learner_batch)
    n_steps = len(STEPS)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t_roll = statistics.median(timed(lambda: bench.rollout(args.batch), device, args.runs, args.warmup))
    peak_roll = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # the learner's warm-up also builds the AdamW state
    t_learn = statistics.median(
        timed(lambda: bench.learner_step(args.learner_batch), device, args.runs, args.warmup)
    )
    peak_learn = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    final, logp = bench.rollout(args.batch)
    assert logp.shape == (args.batch, n_steps) and torch.isfinite(final.float()).all()
    roll_flops = n_steps * fwd_flops
    peak = peak_tflops * 1e12
    mfu_roll = roll_flops / t_roll / peak
    mfu_learn = fb_flops / t_learn / peak
    latents_per_s = args.batch / t_roll
    mem = f", peak memory rollout {peak_roll:.1f} GiB, learner {peak_learn:.1f} GiB" if cuda else ""
    print(
        f"median of {args.runs} after {args.warmup} warm-up; peak {peak_tflops:g} TFLOP/s ({peak_src}){mem}"
    )
    print("| phase | batch | time | GFLOP (FlopCounterMode) | achieved TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    print(
        f"| rollout: {n_steps}-step CPS + log-probs | {args.batch} | {t_roll * 1e3:.1f} ms "
        f"({latents_per_s:.2f} latents/s) | {roll_flops / 1e9:.4g} | {roll_flops / t_roll / 1e12:.3g} | "
        f"{mfu_roll:.3g} |"
    )
    print(
        f"| learner: fwd + bwd (LoRA) + AdamW | {args.learner_batch} | {t_learn * 1e3:.1f} ms | "
        f"{fb_flops / 1e9:.4g} | {fb_flops / t_learn / 1e12:.3g} | {mfu_learn:.3g} |"
    )
    if device.type != "cuda":
        print("note: on CPU FlopCounterMode does not count the SDPA kernel (attention FLOPs missing)")
    result = {
        "rollout_latents_per_s": latents_per_s,
        "learner_step_s": t_learn,
        "mfu_rollout": mfu_roll,
        "mfu_learner": mfu_learn,
    }
    print("RESULT " + " ".join(f"{k}={v:.6g}" for k, v in result.items()))
    return result | ({"peak_gib_rollout": peak_roll, "peak_gib_learner": peak_learn} if cuda else {})


if __name__ == "__main__":
    main(sys.argv[1:])

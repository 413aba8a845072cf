"""GPU checks of one device in one process, no Ray (issue: GPU checks at real size on one H100).

Writes ``<out>/gpu_check.json`` (every number and pass/fail) and prints a log; ``scripts/gpu_check.sh`` runs
it on the device machine. Four parts, each caught on its own so one failure does not hide the others:

1. ``numerics``: the CPS step and its log-prob, the AC-DMD renoise and the generator DMD loss on the device in
   fp32 against the CPU on the same inputs (max relative error <= 1e-5); under bf16 autocast the log-prob of a
   fixed sample recomputed twice through the ShapeWorld transformer (the PPO ratio at the same weights).
2. ``shapes_stages``: one ShapeWorld cold-start iteration (``stages.cold_start_step.ColdStartIteration``)
   and one RL learner epoch (``stages.rl_step.RLUpdate``, rollouts from ``roles.sampler.RolloutWorker``,
   scores from ``roles.reward_pool.RewardWorker``), the code the Ray actors call, on the CPU and on the
   device: losses finite and equal within ``--stage-rtol``.
3. ``bench``: ``bench/bench_gpu.py`` (SD3.5-M-sized random transformer, bf16, rank-32 LoRA) at 512 and
   1024 px, gradient checkpointing off and on: rollout latents/s, learner step s, peak memory, MFU.
4. ``environment``: torch / CUDA / device name, package versions.

``--tiny`` runs everything at toy sizes (the bench's tiny transformer, a few samples); with no CUDA it
compares the CPU with itself, which is what the unit test does to keep this script working.

    python bench/gpu_check.py --out results/            # on the device machine (scripts/gpu_check.sh)
    python bench/gpu_check.py --out /tmp/x --tiny       # dry run on the CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

FP32_RTOL = 1e-5


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


# ------------------------------------------------------------------------------------------------ numerics
def check_numerics(device: torch.device) -> dict[str, Any]:
    from rtdmd_ray.algorithms import acdmd
    from rtdmd_ray.algorithms.cps import cps_step

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the comparisons
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(0)
    x, v, xi = (torch.randn(4, 16, 32, 32, generator=g) for _ in range(3))
    out: dict[str, Any] = {}
    cpu = cps_step(x, v, 0.9, 0.75, 0.9, noise=xi)
    dev = cps_step(x.to(device), v.to(device), 0.9, 0.75, 0.9, noise=xi.to(device))
    out["cps_sample_rel_err"] = _rel_err(dev.sample, cpu.sample)
    out["cps_log_prob_rel_err"] = _rel_err(dev.log_prob, cpu.log_prob)
    again = cps_step(x.to(device), v.to(device), 0.9, 0.75, 0.9, prev_sample=dev.sample)
    out["cps_recomputed_log_prob_rel_err"] = _rel_err(again.log_prob, cpu.log_prob)

    # AC-DMD: renoise and the generator DMD loss with linear stand-ins for the teacher and fake velocities
    w_real, w_fake = (torch.randn(16, 16, generator=g) / 4 for _ in range(2))
    x_s, x0_pred, zeta, noise = (torch.randn(4, 16, 32, 32, generator=g) for _ in range(4))
    sigma_e = torch.full((4,), 0.6)

    def run(dev_: torch.device) -> tuple[torch.Tensor, ...]:
        def lin(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda z: torch.einsum("oc,bchw->bohw", w.to(dev_), z)

        xs = x_s.to(dev_).requires_grad_(True)
        x_e, target, scale = acdmd.renoise(xs.detach(), 0.5, sigma_e.to(dev_), noise.to(dev_))
        d = acdmd.generator_dmd_loss(xs, x0_pred.to(dev_), 0.5, sigma_e.to(dev_), noise.to(dev_),
                                     zeta.to(dev_), lin(w_real), lin(w_fake), eta=0.9)
        (grad,) = torch.autograd.grad(d.loss, xs)
        return x_e, target, scale, d.loss, grad

    for name, a, b in zip(("renoise_x", "renoise_target", "renoise_scale", "dmd_loss", "dmd_grad"),
                          run(device), run(torch.device("cpu")), strict=True):
        out[f"acdmd_{name}_rel_err"] = _rel_err(a, b)
    out["fp32_max_rel_err"] = max(v for k, v in out.items() if k.endswith("_rel_err"))
    out["fp32_ok"] = out["fp32_max_rel_err"] <= FP32_RTOL

    # bf16 autocast: the PPO ratio of a fixed sample, its log-prob recomputed twice at the same weights
    from rtdmd_ray.models import build_backbone

    bb = build_backbone("shapes", pretrained_path=str(REPO / "rtdmd_ray/shapes/assets/teacher"), dtype="fp32",
                        device=device, seed=0)
    shape = (4, *bb.latent_shape(32))
    xb = torch.randn(shape, generator=g).to(device)
    cond = bb.encode_prompts(["a red circle"] * 4)
    sig = torch.full((4,), 0.9, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        v1 = bb.velocity(xb, sig, cond).float()
        step = cps_step(xb, v1, 0.9, 0.75, 0.9, generator=torch.Generator(device=device).manual_seed(1))
        v2 = bb.velocity(xb, sig, cond).float()
        lp2 = cps_step(xb, v2, 0.9, 0.75, 0.9, prev_sample=step.sample).log_prob
    ratio = torch.exp(lp2 - step.log_prob)
    out["bf16_ratio_max_dev"] = float((ratio - 1).abs().max())
    out["bf16_ratio_exactly_one"] = bool(torch.equal(lp2, step.log_prob))
    return out


# ------------------------------------------------------------------------------------------ ShapeWorld stages
def _shapes_cfg(stage: str, tiny: bool) -> Any:
    from rtdmd_ray.config import load_config

    over = [f"stage={stage}", "resources.learner.count=1", "train.autocast_dtype=fp32"]
    if stage == "cold_start":
        # tiny: one iteration that updates both the fake score and the generator
        over += ["dmd.prompts_per_step=2", "dmd.fake_update_ratio=1"] if tiny else ["dmd.prompts_per_step=16"]
        return load_config(REPO / "configs/cold_start/shapes.yaml", over)
    over += ["grpo.prompts_per_step=2", "grpo.images_per_prompt=4" if tiny else "grpo.images_per_prompt=16",
             "grpo.sample_batches_per_epoch=1", "grpo.micro_batch_images_per_rank=4" if tiny
             else "grpo.micro_batch_images_per_rank=16", "last_step_loss.loss_type=ac_dmd",
             "last_step_loss.train_steps=[-1]", "last_step_loss.bp.enabled=true"]
    return load_config(REPO / "configs/rtdmd/shapes.yaml", over)


def _cold_start_iteration(cfg: Any, device: str) -> dict[str, float]:
    from rtdmd_ray.data.prompts import PromptStream, training_prompt_records
    from rtdmd_ray.stages.cold_start_step import ColdStartIteration
    from rtdmd_ray.stages.learner_state import LearnerState

    state = LearnerState(model=cfg.model, solver=cfg.solver, train=cfg.train, parallelism="ddp",
                         device=device)
    prompts = PromptStream(training_prompt_records(cfg.data), prompts_per_step=cfg.dmd.prompts_per_step,
                           seed=cfg.train.seed)
    it = ColdStartIteration(state=state, sampling=cfg.sampling, dmd=cfg.dmd, ac_dmd=cfg.ac_dmd,
                            train=cfg.train, prompts=prompts, resolution_px=cfg.model.resolution_px)
    t = time.perf_counter()
    m: dict[str, float] = {}
    for i in range(cfg.dmd.fake_update_ratio):  # the last one also updates the generator
        m = it.run(i)
    m["seconds"] = time.perf_counter() - t
    return m


def _rl_epoch(cfg: Any, device: str, batch: Any, scores: Any) -> dict[str, float]:
    from rtdmd_ray.stages.rl_state import RLLearnerState
    from rtdmd_ray.stages.rl_step import RLUpdate, bp_scorer_fn, learner_sigmas

    state = RLLearnerState(model=cfg.model, solver=cfg.solver, train=cfg.train, parallelism="ddp",
                           device=device)
    rl = RLUpdate(state=state, grpo=cfg.grpo, last_step_loss=cfg.last_step_loss, sampling=cfg.sampling,
                  dmd=cfg.dmd, ac_dmd=cfg.ac_dmd, train=cfg.train, rewards=cfg.rewards,
                  micro_batches_per_epoch=cfg.micro_batches_per_rank_per_epoch,
                  micro_batches_per_step=cfg.micro_batches_per_optimizer_step,
                  sigmas=learner_sigmas(state, cfg.model, cfg.sampling),
                  bp_scorer=bp_scorer_fn(cfg.last_step_loss, cfg.rewards, device))
    t = time.perf_counter()
    m = rl.run_epoch(batch, scores, 0, max_policy_lag=0)
    m["seconds"] = time.perf_counter() - t
    return m


def _compare(cpu: dict[str, float], dev: dict[str, float], keys: Sequence[str],
             rtol: float) -> dict[str, Any]:
    rows = {}
    for k in keys:
        a, b = dev.get(k, math.nan), cpu.get(k, math.nan)
        rel = abs(a - b) / max(abs(b), 1e-12)
        rows[k] = {"device": a, "cpu": b, "rel_err": rel, "ok": math.isfinite(a) and rel <= rtol}
    return {"values": rows, "ok": all(r["ok"] for r in rows.values()),
            "seconds": {"device": dev.get("seconds"), "cpu": cpu.get("seconds")}}


def check_shapes_stages(device: torch.device, tiny: bool, rtol: float) -> dict[str, Any]:
    from rtdmd_ray.data.prompts import training_prompt_records
    from rtdmd_ray.models.lora import load_lora_state
    from rtdmd_ray.roles.reward_pool import RewardWorker
    from rtdmd_ray.roles.sampler import RolloutWorker, epoch_prompt_jobs, epoch_train_steps
    from rtdmd_ray.types import RolloutBatch, ScoredBatch

    out: dict[str, Any] = {}
    cfg = _shapes_cfg("cold_start", tiny)
    cpu, dev = _cold_start_iteration(cfg, "cpu"), _cold_start_iteration(cfg, str(device))
    out["cold_start"] = _compare(cpu, dev, ["learner/fake/loss_ac", "learner/generator/loss_dmd",
                                            "learner/generator/grad_norm"], rtol)

    cfg = _shapes_cfg("rtdmd", tiny)
    sampler = RolloutWorker(model=cfg.model, sampling=cfg.sampling, grpo=cfg.grpo, train=cfg.train,
                            sampler_id=0)
    probe = RLUpdate_state_lora(cfg)
    load_lora_state(sampler.backbone.transformer, "generator", probe)
    sampler.version = 0
    steps = epoch_train_steps(cfg.grpo, cfg.train.seed, 0)
    jobs = epoch_prompt_jobs(training_prompt_records(cfg.data), grpo=cfg.grpo, seed=cfg.train.seed, epoch=0,
                             num_samplers=1, policy_version=0)
    outs = [sampler.sample(j.prompts, steps) for j in jobs]
    scorer = RewardWorker(rewards=cfg.rewards, worker_id=0)
    batch = RolloutBatch.cat([o[0] for o in outs])
    scores = ScoredBatch.cat([scorer.score(o[1]) for o in outs])
    cpu, dev = _rl_epoch(cfg, "cpu", batch, scores), _rl_epoch(cfg, str(device), batch, scores)
    out["rl_update"] = _compare(cpu, dev, ["learner/ppo/loss", "learner/aux/dmd_loss", "learner/fake/loss_ac",
                                           "learner/bp/reward", "learner/grad_norm/subgrpo",
                                           "learner/grad_norm/aux_dmd"], rtol)
    out["rl_update"]["sampler_device"] = str(sampler.device)
    out["ok"] = out["cold_start"]["ok"] and out["rl_update"]["ok"]
    return out


def RLUpdate_state_lora(cfg: Any) -> dict[str, torch.Tensor]:  # noqa: N802 - reads as the thing it returns
    """The learner's starting generator LoRA (what weight sync sends as version 0)."""
    from rtdmd_ray.stages.rl_state import RLLearnerState

    state = RLLearnerState(model=cfg.model, solver=cfg.solver, train=cfg.train, parallelism="ddp")
    return state.full_lora("generator")


# ------------------------------------------------------------------------------------------------ bench
def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "bench_gpu.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_bench(device: torch.device, tiny: bool) -> dict[str, Any]:
    bench = _load_bench()
    out: dict[str, Any] = {}
    sizes = (64,) if tiny else (512, 1024)
    for px in sizes:
        for gc in (False, True):
            argv = ["--device", str(device), "--resolution", str(px)]
            argv += ["--tiny", "--runs", "1", "--warmup", "1", "--peak-tflops", "1"] if tiny else []
            argv += ["--batch", "4"] if px >= 1024 and not tiny else []
            argv += ["--gradient-checkpointing"] if gc else []
            name = f"{px}px_gc_{'on' if gc else 'off'}"
            print(f"== bench {name}: bench_gpu.py {' '.join(argv)}", flush=True)
            try:
                out[name] = bench.main(argv)
            except Exception as e:  # e.g. out of memory at one size: record it, measure the rest
                out[name] = {"error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ main
def environment(device: torch.device) -> dict[str, Any]:
    import importlib.metadata as md

    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                           "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    for pkg in ("diffusers", "transformers", "peft", "safetensors", "numpy"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (CPU dry run)")
    ap.add_argument("--stage-rtol", type=float, default=1e-3,
                    help="device vs CPU tolerance of the ShapeWorld stage losses (fp32, TF32 off)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["numerics", "shapes_stages", "bench"])
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"environment": environment(device), "tiny": args.tiny}
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "numerics": lambda: check_numerics(device),
        "shapes_stages": lambda: check_shapes_stages(device, args.tiny, args.stage_rtol),
        "bench": lambda: run_bench(device, args.tiny),
    }
    for name, fn in parts.items():
        if name in args.skip:
            continue
        t = time.perf_counter()
        print(f"==== {name}", flush=True)
        try:
            result[name] = fn()
        except Exception as e:
            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        result[name]["wall_s"] = round(time.perf_counter() - t, 1)
        (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
        print(json.dumps({name: result[name]}, indent=2, default=str), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

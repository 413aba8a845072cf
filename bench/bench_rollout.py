"""4-step CPS rollout with log-probs (our backbone interface + ``algorithms.cps``) versus the plain diffusers
denoising loop (4-step ``FlowMatchEulerDiscreteScheduler``, transformer called the way the pipelines call it),
on the same tiny model, batch and seed. Prints the wall-time ratio (median of ``--runs``); goal <= 1.10.

Both loops take the same precomputed prompt embeddings and initial noise and time only the 4 denoising steps
(text encoding and VAE decode are identical work on both sides and are reported separately).

    source scripts/env.sh && nice -n 15 .venv/bin/python bench/bench_rollout.py --family sd3 --batch 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from rtdmd_ray.algorithms.cps import cps_step
from rtdmd_ray.algorithms.schedules import flux1_mu, flux2_mu
from rtdmd_ray.models.base import Conditioning
from rtdmd_ray.models.flux1 import latent_image_ids, pack_latents
from rtdmd_ray.models.flux2 import flatten_latents, latent_ids, text_ids
from rtdmd_ray.models.tiny import TINY_RESOLUTION, tiny_backbone

STEPS = (1000, 750, 500, 250)


@torch.no_grad()
def ours(bb, cond: Conditioning, x: torch.Tensor, sigmas: list[float], eta: float, gen: torch.Generator):
    """The rollout role's loop: velocity -> CPS step with log-prob, storing latents and log-probs."""
    b = x.shape[0]
    latents, log_probs = [], []
    for i in range(len(sigmas) - 1):
        v = bb.velocity(x, torch.full((b,), sigmas[i]), cond)
        step = cps_step(x, v, sigmas[i], sigmas[i + 1], eta, generator=gen)
        latents.append(x)
        log_probs.append(step.log_prob)
        x = step.sample
    return x, torch.stack(latents, 1), torch.stack(log_probs, 1)


@torch.no_grad()
def plain_diffusers(bb, cond: Conditioning, x: torch.Tensor, sigmas: list[float]):
    """The diffusers pipelines' denoising loop: latents packed once, ``scheduler.step`` (Euler) per step."""
    sched = copy.deepcopy(bb.scheduler)
    # as the pipelines do: raw sigmas (+ mu for the dynamic shift); the scheduler shifts them itself
    raw = [t / 1000 for t in STEPS]
    b, _, h, w = x.shape
    mu = None
    if bb.family == "flux1":
        mu = flux1_mu(bb.image_seq_len(TINY_RESOLUTION))
    elif bb.family == "flux2":
        mu = flux2_mu(bb.image_seq_len(TINY_RESOLUTION), len(STEPS))
    sched.set_timesteps(sigmas=raw, mu=mu)
    assert torch.allclose(sched.sigmas, torch.tensor(sigmas), atol=1e-5), (sched.sigmas, sigmas)
    t_model = bb.transformer
    emb = cond.tensors["prompt_embeds"]
    if bb.family == "sd3":
        lat = x
    elif bb.family == "flux1":
        lat, img_ids = pack_latents(x), latent_image_ids(h, w)
        txt = torch.zeros(emb.shape[1], 3)
        guidance = torch.full((b,), 1.0) if bb.guidance_embeds else None
    else:
        lat, img_ids, txt = flatten_latents(x), latent_ids(h, w), text_ids(emb.shape[1])
    for t in sched.timesteps:
        tb = t.expand(b)
        if bb.family == "sd3":
            pred = t_model(
                hidden_states=lat,
                timestep=tb,
                encoder_hidden_states=emb,
                pooled_projections=cond.tensors["pooled"],
                return_dict=False,
            )[0]
        elif bb.family == "flux1":
            pred = t_model(
                hidden_states=lat,
                timestep=tb / 1000,
                guidance=guidance,
                pooled_projections=cond.tensors["pooled"],
                encoder_hidden_states=emb,
                txt_ids=txt,
                img_ids=img_ids,
                return_dict=False,
            )[0]
        else:
            pred = t_model(
                hidden_states=lat,
                timestep=tb / 1000,
                guidance=None,
                encoder_hidden_states=emb,
                txt_ids=txt,
                img_ids=img_ids,
                return_dict=False,
            )[0][:, : h * w]
        lat = sched.step(pred, t, lat, return_dict=False)[0]
    return lat


def bench(family: str, batch: int, runs: int, eta: float, seed: int) -> float:
    bb = tiny_backbone(family, seed=seed)
    prompts = [f"prompt number {i}: a red cube left of a blue ball" for i in range(batch)]
    t0 = time.perf_counter()
    cond = bb.encode_prompts(prompts)
    t_encode = time.perf_counter() - t0
    sigmas = bb.sigma_schedule(STEPS, TINY_RESOLUTION)
    x0 = bb.randn_latents(batch, TINY_RESOLUTION, torch.Generator().manual_seed(seed))
    # warm-up both paths (first-call allocations, lazy imports)
    ours(bb, cond, x0, sigmas, eta, torch.Generator().manual_seed(seed))
    plain_diffusers(bb, cond, x0, sigmas)
    t_ours, t_plain, c_ours, c_plain = [], [], [], []
    for r in range(runs):
        # alternate the order so drift in machine load hits both sides alike
        for which in (0, 1) if r % 2 == 0 else (1, 0):
            t0, c0 = time.perf_counter(), time.process_time()
            if which == 0:
                final, _, logp = ours(bb, cond, x0, sigmas, eta, torch.Generator().manual_seed(seed))
                t_ours.append(time.perf_counter() - t0)
                c_ours.append(time.process_time() - c0)
            else:
                plain_diffusers(bb, cond, x0, sigmas)
                t_plain.append(time.perf_counter() - t0)
                c_plain.append(time.process_time() - c0)
    t0 = time.perf_counter()
    with torch.no_grad():
        images = bb.decode(final)
    t_decode = time.perf_counter() - t0
    assert logp.shape == (batch, len(STEPS)) and images.shape[0] == batch
    med_ours, med_plain = statistics.median(t_ours), statistics.median(t_plain)
    ratio = med_ours / med_plain
    # CPU time is the steadier number on a shared machine (wall time includes waiting for a core)
    cpu_ours, cpu_plain = statistics.median(c_ours), statistics.median(c_plain)
    cpu_ratio = cpu_ours / cpu_plain
    print(
        f"{family:6s} batch={batch} runs={runs} | wall: CPS+logp {med_ours * 1e3:7.1f} ms, diffusers Euler "
        f"{med_plain * 1e3:7.1f} ms, ratio {ratio:.3f} | cpu: {cpu_ours * 1e3:6.1f} ms vs "
        f"{cpu_plain * 1e3:6.1f} ms, ratio {cpu_ratio:.3f} | goal <= 1.10 | encode {t_encode * 1e3:.0f} ms, "
        f"decode {t_decode * 1e3:.0f} ms (wall)"
    )
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["sd3", "flux1", "flux2", "all"], default="all")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--eta", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    families = ["sd3", "flux1", "flux2"] if args.family == "all" else [args.family]
    for fam in families:
        bench(fam, args.batch, max(args.runs, 5), args.eta, args.seed)


if __name__ == "__main__":
    main()

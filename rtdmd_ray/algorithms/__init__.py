"""The RTDMD math core: pure torch functions, no Ray, no models, no rewards (spec algorithms.md §1-§3).

Modules: ``schedules`` (sigma schedules, training table, index samplers, LR warm-up), ``cps`` (CPS / Euler /
SDE steps with log-probs), ``acdmd`` (sub-interval renoising, fake-score and consistency losses), ``dmd``
(the normalised DMD loss), ``grpo`` (K-repeat draws, step selection, shared noise, advantages, filter, PPO),
``bp`` (reward hinge) and ``ema`` (fp32 shadow EMA).

Layer 0 (the ground floor): imports nothing of ``rtdmd_ray`` outside this folder, and no Ray.
"""

from rtdmd_ray.algorithms import acdmd, bp, cps, dmd, ema, grpo, schedules

__all__ = ["acdmd", "bp", "cps", "dmd", "ema", "grpo", "schedules"]

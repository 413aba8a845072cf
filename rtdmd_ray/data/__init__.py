"""Prompts for both stages, the eval and the benchmarks: prompt files and records, the training pool with
tag balancing, the cold-start prompt stream (``prompts``) and the eval prompt sets (``prompt_sets``).

Layer 3: may import ``config``, ``shapes`` and ``rewards`` (reward names decide eval datasets); never a stage,
role, driver or Ray.
"""

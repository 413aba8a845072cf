"""One rank's work on a batch, Ray-free and distributed-aware: the per-rank state (``learner_state``), the
cold-start iteration (``cold_start_step``), the RL adapter stack and update (``rl_state``, ``rl_step``), the
in-run validation (``validation``) and image generation for eval and ``rtdmd-ray sample`` (``inference``).

Layer 4: may import ``algorithms``, ``models``, ``rewards``, ``config``, ``types``, ``data`` and ``runs``;
never a role, driver or Ray (torch.distributed is fine: the roles set up the process group).
"""

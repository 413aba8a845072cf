"""The Ray actors and their driver-side groups, one file per role: the sampler (``sampler``), the reward pool
(``reward_pool``), the learner ranks of both stages (``learner``), the eval worker (``eval_worker``),
placement and actor groups (``groups``) and the weight broadcast (``weight_sync``).

Layer 5: may import every layer below (``stages`` and down); never ``eval``, a driver or the CLI.
"""

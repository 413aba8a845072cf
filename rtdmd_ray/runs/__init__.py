"""A run's directory: checkpoints and resume (``checkpoint``), the metrics logger (``logger``: stdout,
``metrics.jsonl``, wandb) and the Ray metrics exported to the dashboard (``metrics``).

Layer 3: may import ``config`` (and Ray's metrics API, lazily); never a stage, role or driver.
"""

"""The driver's metrics on the Ray dashboard (Prometheus) via ``ray.util.metrics`` (``logging.ray_metrics``).

One source of truth: the driver's per-epoch metric dict (what ``runs.logger.MetricsLogger`` writes to
stdout, jsonl and wandb) is mapped key by key onto Prometheus gauges, so a dashboard series and a jsonl column
are always the same number. ``prometheus_series`` is the mapping:

* ``a/b/c`` -> ``rtdmd_a_b_c{role=<role of a>}`` (``timing/update_s`` -> ``rtdmd_timing_update_s``);
* ``reward/<name>/<stat>`` -> ``rtdmd_reward_<stat>{reward="<name>"}`` (``reward/total/quarantined`` ->
  ``rtdmd_reward_quarantined{reward="total"}``); ``reward/pool/...`` is the pool, not a reward name;
* a ``<word>_<index>`` segment -> ``<word>`` plus a ``worker="<index>"`` tag
  (``rollout/sampler_1/images_per_s`` -> ``rtdmd_rollout_sampler_images_per_s{role="sampler", worker="1"}``).

Every series also carries ``run`` (``logging.run_name`` or the output directory's name), so several jobs on
one cluster stay apart. Values are recorded once per epoch from the driver (a Ray core worker; its metrics
are exported through the node's metrics agent every ``RAY_metrics_report_interval_ms``, 10 s by default;
Prometheus shows them with Ray's ``ray_`` prefix). Per-actor numbers (sampler call seconds, reward-worker
busy time) are measured where they live and reach the driver with the epoch's results: one recording site
and one name per value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

PREFIX = "rtdmd"
_ROLE_OF_NAMESPACE = {
    "rollout": "sampler",
    "reward": "reward",
    "learner": "learner",
    "sync": "sync",
    "timing": "driver",
    "eval": "eval",
}
_INDEXED = re.compile(r"^([a-z][a-z0-9]*)_(\d+)$")
_BAD = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_series(key: str) -> tuple[str, dict[str, str]]:
    """``(metric name, tags)`` of one driver metric key (module docstring); tags exclude ``run``."""
    parts = key.split("/")
    tags = {"role": _ROLE_OF_NAMESPACE.get(parts[0], parts[0])}
    if parts[0] == "reward" and len(parts) == 3 and parts[1] != "pool":
        tags["reward"] = parts[1]
        parts = [parts[0], parts[2]]
    elif parts[0] == "reward" and len(parts) == 4 and parts[1] == "serve":  # reward/serve/<name>/replicas
        tags["reward"] = parts[2]
        parts = [parts[0], parts[1], parts[3]]
    words = []
    for p in parts:
        m = _INDEXED.match(p)
        if m is not None:
            words.append(m.group(1))
            tags["worker"] = m.group(2)
            tags["role"] = "reward" if m.group(1) == "worker" else m.group(1)
        else:
            words.append(p)
    return _BAD.sub("_", "_".join([PREFIX, *words])), tags


class RayMetrics:
    """Gauges for the driver's metric dicts; a no-op when disabled or when Ray is not initialised.

    Args:
        enabled: ``logging.ray_metrics``.
        run: the ``run`` tag of every series.
    """

    def __init__(self, *, enabled: bool, run: str):
        self.enabled, self.run = enabled, run
        self._gauges: dict[str, tuple[Any, tuple[str, ...]]] = {}

    def record(self, metrics: Mapping[str, float]) -> int:
        """Set one gauge per finite metric; returns how many were recorded."""
        if not self.enabled:
            return 0
        import ray

        if not ray.is_initialized():
            return 0
        from ray.util.metrics import Gauge

        n = 0
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue  # a NaN gauge reads as "no data" on dashboards anyway; the jsonl keeps it
            name, tags = prometheus_series(key)
            tags["run"] = self.run
            keys = tuple(sorted(tags))
            if name not in self._gauges:
                # tag keys are fixed per name (Prometheus needs one label set per series name)
                self._gauges[name] = (Gauge(name, description=f"rtdmd metric {key}", tag_keys=keys), keys)
            gauge, known = self._gauges[name]
            if known != keys:  # two key shapes mapped onto one name: keep the first, never crash a run
                continue
            gauge.set(float(value), tags=tags)
            n += 1
        return n


def idle_fractions(metrics: Mapping[str, float], wall_s: float) -> dict[str, float]:
    """``<prefix>/idle_frac = 1 - <prefix>/busy_s / wall_s`` (in [0, 1]) for every ``.../busy_s`` key, and
    ``learner/idle_frac`` from rank 0's ``timing/learner_update_s``: the share of the epoch a role waited."""
    busy = {k[: -len("/busy_s")]: v for k, v in metrics.items() if k.endswith("/busy_s")}
    if "timing/learner_update_s" in metrics:
        busy["learner"] = metrics["timing/learner_update_s"]
    wall = max(wall_s, 1e-9)
    return {f"{prefix}/idle_frac": min(1.0, max(0.0, 1.0 - b / wall)) for prefix, b in busy.items()}

"""Metrics sinks of the driver: stdout lines, a jsonl file, wandb (offline needs no network), a progress bar.

Keys are namespaced (``learner/...``, ``eval/<reward>/...``, ``timing/<phase>_s``); every record also has
``iteration`` and ``time_s`` (seconds since the logger started).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from rtdmd_ray.config import LoggingConfig

# the few keys shown on the stdout line and the progress bar (everything goes to jsonl / wandb)
_SHORT = {
    "learner/fake/loss": "fake",
    "learner/generator/loss_dmd": "dmd",
    "learner/generator/grad_norm": "g_gn",
    "eval/mean": "eval",
}


_PER_WORKER = re.compile(r"/(sampler|worker|rank)_\d+/")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


class MetricsLogger:
    """Fan metrics out to the enabled sinks.

    Args:
        cfg: the ``logging`` section.
        output_dir: run directory (``metrics.jsonl`` goes there; wandb files under ``wandb/``).
        total_iterations: for the progress bar's ETA.
        start_iteration: where a resumed run starts.
        run_config: the resolved config as a plain dict (recorded by wandb).
        desc: the progress bar's label (the stage).
    """

    def __init__(
        self,
        *,
        cfg: LoggingConfig,
        output_dir: str | Path,
        total_iterations: int,
        start_iteration: int = 0,
        run_config: dict[str, Any] | None = None,
        desc: str = "cold-start",
    ):
        self.cfg = cfg
        self.out = Path(output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.jsonl = (self.out / "metrics.jsonl").open("a") if cfg.jsonl else None
        self.wandb_run = self._start_wandb(run_config) if cfg.wandb != "disabled" else None
        self.bar = None
        if cfg.stdout:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_iterations,
                initial=start_iteration,
                desc=desc,
                unit="it",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )

    def _start_wandb(self, run_config: dict[str, Any] | None) -> Any:
        try:
            import wandb
        except ImportError:
            warnings.warn(
                f"logging.wandb={self.cfg.wandb} but wandb is not installed: pip install wandb, or "
                "set logging.wandb: disabled",
                stacklevel=2,
            )
            return None
        return wandb.init(
            project=self.cfg.project,
            name=self.cfg.run_name or self.out.name,
            tags=list(self.cfg.tags),
            mode=self.cfg.wandb,
            dir=str(self.out),
            config=run_config or {},
            reinit="finish_previous",
        )

    def log(self, iteration: int, metrics: dict[str, float], *, echo: bool = True) -> None:
        """Record ``metrics`` at ``iteration`` in every sink (stdout only when ``echo``)."""
        record = {"iteration": iteration, "time_s": round(time.perf_counter() - self.t0, 3), **metrics}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=iteration)
        if self.cfg.stdout and echo:
            # per-worker keys (``rollout/sampler_0/...``) stay in jsonl / wandb / the dashboard: the line
            # would grow with the cluster
            shown = {
                k: v for k, v in metrics.items() if not k.startswith("timing/") and not _PER_WORKER.search(k)
            }
            line = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
            self.write(f"[{iteration}] {line}")

    def write(self, text: str) -> None:
        """A line on stdout that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        elif self.cfg.stdout:
            print(text, flush=True)

    def advance(self, n: int, metrics: dict[str, float] | None = None) -> None:
        """Move the progress bar by ``n`` iterations and show the latest short metrics."""
        if self.bar is None:
            return
        if metrics:
            self.bar.set_postfix(
                {s: _fmt(metrics[k]) for k, s in _SHORT.items() if k in metrics}, refresh=False
            )
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

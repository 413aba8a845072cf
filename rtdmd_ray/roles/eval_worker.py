"""The eval worker role: ``EvalWorker`` (a Ray actor that loads a row's model, generates PNGs and scores
them) and ``run_queue`` (keeps every worker busy, results handed back as they finish). ``eval/evaluate.py``
drives it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from rtdmd_ray.config import Config, RewardsConfig
from rtdmd_ray.stages.inference import (
    PNG_HASH_KEY,
    PNG_PROMPT_KEY,
    PNG_SEED_KEY,
)

BATCH_TIMEOUT_S = 3600.0




# --------------------------------------------------------------------------------------- the worker
class EvalWorker:
    """A Ray eval worker: loads a row's model (the base once, LoRA stacks merged and undone per row),
    generates PNGs for (prompt, seed) batches, and scores images with the eval rewards (scorers built on
    first use).

    Args:
        threads: torch CPU threads (None: leave torch's default).
    """

    def __init__(self, *, threads: int | None = None) -> None:
        import torch

        from rtdmd_ray.stages.inference import BaseWeights

        if threads:
            torch.set_num_threads(threads)
        self.base = BaseWeights()
        self.pipe: Any = None
        self.row_hash = ""
        self.scorers: dict[tuple[str, str], Any] = {}

    def load(self, row_cfg: Config, row_hash: str) -> dict[str, Any]:
        """Load ``row_cfg``'s model (LoRA stack merged); returns its description."""
        from rtdmd_ray.stages.inference import InferencePipeline

        self.pipe = InferencePipeline.from_config(row_cfg, base=self.base)
        self.row_hash = row_hash
        return self.pipe.describe()

    def generate(self, prompts: list[str], seeds: list[int]) -> tuple[list[bytes], float]:
        """PNG bytes (with prompt / seed / config hash text chunks) for each prompt, and the seconds taken."""
        from rtdmd_ray.stages.inference import encode_png, to_uint8

        if self.pipe is None:
            raise RuntimeError("EvalWorker.generate before load()")
        t0 = time.perf_counter()
        images = to_uint8(self.pipe.generate(prompts, seeds))
        pngs = [
            encode_png(im, {PNG_PROMPT_KEY: p, PNG_SEED_KEY: str(s), PNG_HASH_KEY: self.row_hash})
            for im, p, s in zip(images, prompts, seeds, strict=True)
        ]
        return pngs, time.perf_counter() - t0

    def _scorer(self, name: str, r: RewardsConfig) -> Any:
        """The scorer ``name`` built from the ``rewards`` section ``r`` (cached per name and settings)."""
        key = (name, repr((r.device_for(name), r.ckpt_dir, sorted(dict(r.options.get(name, {})).items()))))
        if key not in self.scorers:
            from rtdmd_ray.rewards import build_scorer

            device = r.device_for(name)
            if device == "auto":
                from rtdmd_ray.stages.inference import default_device

                device = default_device().type
            from rtdmd_ray.roles.judge_serve import scorer_options

            opts = scorer_options(r.options, [name])[name]
            self.scorers[key] = build_scorer(name, ckpt_dir=r.ckpt_dir or None, device=device, **opts)
        return self.scorers[key]

    def prepare(self, rewards: list[str], rewards_cfg: RewardsConfig) -> list[str]:
        """Build the scorers up front, so a missing reward model fails before any image is generated."""
        for name in rewards:
            self._scorer(name, rewards_cfg)
        return list(rewards)

    def score(
        self,
        pngs: list[bytes],
        prompts: list[str],
        metadata: list[dict[str, Any]],
        rewards: list[str],
        rewards_cfg: RewardsConfig,
    ) -> tuple[dict[str, dict[str, list[float]]], float]:
        """``{reward: {key: [B] floats}}`` for the decoded PNGs, and the seconds taken.

        ``rewards_cfg`` (the config's ``rewards`` section) sets each scorer's device, checkpoint root, options
        and images per call."""
        import io

        from PIL import Image

        from rtdmd_ray.rewards._common import chunks
        from rtdmd_ray.stages.inference import from_uint8

        t0 = time.perf_counter()
        arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in pngs]
        images = from_uint8(arrays)
        out: dict[str, dict[str, list[float]]] = {}
        for name in rewards:
            scorer = self._scorer(name, rewards_cfg)
            parts: dict[str, list[float]] = {}
            for sl in chunks(len(prompts), rewards_cfg.batch_images.get(name)):
                res = scorer(images[sl], prompts[sl], metadata[sl])
                if name not in res:
                    raise KeyError(f"scorer {name!r} returned keys {sorted(res)} without its own name")
                for k, v in res.items():
                    parts.setdefault(k, []).extend(
                        float(x) for x in np.asarray(v, dtype=np.float64).reshape(-1)
                    )
            out[name] = parts
        return out, time.perf_counter() - t0


# --------------------------------------------------------------------------------------- scheduling
def run_queue(
    workers: Sequence[Any],
    jobs: Iterable[Any],
    submit: Callable[[Any, Any], Any],
    on_result: Callable[[Any, Any], None],
    *,
    what: str,
    in_flight_per_worker: int = 2,
    timeout_s: float = BATCH_TIMEOUT_S,
) -> None:
    """Give each free worker the next job (``submit(worker, job) -> ObjectRef``) and hand every result to
    ``on_result(job, result)`` as it arrives. Two jobs per worker are in flight, so none waits for the
    driver."""
    import ray

    it = iter(jobs)
    pending: dict[Any, tuple[Any, Any]] = {}

    def push(w: Any) -> None:
        job = next(it, None)
        if job is not None:
            pending[submit(w, job)] = (w, job)

    for _ in range(in_flight_per_worker):
        for w in workers:
            push(w)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout_s)
        if not done:
            raise TimeoutError(
                f"{what}: no batch finished within {timeout_s:.0f} s ({len(pending)} in flight); "
                "check the eval workers' logs"
            )
        w, job = pending.pop(done[0])
        on_result(job, ray.get(done[0]))
        push(w)

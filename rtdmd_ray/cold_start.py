"""Stage 1 driver, AC-DMD cold start: ``rtdmd-ray cold-start CONFIG``, read top to bottom.

validate the config → start the learner ranks (``roles/learner.LearnerGroup``) → resume → loop over chunks of
iterations (each rank runs ``stages/cold_start_step.ColdStartIteration``) → log → eval (``stages/validation``)
→ checkpoint (``runs/checkpoint``) → export the final generator LoRA. The RL stage's peer is ``driver.py``.
"""

from __future__ import annotations

from typing import Any

from rtdmd_ray.config import Config, ConfigError, to_dict
from rtdmd_ray.roles.groups import STOP_GRACE_S, init_ray
from rtdmd_ray.roles.learner import LearnerFailure, LearnerGroup
from rtdmd_ray.runs import checkpoint as ckpt


def check_cold_start_config(cfg: Config) -> Config:
    """Validate before any actor starts (the numbers are in the message); returns the config."""
    if cfg.stage != "cold_start":
        raise ConfigError(
            f"stage={cfg.stage!r}: rtdmd-ray cold-start needs stage: cold_start "
            "(set it in the YAML or pass stage=cold_start)"
        )
    cfg.validate()
    return cfg


def _next_boundary(it: int, total: int, *intervals: int) -> int:
    """The smallest iteration > ``it`` that is a multiple of one of ``intervals``, capped at ``total``."""
    nxt = total
    for n in intervals:
        if n > 0:
            nxt = min(nxt, (it // n + 1) * n)
    return nxt


def run_cold_start(cfg: Config, *, ray_address: str | None = None) -> dict[str, Any]:
    """Stage 1 end to end: validate, start the learner group, resume, train, eval, checkpoint, export.

    Args:
        cfg: a ``stage: cold_start`` config.
        ray_address: Ray cluster to join when Ray is not initialised yet (default ``$RAY_ADDRESS``, else a
            private local cluster sized to this machine).

    Returns:
        ``{"output_dir", "iteration", "checkpoint", "final_lora", "metrics": last training metrics,
        "eval": last eval metrics}``.
    """
    from rtdmd_ray.runs.logger import MetricsLogger

    check_cold_start_config(cfg)
    t = cfg.train
    out, resume_from = ckpt.prepare_run_dir(cfg)
    init_ray(ray_address, cfg.resources.learner.count * cfg.resources.learner.cpus_per_actor)

    logger = None
    grace_s = 0.0  # a failure kills the ranks at once (one may be stuck in a collective)
    group = LearnerGroup(cfg)
    try:
        start = group.load_checkpoint(str(resume_from)) if resume_from else 0
        logger = MetricsLogger(
            cfg=cfg.logging,
            output_dir=out,
            total_iterations=t.iterations,
            start_iteration=start,
            run_config=to_dict(cfg),
        )
        logger.write(f"cold-start: {cfg.summary()}")
        logger.write(
            f"learner: {group.info} ({'resumed from ' + str(resume_from) if resume_from else 'fresh'})"
        )
        it, last_metrics, last_eval, last_ckpt = start, {}, {}, None
        eval_every = cfg.eval.every_iterations if cfg.eval.enabled else 0
        evaluated_at = -1
        while True:
            if eval_every and it % eval_every == 0 and evaluated_at != it:
                last_eval = group.evaluate(str(out / "eval" / f"iteration_{it:08d}.png"))
                evaluated_at = it
                logger.log(it, last_eval)
            if it >= t.iterations:
                break
            stop = _next_boundary(
                it, t.iterations, t.log_every_iterations, t.save_every_iterations, eval_every
            )
            chunk = group.run_cold_start(it, stop - it)
            for j, m in enumerate(chunk):
                if (it + j + 1) % t.log_every_iterations == 0 or it + j + 1 == stop:
                    logger.log(it + j + 1, m, echo=(it + j + 1) % t.log_every_iterations == 0)
            last_metrics = chunk[-1]
            logger.advance(stop - it, last_metrics)
            it = stop
            if it % t.save_every_iterations == 0 or it == t.iterations:
                last_ckpt = group.save_checkpoint(str(out), t.keep_last_checkpoints)
        if eval_every and evaluated_at != it:
            last_eval = group.evaluate(str(out / "eval" / f"iteration_{it:08d}.png"))
            logger.log(it, last_eval)
        if last_ckpt is None and resume_from is not None:
            last_ckpt = str(resume_from)
        final_lora = None
        if last_ckpt is not None:
            final_lora = ckpt.export_final(last_ckpt, out)
            logger.write(f"final generator LoRA ({'EMA' if cfg.train.ema.enabled else 'live'}): {final_lora}")
        grace_s = STOP_GRACE_S  # ended well: the ranks exit on their own, no SIGTERM traceback
        return {
            "output_dir": str(out),
            "iteration": it,
            "checkpoint": last_ckpt,
            "final_lora": str(final_lora) if final_lora else None,
            "metrics": last_metrics,
            "eval": last_eval,
        }
    except LearnerFailure as e:
        if logger is not None:
            logger.write(f"cold-start stopped: {e}")
        raise
    finally:
        if logger is not None:
            logger.close()
        group.shutdown(grace_s)

"""`rtdmd-ray quickstart`: the embedded default, ShapeWorld, end to end on this machine.

Stages, in order (``--stages`` picks a subset):

1. ``validate``: every shipped config under ``configs/`` loads and validates (no Ray, no models).
2. ``cold-start``: a short AC-DMD run from the shipped ShapeWorld teacher on a local Ray learner group
   (``configs/cold_start/shapes.yaml`` with a small ``train.iterations``).
3. ``rl``: a short RTDMD run (samplers, reward pool, learner group, weight sync) starting from the shipped
   AC-DMD LoRA (``configs/rtdmd/shapes.yaml`` with a small ``train.iterations``).
4. ``eval``: the report comparing the shipped models (teacher-50, teacher-4, AC-DMD-4, RTDMD-4) on the same
   test captions and seeds (``configs/inference/shapes.yaml`` with fewer captions), written as HTML.

The short runs show that every role runs here; the shipped weights (made by the full-length commands in the
README) are what the report compares.
"""

from __future__ import annotations

import time
from pathlib import Path

from rtdmd_ray.config import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("validate", "cold-start", "rl", "eval")


def validate_shipped_configs(configs_dir: Path) -> int:
    """Load + validate every runnable YAML under ``configs_dir``; returns how many passed (raises on the first
    failure). Files starting with ``_`` are inheritance bases, not runnable configs."""
    paths = sorted(p for p in configs_dir.rglob("*.yaml") if not p.name.startswith("_"))
    for p in paths:
        try:
            load_config(p, [])
        except ConfigError as e:
            raise SystemExit(f"config error in {p}: {e}") from None
    return len(paths)


def _banner(text: str) -> None:
    print(f"\n==== {text} ====", flush=True)


def run_quickstart(
    out_dir: str = "outputs/quickstart",
    stages: tuple[str, ...] = STAGES,
    cold_start_iterations: int = 20,
    rl_epochs: int = 2,
    eval_prompts: int = 64,
) -> int:
    """Run the selected stages; returns the process exit code."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")
    t0 = time.perf_counter()

    if "validate" in stages:
        _banner("validate every shipped config")
        n = validate_shipped_configs(REPO_ROOT / "configs")
        print(f"ok: {n} configs valid")

    teacher = REPO_ROOT / "rtdmd_ray" / "shapes" / "assets" / "teacher"
    if set(stages) & {"cold-start", "rl", "eval"} and not teacher.exists():
        raise SystemExit(
            f"the ShapeWorld teacher is missing at {teacher}: retrain it with "
            "`rtdmd-ray shapes train-teacher` (see README) or check out the full repository"
        )

    if set(stages) & {"cold-start", "rl", "eval"}:
        import ray

        if not ray.is_initialized():
            # one private local cluster for every stage; logical CPUs are scheduling slots, so the RL topology
            # (learners + sampler + reward workers, 4+ slots) fits on a 2-core machine
            ray.init(address="local", num_cpus=8, include_dashboard=False)

    # RL starts from the shipped AC-DMD LoRA when there is one, else from this run's own cold start
    init_ckpt: Path | None = None
    shipped = REPO_ROOT / "rtdmd_ray" / "shapes" / "assets" / "acdmd"
    if (shipped / "generator_ema.safetensors").exists():
        init_ckpt = shipped

    if "cold-start" in stages:
        from rtdmd_ray.cold_start import run_cold_start

        _banner(f"AC-DMD cold start: {cold_start_iterations} iterations on a local Ray learner group")
        cfg = load_config(
            REPO_ROOT / "configs" / "cold_start" / "shapes.yaml",
            # the in-training eval is off here: the eval stage below makes the report
            [f"train.iterations={cold_start_iterations}", f"train.output_dir={out / 'cold_start'}",
             "eval.enabled=false"],
        )
        res = run_cold_start(cfg)
        print(f"cold start: iteration {res['iteration']}, checkpoint {res['checkpoint']}")
        if init_ckpt is None:
            init_ckpt = Path(res["checkpoint"])

    if "rl" in stages:
        from rtdmd_ray.driver import train

        if init_ckpt is None:
            raise SystemExit(
                "the RL stage starts from an AC-DMD LoRA: none is shipped yet under "
                f"{shipped}; include the cold-start stage (--stages cold-start,rl)"
            )
        _banner(f"RTDMD RL: {rl_epochs} epochs (samplers, reward pool, learner group, weight sync)")
        cfg = load_config(
            REPO_ROOT / "configs" / "rtdmd" / "shapes.yaml",
            [f"train.iterations={rl_epochs}", f"train.output_dir={out / 'rtdmd'}", "eval.enabled=false",
             f"model.generator_lora.load_path={init_ckpt / 'generator_ema.safetensors'}",
             f"model.fake_score_lora.load_path={init_ckpt / 'fake_score.safetensors'}"],
        )
        res = train(cfg)
        print(f"RL: {res['epochs']} epochs, policy version {res['policy_version']}, lora {res['final_lora']}")

    if "eval" in stages:
        from rtdmd_ray.eval.evaluate import run_eval, summary_lines

        _banner(f"eval: shipped ShapeWorld models on {eval_prompts} test captions")
        cfg = load_config(
            REPO_ROOT / "configs" / "inference" / "shapes.yaml",
            [f"eval.num_prompts={eval_prompts}", f"train.output_dir={out / 'eval'}"],
        )
        meta = run_eval(cfg, out_dir=out / "eval")
        for line in summary_lines(meta):
            print(line)
        print(f"report: {out / 'eval' / 'report.html'}")

    print(f"\nquickstart done in {time.perf_counter() - t0:.0f} s; outputs in {out}")
    return 0

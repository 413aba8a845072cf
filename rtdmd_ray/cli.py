"""`rtdmd-ray` command line: each verb parses, validates, then calls one function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument(
        "overrides", nargs="*", help="dot-notation overrides, e.g. train.seed=3 rewards.weights.clipscore=1.0"
    )


def _load(args: argparse.Namespace):
    from rtdmd_ray.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_stage(args: argparse.Namespace, run: Callable[[Any], dict[str, Any]],
               done: Callable[[dict[str, Any]], str]) -> int:
    """Run a training stage on the loaded config and print ``done(result)``. A dead learner rank exits 3 and a
    config error (e.g. resuming a checkpoint of a different base) exits 2, with one line and no traceback."""
    from rtdmd_ray.config import ConfigError
    from rtdmd_ray.roles.judge_serve import JudgeAppMissing
    from rtdmd_ray.roles.learner import LearnerFailure
    from rtdmd_ray.roles.reward_serve import RewardLoadError

    try:
        result = run(_load(args))
    except LearnerFailure as e:  # a dead rank: the message says how to resume; no traceback
        print(f"{args.verb}: {e}", file=sys.stderr)
        return 3
    except (ConfigError, RewardLoadError, JudgeAppMissing) as e:  # e.g. a base mismatch, a reward that
        print(f"{args.verb}: {e}", file=sys.stderr)  # fails to load: the line names it and the fix
        return 2
    print(done(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `shapes` owns its own sub-verbs (train-teacher, train-clip, eval, ...)
    if argv and argv[0] == "shapes":
        return shapes_main(argv[1:])

    parser = argparse.ArgumentParser(prog="rtdmd-ray", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    _add_config_args(sub.add_parser("validate", help="load + validate a config; exit 0 if valid"))
    _add_config_args(sub.add_parser("print-config", help="print the fully resolved config as YAML"))
    _add_config_args(sub.add_parser("train", help="the RTDMD RL stage (stage: rtdmd) on a Ray cluster"))
    _add_config_args(sub.add_parser(
        "cold-start", help="Stage 1: AC-DMD distillation on a Ray learner group (resume: auto resumes)"))
    sub.add_parser("shapes", help="ShapeWorld: train-teacher, train-clip, eval, ... (`rtdmd-ray shapes -h`)")
    qs = sub.add_parser("quickstart", help="the embedded default: ShapeWorld end to end on this machine")
    qs.add_argument("--out", default="outputs/quickstart")
    qs.add_argument("--stages", default="validate,cold-start,rl,eval",
                    help="comma-separated subset of validate,cold-start,rl,eval")
    qs.add_argument("--cold-start-iterations", type=int, default=20)
    qs.add_argument("--rl-epochs", type=int, default=2)
    qs.add_argument("--eval-prompts", type=int, default=64)
    sp = sub.add_parser("sample", help="write PNGs for --prompt with the config's model, sampler, LoRA stack")
    _add_config_args(sp)
    sp.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    sp.add_argument("--lora", action="append", default=None,
                    help="LoRA file/dir merged in order (repeatable); replaces inference.lora_paths; "
                         "'--lora none' samples the base model")
    sp.add_argument("--seed", type=int, default=None, help="base seed (default eval.seed)")
    sp.add_argument("--images-per-prompt", type=int, default=1)
    sp.add_argument("--out", default=None, help="output dir (default <train.output_dir>/samples)")
    ev = sub.add_parser("eval", help="generate + score the eval prompt sets on Ray eval workers; "
                                     "writes metadata.json and report.html")
    _add_config_args(ev)
    ev.add_argument("--out", default=None, help="output dir (default train.output_dir)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.add_argument("--prompt", action="append", default=None, help=argparse.SUPPRESS)
    sr = sub.add_parser("serve-rewards", help="start the config's reward deployments as a named, long-lived "
                                              "Serve app that runs and evals attach to (rewards.serve_app)")
    _add_config_args(sr)
    sr.add_argument("--address", default=None,
                    help="the Ray cluster (default $RAY_ADDRESS, else auto: the cluster of this node)")
    sr.add_argument("--delete", action="store_true", help="delete the application (and its judge app)")
    pl = sub.add_parser("plot", help="reward curves (PNG, one per reward) from an RL run's metrics.jsonl")
    pl.add_argument("run_dir", help="the run's train.output_dir")
    pl.add_argument("--out", default=None, help="output dir (default <run_dir>/plots)")
    pl.add_argument("--window", type=int, default=10, help="moving-average window in epochs")
    # overrides may also follow the flags (`sample CFG --prompt x eval.mode=teacher`)
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides_only = all("=" in a and not a.startswith("-") for a in extra)
        if getattr(args, "verb", None) in ("sample", "eval") and overrides_only:
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.verb == "validate":
        cfg = _load(args)
        print(f"ok: {args.config} ({cfg.summary()})")
        return 0
    if args.verb == "print-config":
        from rtdmd_ray.config import dump_yaml

        print(dump_yaml(_load(args)), end="")
        return 0
    if args.verb == "cold-start":
        from rtdmd_ray.cold_start import run_cold_start

        return _run_stage(args, run_cold_start, lambda r: (
            f"cold-start: iteration {r['iteration']}, checkpoint {r['checkpoint']}, "
            f"generator LoRA {r['final_lora']}"))
    if args.verb == "train":
        from rtdmd_ray.driver import train

        return _run_stage(args, train, lambda r: (
            f"done: {r['epochs']} epochs, policy version {r['policy_version']}, {r['output_dir']}"))
    if args.verb == "quickstart":
        from rtdmd_ray.quickstart import run_quickstart

        return run_quickstart(
            out_dir=args.out, stages=tuple(s for s in args.stages.split(",") if s),
            cold_start_iterations=args.cold_start_iterations, rl_epochs=args.rl_epochs,
            eval_prompts=args.eval_prompts,
        )
    if args.verb == "sample":
        from rtdmd_ray.config import resolve_path
        from rtdmd_ray.stages.inference import sample_to_dir

        cfg = _load(args)
        loras = None if args.lora is None else [p for p in args.lora if p.lower() != "none"]
        out = args.out or str(resolve_path(cfg.train.output_dir) / "samples")
        try:
            paths = sample_to_dir(cfg, args.prompt, out, lora_paths=loras, seed=args.seed,
                                  images_per_prompt=args.images_per_prompt)
        except FileNotFoundError as e:  # missing weights / LoRA files: the message says which key to fix
            print(f"sample: {e}", file=sys.stderr)
            return 2
        print(f"sample: wrote {len(paths)} image(s) to {out}")
        return 0
    if args.verb == "eval":
        if args.prompt:
            parser.error("eval generates the configured prompt sets (eval.prompt_file / eval.dataset_map / "
                         "data.kind); --prompt is not used there. Use `rtdmd-ray sample CONFIG --prompt ...` "
                         "for your own prompts, or point eval.prompt_file at a file of them")
        from rtdmd_ray.config import ConfigError
        from rtdmd_ray.eval.evaluate import run_eval
        from rtdmd_ray.roles.judge_serve import JudgeAppMissing
        from rtdmd_ray.roles.reward_serve import RewardLoadError

        cfg = _load(args)
        try:
            run_eval(cfg, out_dir=args.out, progress=not args.no_progress)
        except (FileNotFoundError, ConfigError, RewardLoadError, JudgeAppMissing) as e:
            # missing files / bad eval.rows / a reward that fails to load: say which key to fix
            print(f"eval: {e}", file=sys.stderr)
            return 2
        return 0
    if args.verb == "serve-rewards":
        from rtdmd_ray.roles.reward_serve import RewardLoadError, serve_rewards

        cfg = _load(args)
        try:
            out = serve_rewards(cfg, address=args.address, delete=args.delete)
        except (ConnectionError, RewardLoadError) as e:
            print(f"serve-rewards: {e}", file=sys.stderr)
            return 2
        if args.delete:
            print(f"serve-rewards: deleted application {out['app']}")
            return 0
        replicas = ", ".join(f"{k} x{v}" for k, v in out["replicas"].items())
        judge = f"; GenEval2 judge app {out['judge']}" if out["judge"] else ""
        print(f"serve-rewards: application {out['app']} running ({replicas}){judge}. Attach a run or an eval "
              f"with rewards.serve_app={out['app']}; remove it with `rtdmd-ray serve-rewards "
              f"{args.config} --delete`")
        return 0
    if args.verb == "plot":
        from rtdmd_ray.eval.plots import plot_rewards

        try:
            for path in plot_rewards(args.run_dir, args.out, window=args.window):
                print(f"plot: wrote {path}")
        except (FileNotFoundError, ValueError) as e:
            print(f"plot: {e}", file=sys.stderr)
            return 2
        return 0
    parser.error(f"unknown verb {args.verb}")
    return 2


def shapes_main(argv: list[str]) -> int:
    """`rtdmd-ray shapes <verb>`: ShapeWorld data, training of the teacher and tiny CLIP, and evaluation."""
    parser = argparse.ArgumentParser(prog="rtdmd-ray shapes", description=shapes_main.__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train-teacher",
                       help="train the SD3-family ShapeWorld teacher (resumes from <out>/ckpt.pt)")
    p.add_argument("--out", required=True, help="output dir: ckpt.pt, train_log.jsonl, latest/, final/")
    p.add_argument("--minutes", type=float, default=75.0,
                   help="wall-time budget (calibrated into a step count)")
    p.add_argument("--steps", type=int, default=None,
                   help="fixed step count (bit-reproducible; skips calibration)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)

    p = sub.add_parser("train-clip", help="train the tiny CLIP contrastively on ShapeWorld pairs")
    p.add_argument("--out", required=True, help="output dir (a transformers CLIP dir)")
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)

    p = sub.add_parser("prompts", help="write the train/test prompt sets (GenEval-style jsonl)")
    p.add_argument("--out", required=True, help="output dir: train_metadata.jsonl, test_metadata.jsonl")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("eval", help="results table of the teacher and distilled LoRAs (markdown, grid)")
    p.add_argument("--teacher", default=None, help="teacher dir (default: the shipped assets/teacher)")
    p.add_argument("--clip", default=None, help="tiny CLIP dir (default: the shipped assets/clip)")
    p.add_argument("--out", required=True)
    p.add_argument("--n-captions", type=int, default=1002, help="test captions (balanced over the 6 tags)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: pick on a validation set)")
    p.add_argument("--cfg-max-sigma", type=float, default=None,
                   help="teacher rows: CFG only on steps at sigma <= this (1 = every step; default: picked "
                        "with --cfg on a validation set, or 1 when --cfg is given)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", action="append", default=[], metavar="LABEL=PATH[,PATH...]",
                   help="add the row '<LABEL>, 4 NFE CPS η=0.9': the teacher with these LoRA files merged in "
                        "order (no CFG); repeatable; LABEL has no '='")
    p.add_argument("--no-teacher-rows", action="store_true", help="only the ground-truth and --lora rows")
    p.add_argument("--recompute", action="store_true",
                   help="ignore rows already in <out>/results.json (by default they are reused)")
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="test: held-out captions (the results table); validation: captions of the train "
                        "split, to pick a checkpoint or setting without looking at test")

    args = parser.parse_args(argv)
    if args.verb == "train-teacher":
        from rtdmd_ray.shapes.train_teacher import TeacherTrainConfig, train_teacher

        train_teacher(TeacherTrainConfig(out=args.out, minutes=args.minutes, steps=args.steps, seed=args.seed,
                                         batch_size=args.batch_size, threads=args.threads))
        return 0
    if args.verb == "train-clip":
        from rtdmd_ray.shapes.train_clip import ClipTrainConfig, train_clip

        train_clip(ClipTrainConfig(out=args.out, minutes=args.minutes, steps=args.steps, seed=args.seed,
                                   threads=args.threads))
        return 0
    if args.verb == "prompts":
        from pathlib import Path

        from rtdmd_ray.shapes.prompts import split_prompts, write_jsonl

        train, test = split_prompts(args.seed)
        write_jsonl(train, Path(args.out) / "train_metadata.jsonl")
        write_jsonl(test, Path(args.out) / "test_metadata.jsonl")
        print(f"wrote {len(train)} train and {len(test)} test prompts to {args.out}")
        return 0
    if args.verb == "eval":
        from rtdmd_ray.eval.shapes import run_eval

        lora_rows: dict[str, list[str]] = {}
        for spec in args.lora:
            label, sep, paths = spec.partition("=")
            if not sep or not label or not paths:
                parser.error(f"--lora {spec!r}: expected LABEL=PATH[,PATH...], e.g. "
                             "--lora AC-DMD=rtdmd_ray/shapes/assets/acdmd/generator_ema.safetensors")
            lora_rows[label] = paths.split(",")
        try:
            run_eval(teacher_dir=args.teacher, clip_dir=args.clip, out_dir=args.out,
                     n_captions=args.n_captions, cfg_scale=args.cfg,
                     cfg_max_sigma=args.cfg_max_sigma, threads=args.threads, seed=args.seed,
                     lora_rows=lora_rows,
                     teacher_rows=not args.no_teacher_rows, recompute=args.recompute,
                     split=args.split)
        except FileNotFoundError as e:
            import sys

            print(f"shapes eval: {e}", file=sys.stderr)
            return 2
        return 0
    parser.error(f"unknown verb {args.verb}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""`rtdmd-ray` command line: each verb parses, validates, then calls one function."""

from __future__ import annotations

import argparse
import sys


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `shapes` owns its own sub-verbs (train-teacher, train-clip, eval, ...)
    if argv and argv[0] == "shapes":
        from rtdmd_ray.shapes.cli import main as shapes_main

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
        from rtdmd_ray.config import ConfigError
        from rtdmd_ray.learner import LearnerFailure, run_cold_start

        try:
            result = run_cold_start(_load(args))
        except LearnerFailure as e:  # a dead rank: the message says how to resume; no traceback
            print(f"cold-start: {e}", file=sys.stderr)
            return 3
        except ConfigError as e:  # e.g. resuming a checkpoint of a different base
            print(f"cold-start: {e}", file=sys.stderr)
            return 2
        print(f"cold-start: iteration {result['iteration']}, checkpoint {result['checkpoint']}, "
              f"generator LoRA {result['final_lora']}")
        return 0
    if args.verb == "train":
        from rtdmd_ray.config import ConfigError
        from rtdmd_ray.driver import train
        from rtdmd_ray.learner import LearnerFailure

        try:
            result = train(_load(args))
        except LearnerFailure as e:  # a dead rank: the message says how to resume; no traceback
            print(f"train: {e}", file=sys.stderr)
            return 3
        except ConfigError as e:  # e.g. resuming a checkpoint of a different base
            print(f"train: {e}", file=sys.stderr)
            return 2
        print(f"done: {result['epochs']} epochs, policy version {result['policy_version']}, "
              f"{result['output_dir']}")
        return 0
    if args.verb == "quickstart":
        from rtdmd_ray.quickstart import run_quickstart

        return run_quickstart(
            out_dir=args.out, stages=tuple(s for s in args.stages.split(",") if s),
            cold_start_iterations=args.cold_start_iterations, rl_epochs=args.rl_epochs,
            eval_prompts=args.eval_prompts,
        )
    if args.verb == "sample":
        from rtdmd_ray.config import resolve_path
        from rtdmd_ray.inference import sample_to_dir

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
        from rtdmd_ray.evaluate import run_eval

        cfg = _load(args)
        try:
            run_eval(cfg, out_dir=args.out, progress=not args.no_progress)
        except (FileNotFoundError, ConfigError) as e:  # missing files / bad eval.rows: say which key to fix
            print(f"eval: {e}", file=sys.stderr)
            return 2
        return 0
    if args.verb == "plot":
        from rtdmd_ray.plots import plot_rewards

        try:
            for path in plot_rewards(args.run_dir, args.out, window=args.window):
                print(f"plot: wrote {path}")
        except (FileNotFoundError, ValueError) as e:
            print(f"plot: {e}", file=sys.stderr)
            return 2
        return 0
    parser.error(f"unknown verb {args.verb}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""`rtdmd-ray shapes <verb>`: ShapeWorld data, training of the teacher and tiny CLIP, and evaluation."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rtdmd-ray shapes", description=__doc__)
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
        from rtdmd_ray.shapes.evaluate import run_eval

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

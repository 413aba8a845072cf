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
    sub.add_parser("shapes", help="ShapeWorld: train-teacher, train-clip, eval, ... (`rtdmd-ray shapes -h`)")
    qs = sub.add_parser("quickstart", help="the embedded default: ShapeWorld end to end on this machine")
    qs.add_argument("--out", default="outputs/quickstart")
    args = parser.parse_args(argv)

    if args.verb == "validate":
        cfg = _load(args)
        print(f"ok: {args.config} ({cfg.summary()})")
        return 0
    if args.verb == "print-config":
        from rtdmd_ray.config import dump_yaml

        print(dump_yaml(_load(args)), end="")
        return 0
    if args.verb == "quickstart":
        from rtdmd_ray.quickstart import run_quickstart

        return run_quickstart(out_dir=args.out)
    parser.error(f"unknown verb {args.verb}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

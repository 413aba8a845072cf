"""``python -m rtdmd_ray.config reference`` rewrites configs/reference.yaml."""

import sys

from rtdmd_ray.config.schema import _main

raise SystemExit(_main(sys.argv[1:]))

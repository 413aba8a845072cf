"""``python -m rtdmd_ray.config reference`` rewrites configs/reference.yaml (every key, commented)."""

from __future__ import annotations

import sys

from rtdmd_ray.config import REPO_ROOT, reference_yaml


def _main(argv: list[str]) -> int:
    if argv == ["reference"]:
        (REPO_ROOT / "configs" / "reference.yaml").write_text(reference_yaml())
        print("wrote configs/reference.yaml")
        return 0
    print("usage: python -m rtdmd_ray.config reference  (rewrites configs/reference.yaml)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))

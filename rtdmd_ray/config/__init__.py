"""Run configuration (being split into a package; this commit only moves config.py to schema.py)."""

from rtdmd_ray.config.schema import *  # noqa: F403
from rtdmd_ray.config.schema import (  # noqa: F401
    BACKBONE_FAMILY,
    DIFFERENTIABLE_REWARDS,
    KNOWN_REWARDS,
    RAY_BUILTIN_RESOURCES,
    REPO_ROOT,
    RESOLUTION_MULTIPLE_PX,
    __all__,
)

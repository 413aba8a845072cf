"""Typed, frozen run configuration: the schema is a set of frozen pydantic v2 dataclasses, YAML files hold the
values, the command line holds ``key.sub=value`` overrides. An unknown key or a value of the wrong type is a
one-line ``ConfigError`` naming the full key path and the fix (the closest valid key, the expected type),
raised before anything starts; ``Config.validate()`` checks the cross-field arithmetic with the numbers in
the message. Files: fieldtypes.py (field types, ``FrozenDict``, the ``section`` decorator), errors.py
(``ConfigError``, pydantic errors into one-line messages), registries.py (name tables), schema.py (the
sections and ``Config``), rules.py (cross-field checks), loading.py (YAML, ``inherit``, overrides,
``load_config``, ``reference_yaml``), dump.py (``to_dict``, ``dump_yaml``). Layer 0 (a foundation
layer): it imports nothing else from rtdmd_ray (keep it so; `rtdmd-ray validate` must not import torch), and
the rest of the package imports it only through this module. Relative paths in a config are relative to the
repository root (``resolve_path``). Regenerate ``configs/reference.yaml`` with
``python -m rtdmd_ray.config reference``.
"""

from rtdmd_ray.config.dump import dump_yaml, field_docs, to_dict
from rtdmd_ray.config.errors import ConfigError
from rtdmd_ray.config.fieldtypes import FrozenDict
from rtdmd_ray.config.loading import apply_overrides, config_from_dict, load_config, reference_yaml
from rtdmd_ray.config.registries import (
    BACKBONE_FAMILY,
    DEFAULT_LORA_TARGETS,
    DIFFERENTIABLE_REWARDS,
    KNOWN_REWARDS,
    NEEDS_PRETRAINED_PATH,
    RAY_BUILTIN_RESOURCES,
    RESOLUTION_MULTIPLE_PX,
)
from rtdmd_ray.config.schema import (
    REPO_ROOT,
    ACDMDConfig,
    BPConfig,
    Config,
    DataConfig,
    DMDConfig,
    EMAConfig,
    EvalConfig,
    GRPOConfig,
    InferenceConfig,
    LastStepLossConfig,
    LoggingConfig,
    LoRAConfig,
    ModelConfig,
    ResourcesConfig,
    RewardsConfig,
    RoleResourcesConfig,
    SamplingConfig,
    SolverConfig,
    SolversConfig,
    StepSelectionConfig,
    SyncConfig,
    TrainConfig,
    resolve_path,
)

__all__ = [
    "ACDMDConfig", "BACKBONE_FAMILY", "BPConfig", "Config", "ConfigError", "DEFAULT_LORA_TARGETS",
    "DIFFERENTIABLE_REWARDS", "DMDConfig", "DataConfig", "EMAConfig", "EvalConfig", "FrozenDict",
    "GRPOConfig", "InferenceConfig", "KNOWN_REWARDS", "LastStepLossConfig", "LoRAConfig", "LoggingConfig",
    "ModelConfig", "NEEDS_PRETRAINED_PATH", "RAY_BUILTIN_RESOURCES", "REPO_ROOT", "RESOLUTION_MULTIPLE_PX",
    "ResourcesConfig", "RewardsConfig", "RoleResourcesConfig", "SamplingConfig", "SolverConfig",
    "SolversConfig", "StepSelectionConfig", "SyncConfig", "TrainConfig", "apply_overrides",
    "config_from_dict", "dump_yaml", "field_docs", "load_config", "reference_yaml", "resolve_path", "to_dict",
]

"""Typed recipes: one YAML file = one run.

- :mod:`vla_ft.config.schema`: the dataclasses, the single source of truth for every key;
- :mod:`vla_ft.config.loader`: YAML + ``key.sub=value`` overrides -> validated :class:`Recipe`,
  all problems reported at once with "did you mean" hints;
- :mod:`vla_ft.config.checks`: cross-key rules (unknown module names, unfreeze of a module that
  is not frozen, feature-cache refusals, ...);
- :mod:`vla_ft.config.unread_keys`: keys the run would never read (an optimizer's setting under
  another optimizer, a reader's key under another format, a group of a module that never trains);
- :mod:`vla_ft.config.training_checks`: the rules and warnings about how the run trains (step
  schedules, early stopping, warmups), skipped for a checkpoint's recipe read back to evaluate it.
"""

from vla_ft.config.checks import READERS, cache_problems, validate
from vla_ft.config.loader import (
    apply_overrides,
    describe_keys,
    load_recipe,
    read_yaml,
    recipe_from_dict,
    save_recipe,
    to_dict,
)
from vla_ft.config.schema import (
    DATA_SOURCE,
    DATA_SPLIT,
    LOADER_KEYS,
    MODULE_NAMES,
    TRUNK_MODULES,
    AblationConfig,
    ActionLossConfig,
    AugmentConfig,
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EarlyStoppingConfig,
    FreezeConfig,
    GripperLossConfig,
    GroupConfig,
    LanguageConfig,
    LanguageLossConfig,
    LoggingConfig,
    LoraConfig,
    LossConfig,
    MixSourceConfig,
    ModelConfig,
    OptimConfig,
    Recipe,
    RecipeError,
    RolloutConfig,
    ScheduledWeight,
    SyntheticConfig,
    TermWeights,
    TrainConfig,
    UnfreezeConfig,
    VisionConfig,
    doc,
)

__all__ = [
    "READERS",
    "AblationConfig",
    "ActionLossConfig",
    "AugmentConfig",
    "CheckpointConfig",
    "DataConfig",
    "DistributedConfig",
    "EarlyStoppingConfig",
    "FreezeConfig",
    "GripperLossConfig",
    "GroupConfig",
    "LanguageConfig",
    "LanguageLossConfig",
    "LoggingConfig",
    "LoraConfig",
    "LossConfig",
    "MixSourceConfig",
    "DATA_SOURCE",
    "DATA_SPLIT",
    "LOADER_KEYS",
    "MODULE_NAMES",
    "ModelConfig",
    "OptimConfig",
    "Recipe",
    "RecipeError",
    "RolloutConfig",
    "ScheduledWeight",
    "SyntheticConfig",
    "TRUNK_MODULES",
    "TermWeights",
    "TrainConfig",
    "UnfreezeConfig",
    "VisionConfig",
    "apply_overrides",
    "cache_problems",
    "describe_keys",
    "doc",
    "load_recipe",
    "read_yaml",
    "recipe_from_dict",
    "save_recipe",
    "to_dict",
    "validate",
]

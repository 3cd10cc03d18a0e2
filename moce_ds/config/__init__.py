"""Typed, layered configuration (dataclass defaults < YAML files < dotted overrides)."""

from moce_ds.config.loading import (
    LOCKED_ON_RESUME,
    ConfigChange,
    ConfigError,
    config_to_dict,
    diff_configs,
    flatten_keys,
    load_config,
    parse_overrides,
    resume_config,
    save_config,
)
from moce_ds.config.schema import ROUTINGS, Config, DataConfig, ModelConfig, MoEConfig, TrainConfig

__all__ = [
    "Config", "ModelConfig", "MoEConfig", "DataConfig", "TrainConfig", "ROUTINGS",
    "ConfigError", "load_config", "parse_overrides", "config_to_dict", "save_config", "diff_configs", "resume_config",
    "LOCKED_ON_RESUME", "ConfigChange", "flatten_keys",
]

"""Typed, layered configuration (dataclass defaults < YAML files < dotted overrides)."""

from moce_ds.config.loading import ConfigError, config_to_dict, load_config, parse_overrides, save_config
from moce_ds.config.schema import ROUTINGS, Config, DataConfig, ModelConfig, MoEConfig, TrainConfig

__all__ = [
    "Config", "ModelConfig", "MoEConfig", "DataConfig", "TrainConfig", "ROUTINGS",
    "ConfigError", "load_config", "parse_overrides", "config_to_dict", "save_config",
]

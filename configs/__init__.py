"""The ground floor: the configuration schema and loader, the TOML files with every number
of the labels, features, models and serving, and the few shared types every room agrees
on (the project's error type, the typed task/library choices, atomic artifact writes).

Every room (``features``, ``training``, ``serving``) imports this package; it imports none
of them. Nothing here touches the file system on import.
"""

from configs.artifacts import atomic_path, fsync_dir, resolve_as_of, write_atomic
from configs.choices import EVENT_NAMES, PACKAGES, Library, Task
from configs.errors import SendtimeError
from configs.schema import (
    DEFAULT_CONFIG_ENV,
    Config,
    ConfigError,
    DatasetConfig,
    FeatureConfig,
    LabelConfig,
    ModelConfig,
    PlanConfig,
    ServingConfig,
    SimulateConfig,
    SlotConfig,
    TrackingConfig,
    TuningConfig,
    load_config,
)

__all__ = [
    "DEFAULT_CONFIG_ENV",
    "EVENT_NAMES",
    "PACKAGES",
    "Config",
    "ConfigError",
    "DatasetConfig",
    "FeatureConfig",
    "LabelConfig",
    "Library",
    "ModelConfig",
    "PlanConfig",
    "SendtimeError",
    "ServingConfig",
    "SimulateConfig",
    "SlotConfig",
    "Task",
    "TrackingConfig",
    "TuningConfig",
    "atomic_path",
    "fsync_dir",
    "load_config",
    "resolve_as_of",
    "write_atomic",
]

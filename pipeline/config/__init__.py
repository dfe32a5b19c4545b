"""The run configuration, below every component: the sections (:mod:`pipeline.config.sections`)
and the run config that composes, loads, validates and derives them (:mod:`pipeline.config.run`).

Components import from here and receive validated sections; this package imports no component
(a layer rule checked in CI), so no import circle can run through the config.
"""

from pipeline.config.run import (
    CONTENT,
    FREE,
    IDENTITY,
    KEY_CLASSES,
    RESUME_CLASSES,
    SCHEDULE,
    ConfigError,
    Derived,
    RunConfig,
    config_from_dict,
    config_from_saved,
    derive,
    dump_yaml,
    help_text,
    load_config,
    parse_override,
    to_dict,
)
from pipeline.config.sections import (
    CheckpointConfig,
    DataConfig,
    DebugConfig,
    DeepSpeedSection,
    DistillConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    StudentConfig,
    TeacherConfig,
)

__all__ = ["CONTENT", "FREE", "IDENTITY", "KEY_CLASSES", "RESUME_CLASSES", "SCHEDULE", "CheckpointConfig",
           "ConfigError", "DataConfig", "DebugConfig", "DeepSpeedSection", "Derived", "DistillConfig", "EvalConfig",
           "LoggingConfig", "OptimConfig", "RunConfig", "StudentConfig", "TeacherConfig", "config_from_dict",
           "config_from_saved", "derive", "dump_yaml", "help_text", "load_config", "parse_override", "to_dict"]

"""Pipeline configuration: the schema and its loading/validation."""

from kdtoolkit.config.load import apply_overrides, read_toml, structure, unstructure
from kdtoolkit.config.schema import (
    SCHEMA_VERSION,
    DataConfig,
    FusionConfig,
    LayerOverride,
    LossConfig,
    MethodConfig,
    ModelConfig,
    OptimizerConfig,
    ParamGroupConfig,
    PipelineConfig,
    QuantizerConfig,
    RunConfig,
    ScheduleConfig,
)

__all__ = [
    "SCHEMA_VERSION", "DataConfig", "FusionConfig", "LayerOverride", "LossConfig", "MethodConfig",
    "ModelConfig", "OptimizerConfig", "ParamGroupConfig", "PipelineConfig", "QuantizerConfig",
    "RunConfig", "ScheduleConfig", "apply_overrides", "read_toml", "structure", "unstructure",
]

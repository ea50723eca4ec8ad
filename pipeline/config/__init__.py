"""Owns the typed config: its sections and every key's default and doc (schema), building it from YAML and
``--set`` overrides (load), and the checks that name the key and the fix (checks).

Imports: core, data
"""

from pipeline.config.load import build_config, load_config, with_overrides
from pipeline.config.schema import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    PipelineConfig,
    ScalingConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = [
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "PipelineConfig",
    "ScalingConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "build_config",
    "load_config",
    "with_overrides",
]

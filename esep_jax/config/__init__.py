"""The typed configuration: the schema (`schema.py`, every default) and its loaders (`loading.py`)."""

from esep_jax.config.loading import (differences, from_dict, load_config, load_config_file, load_module, override,
                                     read_config, save_config, to_dict)
from esep_jax.config.schema import (PER_MEMBER, Config, EnsembleConfig, EvalConfig, LossConfig, ModelConfig,
                                    OptimConfig, TrainConfig, get_field, member_values, validate)

__all__ = ["Config", "EnsembleConfig", "EvalConfig", "LossConfig", "ModelConfig", "OptimConfig", "PER_MEMBER",
           "TrainConfig", "differences", "from_dict", "get_field", "load_config", "load_config_file",
           "load_module", "member_values", "override", "read_config", "save_config", "to_dict", "validate"]

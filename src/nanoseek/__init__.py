"""nanoseek: a small, hackable DeepSeek-style LLM system."""

from nanoseek.checkpoint import CheckpointError, load_model, save_model
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model import Transformer
from nanoseek.tokenizer import load_tokenizer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Engine",
    "ModelConfig",
    "SamplingParams",
    "Transformer",
    "load_model",
    "load_tokenizer",
    "save_model",
]
__version__ = "0.1.0"

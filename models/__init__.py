"""The DeepSeek-V3 / Kimi K2 network as a plain nn.Module (no distributed code lives here)."""

from models.config import ConfigError, ModelConfig
from models.transformer import ModelOutput, Transformer

__all__ = ["ConfigError", "ModelConfig", "ModelOutput", "Transformer"]

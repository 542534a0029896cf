"""The DeepSeek-V3 / Kimi K2 network as a plain nn.Module (no distributed code lives here).

`Transformer` and `ModelOutput` load on first use, so that importing a torch-free module such as
`models.config` (every command line's config check) does not import torch and the network."""

from models.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig", "ModelOutput", "Transformer"]


def __getattr__(name: str):
    if name in ("ModelOutput", "Transformer"):
        from models import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")

"""segpipe's models: pure PyTorch, one file per family, a plain registry, checkpoint loading."""

from models.base import CheckpointError, ModelError, UnknownModelError
from models.checkpoint import load_model, save_native
from models.registry import build_model, list_models

__all__ = ["CheckpointError", "ModelError", "UnknownModelError", "build_model", "list_models", "load_model", "save_native"]

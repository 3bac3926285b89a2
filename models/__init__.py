"""segpipe's models: pure PyTorch, one file per family, a plain registry, checkpoint loading."""
from models.checkpoint import load_model, save_native
from models.registry import build_model, list_models

__all__ = ["build_model", "list_models", "load_model", "save_native"]

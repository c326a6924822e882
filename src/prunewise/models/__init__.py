"""Models: loading (named offline models, GGUF, folders, hub ids) and architecture adapters."""

from .adapters import ADAPTERS, ArchitectureAdapter, get_adapter, prunable_weights
from .loading import fetch_model, list_models, load_model, model_fingerprint

__all__ = ["ADAPTERS", "ArchitectureAdapter", "get_adapter", "prunable_weights",
           "fetch_model", "list_models", "load_model", "model_fingerprint"]

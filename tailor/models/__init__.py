"""Step 4: load the base model (embedded default, hub id, local folder or GGUF file)."""

from tailor.models.embedded import ModelNotFound
from tailor.models.hardware import best_dtype, default_device
from tailor.models.load import ResolvedModel, load_model, load_model_4bit, load_tokenizer, resolve_model

__all__ = ["ModelNotFound", "ResolvedModel", "best_dtype", "default_device", "load_model", "load_model_4bit",
           "load_tokenizer", "resolve_model"]

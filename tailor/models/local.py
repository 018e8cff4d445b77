"""Which catalog models this machine can load without a download, and whether it can download at all.

A model is here when it is the embedded default (its package is installed), when the Hugging Face
cache holds its config.json and every safetensors weight file (what tailor.models.load downloads,
and where it looks first), or when it is a model folder the user names. Everything else needs a
download of about its weights: the catalog's instruct models are stored in bf16 on the hub.

Whether the machine can download is what the user says, or else: HF_HUB_OFFLINE or
TRANSFORMERS_OFFLINE set, or the hub (or the HTTPS proxy) not answering within two seconds.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from tailor.models.catalog import CatalogModel
from tailor.models.embedded import EMBEDDED, ModelNotFound, embedded_gguf

STORED_BYTES_PER_PARAM = 2  # bf16: how the catalog's instruct models are published (a float32 upload: twice)
PROBE_TIMEOUT_S = 2.0  # a hub that takes longer than this to accept a connection will not serve 15 GB either
SET = {"1", "ON", "YES", "TRUE"}  # the values huggingface_hub and transformers read as set


@dataclass(frozen=True)
class Found:
    """A model on this machine."""

    kind: Literal["embedded", "hub-cache", "folder"]
    path: str  # the GGUF file, the cache snapshot or the folder

    @property
    def label(self) -> str:
        return {"embedded": "embedded", "hub-cache": "Hugging Face cache"}.get(self.kind, f"folder {self.path}")


@dataclass(frozen=True)
class LocalModels:
    """What this machine has: catalog name -> where it is; and why it cannot download, if it cannot."""

    found: dict[str, Found] = field(default_factory=dict)
    offline: str | None = None


def download_gb(m: CatalogModel) -> float:
    """The weights a download fetches, in GB of 10^9 bytes (as the hub shows sizes)."""
    return m.params * STORED_BYTES_PER_PARAM / 1e9


def fmt_gb(gb: float) -> str:
    return f"{gb:.0f} GB" if gb >= 10 else f"{gb:.1f} GB" if gb >= 1 else f"{gb:.2f} GB"


def find_local(catalog: tuple[CatalogModel, ...], folders: Iterable[str] = ()) -> dict[str, Found]:
    """Every catalog model that loads without a download; a folder the user names wins over the rest."""
    found: dict[str, Found] = {}
    for m in catalog:
        where = _embedded(m.name) or _hub_cache(m.hub_id)
        if where:
            found[m.name] = where
    for folder in folders:
        found[match_folder(Path(folder), catalog).name] = Found("folder", str(Path(folder).expanduser().resolve()))
    return found


def _embedded(name: str) -> Found | None:
    if name not in EMBEDDED:
        return None
    try:
        return Found("embedded", str(embedded_gguf(name)))
    except ModelNotFound:
        return None


def hub_cache() -> str:
    """The hub cache folder. The variable is read now rather than at import (as huggingface_hub's
    constants are), so a caller that sets it later is heard."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _hub_cache(hub_id: str) -> Found | None:
    """The cached snapshot, if it holds config.json and all the safetensors weights (one file, or
    every shard its index names): a snapshot with only some shards would fail to load."""
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache()

    def cached(filename: str) -> Path | None:
        path = try_to_load_from_cache(hub_id, filename, cache_dir=cache)
        return Path(path) if isinstance(path, str) else None  # None or "known not to exist"

    config = cached("config.json")
    if config is None:
        return None
    if cached("model.safetensors"):
        return Found("hub-cache", str(config.parent))
    index = cached("model.safetensors.index.json")
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()) if index else set()
    except (OSError, ValueError, KeyError):
        return None
    return Found("hub-cache", str(config.parent)) if shards and all(cached(s) for s in shards) else None


SHAPE_KEYS = {"num_hidden_layers": "layers", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
              "num_attention_heads": "attention_heads", "num_key_value_heads": "kv_heads", "vocab_size": "vocab_size"}


def match_folder(folder: Path, catalog: tuple[CatalogModel, ...]) -> CatalogModel:
    """The catalog model a local folder holds, recognised by its shape (config.json); the one its
    _name_or_path names where several share a shape."""
    config_file = folder.expanduser() / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"{folder}: cannot read config.json ({e}); name a model folder (config.json, "
                            "*.safetensors, tokenizer files)") from None
    config = {**config, **(config.get("text_config") or {})}  # multimodal configs keep the decoder's shape inside
    if "num_key_value_heads" not in config:
        config["num_key_value_heads"] = config.get("num_attention_heads")
    if not any(config_file.parent.glob("*.safetensors")):
        raise ModelNotFound(f"{folder}: no *.safetensors weights beside config.json; copy the whole model folder")
    shape = {ours: config.get(theirs) for theirs, ours in SHAPE_KEYS.items()}
    same = [m for m in catalog if all(getattr(m, k) == v for k, v in shape.items())]
    if not same:
        described = ", ".join(f"{k} {v}" for k, v in shape.items())
        raise ModelNotFound(f"{folder}: its shape ({described}) matches no catalog model; the advisor ranks catalog "
                            "models only (tailor models list): name the folder in a job's model.base directly")
    named = str(config.get("_name_or_path", "")).casefold()
    return next((m for m in same if m.hub_id.casefold() in named or m.name in named), same[0])


def offline_reason(probe: bool = True) -> str | None:
    """Why this machine cannot download models (None: it can). The hub is tried only with probe."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").upper() in SET:
            return f"{var} is set"
    if not probe:
        return None
    host, port = _hub_address()
    return None if reachable(host, port) else f"{host}:{port} did not answer within {PROBE_TIMEOUT_S:g} s"


def _hub_address() -> tuple[str, int]:
    """Where a download would connect: the HTTPS proxy if one is set, else the hub (HF_ENDPOINT)."""
    from huggingface_hub import constants

    url = urlparse(urllib.request.getproxies().get("https") or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@functools.cache
def reachable(host: str, port: int) -> bool:
    """A TCP connection within PROBE_TIMEOUT_S, tried once per process. In a thread, because name
    resolution does not honour a socket timeout and can hang for much longer."""
    answered: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return bool(answered)

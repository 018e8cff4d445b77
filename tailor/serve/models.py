"""What the server serves: base models and finished runs, by the name a request's `model` gives.

LoRA runs on the same base share one engine, so one copy of the base weights serves any number of
adapters; a run that saved full weights (freeze, full) has an engine of its own. A run can be
added while the server answers: its adapter loads between two batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tailor.errors import TailorError
from tailor.models.decode import Engine
from tailor.models.hardware import best_dtype, default_device
from tailor.models.load import load_model, load_tokenizer, resolve_model
from tailor.runs import Run
from tailor.serve.batcher import Batcher


class ModelError(TailorError, ValueError):
    """A model that cannot be served: the message says why and what to do."""


@dataclass
class Served:
    name: str
    engine: Engine
    adapter: str | None  # the LoRA adapter's name in the engine; None: the engine's own weights
    base: str  # the base model as the job named it
    run_dir: str | None
    created: int


class ModelSet:
    def __init__(self, batcher: Batcher, dtype: str = "auto", device: str | torch.device | None = None,
                 engine: str = "transformers"):
        if engine not in ("transformers", "vllm"):
            raise ModelError(f"--engine {engine}: use transformers or vllm")
        self.batcher = batcher
        self.engine_kind = engine
        self.dtype_name = dtype
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = best_dtype(dtype, self.device)
        self._engines: dict[str, Engine] = {}  # by weights folder
        self.served: dict[str, Served] = {}
        self.default: str | None = None  # the first base: also served as "base"

    def get(self, name: str) -> Served:
        if name == "base" and self.default:
            name = self.default
        if name not in self.served:
            raise KeyError(name)
        return self.served[name]

    def names(self) -> list[str]:
        return list(self.served)

    def add_base(self, source: str) -> str:
        """Serve a base model (embedded:…, a hub id, a folder, a .gguf file) under its own name."""
        if source not in self.served:
            resolved = self.batcher.call(lambda: resolve_model(source))  # a GGUF file converts with torch
            engine = self._engine(resolved.path)
            self.served[source] = Served(source, engine, None, source, None, int(time.time()))
        self.default = self.default or source
        return source

    def add_run(self, run_dir: str | Path, name: str | None = None) -> str:
        """Serve a finished run under `name` (default: its job's name, or NAME-RUNID when taken)."""
        run = Run(Path(run_dir).resolve())
        if not run.has_manifest:
            raise ModelError(f"{run.path}: no {Run.manifest_file.name}; give a run folder that `tailor train` wrote "
                             f"(runs/NAME/RUN-ID), or NAME/RUN-ID with --runs-dir")
        manifest = run.manifest()
        name = name or (manifest.name if manifest.name not in self.served else f"{manifest.name}-{run.id}")
        if name in self.served or name == "base":
            raise ModelError(f"a model named {name} is already served; choose another name (NAME=RUN_DIR)")
        base = manifest.model.source
        if run.result is None:
            raise ModelError(f"{run.path}: the run has no adapter/ or model/ yet; serve it once training has "
                             f"finished (`tailor train JOB --resume` continues an interrupted run)")
        if run.has_adapter:
            self.add_base(base)
            engine = self.served[base].engine
            # on the decoding thread, between two batches: not while one runs through the same PEFT model
            self.batcher.call(lambda: engine.add_adapter(name, str(run.adapter_dir)))
            self.served[name] = Served(name, engine, name, base, str(run.path), int(time.time()))
        else:
            engine = self._engine(str(run.model_dir))
            self.served[name] = Served(name, engine, None, base, str(run.path), int(time.time()))
        return name

    def _engine(self, path: str) -> Engine:
        if path in self._engines:
            return self._engines[path]
        if self.engine_kind == "vllm":
            if self._engines:  # each vllm.LLM takes most of the GPU's memory for its cache
                raise ModelError(f"{path}: --engine vllm serves one set of weights (a base and its LoRA runs); "
                                 f"serve full-weight runs or another base from a second `tailor serve`")
            from tailor.serve.vllm_engine import VllmEngine

            self._engines[path] = self.batcher.call(lambda: VllmEngine(path, self.dtype_name))
        else:  # loaded on the decoding thread: see tailor/serve/batcher.py
            self._engines[path] = self.batcher.call(
                lambda: Engine(load_model(path, self.dtype, self.device), load_tokenizer(path)))
        return self._engines[path]

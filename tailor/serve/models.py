"""What the server serves: base models and finished runs, by the name a request's `model` gives.

LoRA runs on the same base share one engine, so one copy of the base weights serves any number of
adapters; a run that saved full weights (freeze, full) has an engine of its own. A run can be
added while the server answers: its adapter loads between two batches.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tailor.errors import TailorError
from tailor.models.decode import Engine
from tailor.models.hardware import best_dtype, default_device
from tailor.models.load import load_model, load_tokenizer, resolve_model
from tailor.runs import Run, RunError
from tailor.serve.batcher import Batcher


class ModelError(TailorError, ValueError):
    """A model that cannot be served: the message says why and what to do."""


_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_name(name: str) -> str:
    """`name` when it can name a served model or adapter (it comes from a user: a request, the
    command line); otherwise a ModelError that says what a name may hold."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise ModelError(f"model name {str(name)[:80]!r}: use 1 to 64 letters, digits, '-', '_' or '.' "
                         f"(e.g. support-v2)")
    return name


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
        # one run added at a time: two adds of one name must not both find it free
        self._adding = threading.Lock()

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
        """Serve a finished run under `name` (default: its job's name, or NAME-RUNID when taken): the
        operator's runs, given at start-up. Its base is loaded as needed (downloaded, converted)."""
        run = Run(Path(run_dir).resolve())
        with self._adding:
            manifest = _manifest(run, str(run.path))
            name = self._free_name(manifest.name, run, name)
            base = manifest.model.source
            if run.result is None:
                raise ModelError(f"{run.path}: the run has no adapter/ or model/ yet; serve it once training has "
                                 f"finished (`tailor train JOB --resume` continues an interrupted run)")
            if run.has_adapter:
                self.add_base(base)
                self._add_adapter(name, base, run.adapter_dir, run)
            else:
                engine = self._engine(str(run.model_dir))
                self.served[name] = Served(name, engine, None, base, str(run.path), int(time.time()))
        return name

    def add_run_under(self, root: str | Path, given: str, name: str | None = None) -> str:
        """What a client with the admin key may add (POST /v1/adapters): a finished LoRA run inside
        `root`, given relative to it (NAME/RUN-ID), on a base this server serves already. Nothing is
        downloaded or converted and no engine is made; the weights load from safetensors only.
        Errors name the run as given, never by its folder on this disk."""
        root = Path(root).resolve()
        run = Run(_inside(root, given))
        with self._adding:
            if not run.done:
                raise ModelError(f"run {given}: not a finished run (no {Run.done_file.name}); give NAME/RUN-ID of a "
                                 f"run that `tailor train` finished under the server's --runs-dir")
            _within(root, given, run.manifest_file)
            manifest = _manifest(run, f"run {given}")
            name = check_name(self._free_name(manifest.name, run, None if name is None else check_name(name)))
            if not run.has_adapter:
                raise ModelError(f"run {given}: saved full weights (model/), which need an engine of their own; "
                                 f"give it to `tailor serve` at start-up instead")
            base = manifest.model.source
            bases = [s.name for s in self.served.values() if s.run_dir is None]
            if base not in bases:
                raise ModelError(f"run {given}: trained on a base model this server does not serve (GET /v1/models "
                                 f"lists those it does: `root`); give the run to a `tailor serve` of its base")
            self._add_adapter(name, base, _safetensors_adapter(run.adapter_dir, root, given), run)
        return name

    def _free_name(self, job_name: str, run: Run, name: str | None) -> str:
        name = name or (job_name if job_name not in self.served else f"{job_name}-{run.id}")
        if name in self.served or name == "base":
            raise ModelError(f"a model named {name} is already served; choose another name (NAME=RUN_DIR at "
                             f"start-up, `name` in POST /v1/adapters)")
        return name

    def _add_adapter(self, name: str, base: str, folder: Path, run: Run) -> None:
        engine = self.served[base].engine
        # on the decoding thread, between two batches: not while one runs through the same PEFT model
        self.batcher.call(lambda: engine.add_adapter(name, str(folder)))
        self.served[name] = Served(name, engine, name, base, str(run.path), int(time.time()))

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


def _manifest(run: Run, shown: str):
    """The run's manifest; errors name the run as `shown`."""
    if not run.has_manifest:
        raise ModelError(f"{shown}: no {Run.manifest_file.name}; give a run folder that `tailor train` wrote "
                         f"(runs/NAME/RUN-ID), or NAME/RUN-ID with --runs-dir")
    try:
        return run.manifest()
    except (RunError, ValueError, OSError) as exc:  # its message names the folder: by `shown` instead
        raise ModelError(str(exc).replace(str(run.path), shown)) from None


def _inside(root: Path, given: str) -> Path:
    """root/given with symlinks followed, when that is still inside root (a resolved folder)."""
    if Path(given).is_absolute():
        raise ModelError("run: give the run as NAME/RUN-ID relative to the server's runs folder (--runs-dir), "
                         "not as an absolute path")
    try:
        path = (root / given).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        raise ModelError(f"run {given[:200]!r}: not a usable path; give NAME/RUN-ID") from None
    if path == root or not path.is_relative_to(root):
        raise ModelError(f"run {given}: not inside the server's runs folder (--runs-dir), once '..' and symlinks "
                         f"are followed; give NAME/RUN-ID of a run under it")
    return path


def _within(root: Path, given: str, *paths: Path) -> None:
    """Refuses files of a run that a symlink leads out of root."""
    if not all(p.resolve().is_relative_to(root) for p in paths):
        raise ModelError(f"run {given}: a symlink in the run folder leads out of the server's runs folder "
                         f"(--runs-dir); copy the files into the run folder")


_PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # torch.load formats: loading one can run code


def _safetensors_adapter(adapter_dir: Path, root: Path, given: str) -> Path:
    """The adapter folder, resolved, when its weights are safetensors and it stays inside root. PEFT
    reads adapter_model.safetensors where it exists and unpickles adapter_model.bin where it does not:
    a folder a client names must hold the first, and no pickle at all."""
    folder = adapter_dir.resolve()
    files = [folder / "adapter_config.json", folder / "adapter_model.safetensors"]
    if any(p.suffix in _PICKLES for p in folder.iterdir()) or not all(f.is_file() for f in files):
        raise ModelError(f"run {given}: adapter/ must hold adapter_config.json and adapter_model.safetensors and "
                         f"no pickled weights ({', '.join(_PICKLES)}); save the adapter with safetensors "
                         f"(PEFT's default)")
    _within(root, given, folder, *files)
    return folder

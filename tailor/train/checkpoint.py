"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the trainable weights, optimizer and scheduler states, every RNG state and the
position in the data. It is written to a temporary folder and renamed, so a run killed while
saving leaves the previous checkpoint intact. Under FSDP2 and DeepSpeed each process writes its own
shards of the weights and optimizer states (tailor/train/distributed.py says how).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

PREFIX = "step-"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, state: dict, parallel,
                    rank: int = 0, is_main: bool = True, keep: int = 2) -> Path:
    """The weights and optimizer as `parallel` (tailor/train/distributed.py) keeps them: whole,
    by rank 0, under DDP; each rank its shards under FSDP and DeepSpeed. Every rank its RNG."""
    final = checkpoint_path(folder, step)
    tmp = folder / f".{PREFIX}{step:07d}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    _barrier()
    parallel.save(tmp, model, optimizer, is_main)
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    _barrier()
    if is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        best = best_checkpoint(folder)
        for old in list_checkpoints(folder)[:-keep]:
            if old != best:  # the best one stays whatever its age
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"{PREFIX}{step:07d}"


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


BEST = "best.json"


def mark_best(folder: Path, step: int, metric: str, value: float) -> None:
    """Name the checkpoint of `step` the best so far (checkpoints/best.json); pruning keeps it."""
    tmp = folder / f".{BEST}.tmp"
    best = {"step": step, "checkpoint": checkpoint_path(folder, step).name, "metric": metric, "value": value}
    tmp.write_text(json.dumps(best, indent=1), encoding="utf-8")
    os.replace(tmp, folder / BEST)


def best_checkpoint(folder: Path) -> Path | None:
    path = folder / BEST
    return folder / json.loads(path.read_text(encoding="utf-8"))["checkpoint"] if path.exists() else None


def load_weights(path: Path, model) -> None:
    """The trainable weights of a checkpoint written whole, into `model` (optimizer and RNG untouched)."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise RuntimeError(f"{path}: checkpoint does not match the model being trained "
                           f"(missing {missing[:3]}, unexpected {unknown[:3]}); start a new run without --resume")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)


def load_checkpoint(path: Path, model, optimizer, scheduler, parallel, rank: int = 0) -> dict:
    parallel.load(path, model, optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()

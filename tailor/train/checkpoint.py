"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the trainable weights, optimizer and scheduler states, every RNG state and the
position in the data. It is written to a temporary folder and renamed, so a run killed while
saving leaves the previous checkpoint intact. Under FSDP2 each process writes its own shards of the
weights and optimizer states (torch.distributed.checkpoint, in sharded/), and reads back the parts
its shards hold.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
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


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, state: dict,
                    rank: int = 0, is_main: bool = True, keep: int = 2, sharded: bool = False) -> Path:
    """Rank 0 writes weights and optimizer (identical on every rank under DDP); every rank its RNG.
    sharded (FSDP2): every rank writes its shards of both, with torch.distributed.checkpoint, into
    sharded/ (a later run may load them on another number of processes)."""
    final = checkpoint_path(folder, step)
    tmp = folder / f".{PREFIX}{step:07d}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if not sharded:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    _barrier()
    if sharded:
        _save_shards(tmp / SHARDS, model, optimizer)
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
    """The trainable weights of a checkpoint, into `model` (optimizer and RNG untouched)."""
    if (path / SHARDS).is_dir():
        _load_shards(path / SHARDS, model, None)
        return
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


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    if (path / SHARDS).is_dir():
        _load_shards(path / SHARDS, model, optimizer)
    else:
        load_weights(path, model)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


SHARDS = "sharded"


def _save_shards(folder: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from tailor.train.distributed import state_options

    weights, optim = get_state_dict(model, optimizer, options=state_options())
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(folder))


def _load_shards(folder: Path, model, optimizer) -> None:
    """Each rank reads the parts of the weights (and optimizer states) its shards hold."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict

    from tailor.train.distributed import state_options

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        weights = get_model_state_dict(model, options=state_options())
        dcp.load({"model": weights}, checkpoint_id=str(folder))
        set_model_state_dict(model, weights, options=state_options(strict=False))
        return
    weights, optim = get_state_dict(model, optimizer, options=state_options())
    state = {"model": weights, "optimizer": optim}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=state_options(strict=False))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()

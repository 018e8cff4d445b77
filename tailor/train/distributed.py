"""How several processes share the model being trained (`distributed.strategy` in the job).

    ddp        each process holds the whole model and a share of each batch; accelerate's DDP
    fsdp       PyTorch FSDP2: each decoder block's weights, gradients and optimizer states sharded
               over the processes, gathered block by block as the forward and backward reach them
    deepspeed  DeepSpeed ZeRO stage 2 (gradients and optimizer states sharded) or 3 (the weights too)

The loop asks the same things of each, and is otherwise the same for all three:

    prepare(objective, model, make_optimizer)  -> (what to call forward on, the optimizer)
    accumulate(objective, last)                reduce gradients only on the step's last micro-step
    backward(loss) / step(optimizer, …)        the backward pass; clip, update, zero the gradients
    save(folder, …) / load(folder, …)          checkpoints, sharded where the state is

and after training, `full_state(model, strategy)` gathers the trained weights whole.

FSDP2 and DeepSpeed are called directly rather than through accelerate: accelerate turns them on
only on accelerator devices, so a multi-process CPU run would silently be DDP. The loss the loop
gives to backward is already divided by the step's label tokens and multiplied by the number of
processes; all three average gradients over the processes, which gives back the sum.
"""

from __future__ import annotations

import json
import os
import pickle
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tailor.train.adapters import base_of


@dataclass(frozen=True)
class Sharding:
    """The job's distributed: section, as the loop needs it."""

    strategy: str = "ddp"  # ddp | fsdp | deepspeed
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    zero_stage: int = 3
    deepspeed_config: str | None = None  # the user's own JSON


def parallel_for(sharding: Sharding, accelerator, settings, run=None) -> "DDP":
    """run: the run folder, where DeepSpeed's config is written."""
    kind = {"ddp": DDP, "fsdp": FSDP, "deepspeed": DeepSpeed}[sharding.strategy]
    return kind(sharding, accelerator, settings, run)


class DDP:
    """accelerate's DistributedDataParallel (nothing at all on one process); checkpoints are
    written whole by the main process (every process holds the same weights)."""

    def __init__(self, sharding: Sharding, accelerator, settings, run=None):
        self.sharding, self.accelerator, self.settings, self.run = sharding, accelerator, settings, run

    def prepare(self, objective: nn.Module, model: nn.Module, make_optimizer):
        return self.accelerator.prepare_model(objective), make_optimizer()

    def accumulate(self, objective: nn.Module, last: bool):
        return nullcontext() if last else self.accelerator.no_sync(objective)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer, params: list[torch.Tensor], max_norm: float) -> float:
        """Clip to max_norm, update, zero the gradients; the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding this process's part of the norm
            norm = norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm.item()

    def save(self, folder: Path, model: nn.Module, optimizer, is_main: bool) -> None:
        from safetensors.torch import save_file

        from tailor.train.checkpoint import trainable_state

        if is_main:
            save_file(trainable_state(model), str(folder / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path, model: nn.Module, optimizer) -> None:
        """The checkpoint's trainable weights into model, and its optimizer state (optimizer None: weights only)."""
        from tailor.train.checkpoint import load_plain, load_weights

        load_weights(folder, model)
        if optimizer is not None:
            optimizer.load_state_dict(load_plain(folder / "optimizer.pt"))


class FSDP(DDP):
    """PyTorch's FSDP2: each decoder block one unit, the objective (which holds the embeddings,
    the final norm and the head) the root. Checkpoints: every process writes its shards with
    torch.distributed.checkpoint, and reads back the parts its shards hold."""

    SHARDS = "sharded"

    def prepare(self, objective: nn.Module, model: nn.Module, make_optimizer):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        device = self.accelerator.device
        _process_group(device)
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        # Gather the weights in the compute dtype (half the traffic in bf16); reduce the gradients
        # in float32, so the sum over processes is as exact as one process's.
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.settings.bf16_autocast else None,
                                         reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy() if self.sharding.cpu_offload and device.type != "cpu" else OffloadPolicy()
        options = dict(mesh=mesh, mp_policy=precision, offload_policy=offload)
        for block in base_of(model).get_decoder().layers:
            fully_shard(block, reshard_after_forward=self.sharding.reshard_after_forward, **options)
        # The root's weights are used last in the forward and first in the backward: keeping them
        # gathered in between saves an all-gather for nothing.
        fully_shard(objective, reshard_after_forward=False, **options)
        return objective, make_optimizer()  # the optimizer holds the shards (DTensors) fully_shard made

    def accumulate(self, objective: nn.Module, last: bool):
        objective.set_requires_gradient_sync(last)
        return nullcontext()

    def save(self, folder: Path, model: nn.Module, optimizer, is_main: bool) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        weights, optim = get_state_dict(model, optimizer, options=_trainable_only())
        dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(folder / self.SHARDS))

    def load(self, folder: Path, model: nn.Module, optimizer) -> None:
        """Each process reads the parts of the weights (and optimizer states) its shards hold."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import state_dict as sd

        reader = _safe_reader(folder / self.SHARDS)
        if optimizer is None:
            weights = sd.get_model_state_dict(model, options=_trainable_only())
            dcp.load({"model": weights}, storage_reader=reader)
            sd.set_model_state_dict(model, weights, options=_trainable_only(strict=False))
            return
        weights, optim = sd.get_state_dict(model, optimizer, options=_trainable_only())
        state = {"model": weights, "optimizer": optim}
        dcp.load(state, storage_reader=reader)
        sd.set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                          options=_trainable_only(strict=False))


class DeepSpeed(DDP):
    """DeepSpeed's ZeRO engine with Tailor's optimizer and schedule. DeepSpeed's gradient
    accumulation is left to the loop (managed_gradient_accumulation false: step() is the boundary),
    and it clips to training.max_grad_norm. Checkpoints are DeepSpeed's own, in deepspeed/."""

    FOLDER, TAG = "deepspeed", "state"

    def prepare(self, objective: nn.Module, model: nn.Module, make_optimizer):
        import deepspeed

        _process_group(self.accelerator.device)
        os.environ.setdefault("LOCAL_RANK", str(self.accelerator.local_process_index))  # set by torchrun, not by us
        objective.even_head_calls = True  # ZeRO-3 gathers the head's weight at each of its calls
        optimizer = make_optimizer()
        config = deepspeed_config(self.sharding, self.settings, torch.distributed.get_world_size())
        if self.run is not None and self.accelerator.is_main_process:
            from tailor.files import write_json

            write_json(self.run.deepspeed_file, config)
        self.engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, config=config)
        # ZeRO wraps the optimizer and steps the one given; the schedule sets that one's learning rates
        return self.engine, optimizer

    def accumulate(self, objective: nn.Module, last: bool):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop's loss is already the step's mean

    def step(self, optimizer, params: list[torch.Tensor], max_norm: float) -> float:
        self.engine.step()  # reduce, clip, update, zero
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def save(self, folder: Path, model: nn.Module, optimizer, is_main: bool) -> None:
        self.engine.save_checkpoint(str(folder / self.FOLDER), tag=self.TAG, save_latest=False,
                                    exclude_frozen_parameters=True)

    def load(self, folder: Path, model: nn.Module, optimizer) -> None:
        """DeepSpeed reads its files with torch.load(weights_only=False), which runs whatever a
        planted file holds; for this load its checkpoint engine reads them with weights_only=True."""
        own = self.engine.checkpoint_engine
        self.engine.checkpoint_engine = _WeightsOnlyEngine(own)
        try:
            self.engine.load_checkpoint(str(folder / self.FOLDER), tag=self.TAG, load_module_strict=False,
                                        load_optimizer_states=optimizer is not None, load_lr_scheduler_states=False)
        finally:
            self.engine.checkpoint_engine = own


class _WeightsOnlyEngine:
    """A DeepSpeed checkpoint engine whose load builds tensors, numbers, strings, plain containers
    and the few inert DeepSpeed classes ZeRO-2 and ZeRO-3 files name (the loss scaler, the ZeRO
    stage, ZeRO-2's fragment addresses), nothing else; everything but load is the engine it wraps."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def load(self, path: str, map_location=None):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        from tailor.train.checkpoint import load_plain

        inert = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]  # numbers, an enum, (start, numel)
        return load_plain(Path(path), allowed=inert, map_location=map_location)


def _safe_reader(path: Path):
    """torch.distributed.checkpoint's reader of a folder of shards, except that it reads the
    folder's index (.metadata, a pickle that torch reads with pickle.load, running whatever it
    holds) with _MetadataUnpickler. The shards themselves torch reads as raw bytes."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata_path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(metadata_path, "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except pickle.UnpicklingError as exc:
                    from tailor.train.checkpoint import unsafe

                    raise unsafe(Path(metadata_path), str(exc)) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(path))


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what an index of shards holds: torch.distributed.checkpoint's metadata
    classes, torch's sizes, dtypes and layouts, and paths; any other global is refused."""

    ALLOWED = {"torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta",
                                                         "TensorStorageMetadata", "BytesStorageMetadata",
                                                         "ChunkStorageMetadata", "TensorProperties",
                                                         "_MEM_FORMAT_ENCODING"},
               "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
               "torch.serialization": {"_get_layout"},
               "torch": {"Size"},
               "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
               "collections": {"OrderedDict"}}

    def find_class(self, module: str, name: str):
        inert = name in self.ALLOWED.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            inert = True
        if not inert:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return super().find_class(module, name)


def full_state(model: nn.Module, strategy: str) -> dict[str, torch.Tensor] | None:
    """The trainable weights gathered whole, on the CPU, after training with `strategy` (every
    process must call it); None under DDP, where the model's own weights are whole already."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_trainable_only(full_state_dict=True, cpu_offload=True))
    if strategy == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, p in model.named_parameters():
            if p.requires_grad:  # ZeRO-3 gathers each from the shards; ZeRO-2 holds it whole
                full = safe_get_full_fp32_param(p)
                state[name] = (full if full is not None else p.detach()).float().cpu()
        return state
    return None


def deepspeed_config(sharding: Sharding, settings, world: int) -> dict:
    """DeepSpeed's JSON: the user's file (deepspeed_config) or one written from zero_stage and
    cpu_offload; the batch sizes, clipping and precision always the job's."""
    if sharding.deepspeed_config:
        config = json.loads(Path(sharding.deepspeed_config).read_text(encoding="utf-8"))
    else:
        zero = {"stage": sharding.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
        if sharding.cpu_offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
            if sharding.zero_stage == 3:
                zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        config = {"zero_optimization": zero}
    return {**config,
            "train_micro_batch_size_per_gpu": settings.batch_size, "gradient_accumulation_steps": settings.grad_accum,
            "train_batch_size": settings.batch_size * settings.grad_accum * world,
            "managed_gradient_accumulation": False,
            "gradient_clipping": settings.max_grad_norm or 0.0,
            "bf16": {"enabled": settings.bf16_autocast}, "fp16": {"enabled": False},
            # Tailor's AdamW, also with offload (DeepSpeed's CPU Adam needs a compiler at run time)
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2 ** 31, "wall_clock_breakdown": False}


def _trainable_only(**kw):
    """torch.distributed.checkpoint's options: the trainable weights only (the frozen base is the
    base model's files; a checkpoint of it would be a copy of them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)


def _process_group(device: torch.device) -> None:
    """FSDP2 and DeepSpeed need a process group even for one process (`tailor train` without torchrun)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)

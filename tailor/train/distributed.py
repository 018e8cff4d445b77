"""How several processes share the model being trained: DDP (each holds all of it) or FSDP2
(each holds a shard of every weight, gradient and optimizer state).

The loop calls four functions and is otherwise the same for both:

    shard(objective, model, …)    before the optimizer exists (FSDP2 replaces the parameters)
    gradient_sync(objective, on)  accumulation: reduce the gradients only on the step's last micro-step
    grad_norm(params, max_norm)   clipping over sharded gradients gives the norm of the whole
    full_state(model)             the trained weights gathered whole, to save as one process would

FSDP2 is PyTorch's own (`torch.distributed.fsdp.fully_shard`), called directly rather than
through accelerate: accelerate turns FSDP on only on accelerator devices, so a multi-process CPU
run would silently be DDP. Each decoder block is one FSDP unit; the objective (which holds the
embeddings, the final norm and the head) is the root.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tailor.train.adapters import base_of


@dataclass(frozen=True)
class Sharding:
    """distributed: in the job, as the loop needs it."""

    strategy: str = "ddp"  # ddp | fsdp
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    bf16: bool = False  # the compute dtype: FSDP2 gathers the weights in it

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard(objective: nn.Module, model: nn.Module, sharding: Sharding, accelerator) -> nn.Module:
    """The objective ready to train on accelerator's processes: DDP-wrapped by accelerate, or with
    every decoder block of `model` and then the objective itself sharded by FSDP2 (in place: the
    model's parameters become DTensor shards)."""
    if not sharding.sharded:
        return accelerator.prepare_model(objective)  # DDP-wrapped when there are several processes
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    _one_process_group(accelerator.device)
    device = accelerator.device.type
    mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    # Gather the weights in the compute dtype (half the traffic in bf16); reduce gradients in float32,
    # so the sum over processes is as exact as one process's.
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if sharding.bf16 else None,
                                     reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if sharding.cpu_offload and device != "cpu" else OffloadPolicy()
    options = dict(mesh=mesh, mp_policy=precision, offload_policy=offload)
    for block in base_of(model).get_decoder().layers:
        fully_shard(block, reshard_after_forward=sharding.reshard_after_forward, **options)
    # The root's weights (embeddings, final norm, head) are used last in the forward and first in
    # the backward: keeping them gathered in between saves an all-gather for nothing.
    fully_shard(objective, reshard_after_forward=False, **options)
    return objective


def _one_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group even for one process (`tailor train` without torchrun)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


@contextmanager
def gradient_sync(objective: nn.Module, on: bool, accelerator):
    """Reduce gradients across processes in this backward pass only when `on` (the step's last
    micro-step); the others accumulate locally."""
    if is_sharded(objective):
        objective.set_requires_gradient_sync(on)
        yield
    elif on:
        yield
    else:
        with accelerator.no_sync(objective):
            yield


def grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients to max_norm; the norm before clipping, of all of them (over every shard)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor: this process's part of the reduction
        norm = norm.full_tensor()
    return norm.item()


def state_options(**kw):
    """Options for torch.distributed.checkpoint.state_dict: the trainable weights only (the frozen
    base is the base model's files; a checkpoint of it would be copies of them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights gathered whole, on the CPU of the main process (the others get {});
    every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=state_options(full_state_dict=True, cpu_offload=True))

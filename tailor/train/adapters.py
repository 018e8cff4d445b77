"""Which weights train (LoRA, full, or the top blocks) and at what learning rate each."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from tailor.errors import TailorError
from tailor.train.fused_lora import FusedLoraLinear

BLOCK = re.compile(r"\.layers\.(\d+)\.")


class AdapterError(TailorError, ValueError):
    """An adapter setting that does not fit the model (named by its job key)."""


@dataclass(frozen=True)
class AdapterConfig:
    kind: str = "lora"  # lora | qlora | full | freeze
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    lora_top_blocks: int | None = None
    train_top_blocks: int = 2
    train_head: bool = False
    train_norm: bool = True
    double_quant: bool = False  # qlora: read when the base loads, not here

    @property
    def is_lora(self) -> bool:
        """LoRA on the base as it is, or on its 4-bit form: either way the result is a PEFT adapter."""
        return self.kind in ("lora", "qlora")


def base_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def num_blocks(model: nn.Module) -> int:
    return model.config.num_hidden_layers


def block_index(name: str) -> int | None:
    m = BLOCK.search(name)
    return int(m.group(1)) if m else None


def apply_adapter(model: nn.Module, cfg: AdapterConfig, continued: bool = False) -> nn.Module:
    """Return the model to train, with requires_grad set on exactly the parameters that train.
    Trainable weights are kept in float32 (the frozen ones stay in the compute dtype).
    continued: `model` already carries the (trainable) LoRA adapter of an earlier run."""
    if cfg.is_lora:
        from peft import LoraConfig, get_peft_model

        if not continued:
            lora = LoraConfig(
                r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none", task_type="CAUSAL_LM",
                **_targets(model, cfg.target_modules, cfg.lora_top_blocks),
            )
            if cfg.kind == "lora":  # a 4-bit base keeps PEFT's own layer (bitsandbytes' Linear4bit)
                lora._register_custom_module({nn.Linear: FusedLoraLinear})
            # autocast_adapter_dtype: PEFT keeps the LoRA weights in float32 beside bf16 base weights.
            model = get_peft_model(model, lora, autocast_adapter_dtype=True)
        # Training runs under autocast, which computes the LoRA matmuls in bf16 whatever the input;
        # PEFT's own cast of every LoRA input to float32 would only add two copies per module.
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    elif cfg.kind == "full":
        model.requires_grad_(True)
    elif cfg.kind == "freeze":
        _freeze_all_but_top(model, cfg)
    else:
        raise AdapterError(f"adapter.kind: unknown kind {cfg.kind!r}; use lora, qlora, full or freeze")
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def load_lora_to_train(model: nn.Module, adapter_dir: str, cfg: AdapterConfig) -> nn.Module:
    """`model` with the LoRA adapter saved in adapter_dir, trainable (an earlier stage's, continued)."""
    from peft import LoraConfig, PeftModel

    lora = LoraConfig.from_pretrained(adapter_dir)
    if cfg.kind == "lora":
        lora._register_custom_module({nn.Linear: FusedLoraLinear})
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True, config=lora)
    return apply_adapter(model, cfg, continued=True)


def _targets(model: nn.Module, target_modules, top: int | None) -> dict:
    """LoraConfig's target arguments; with `top`, adapters go in the last `top` blocks only (PEFT's
    layers_to_transform, which needs the module names spelled out: 'all-linear' becomes every
    linear layer name found in the blocks)."""
    if top is None:
        return {"target_modules": target_modules}
    n = num_blocks(model)
    if top > n:
        raise AdapterError(f"adapter.lora_top_blocks: {top} is more than the model's {n} blocks")
    if target_modules == "all-linear":
        target_modules = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                                 if isinstance(m, nn.Linear) and block_index(name + ".") is not None})
    return {"target_modules": target_modules, "layers_to_transform": list(range(n - top, n)),
            "layers_pattern": "layers"}


def _freeze_all_but_top(model: nn.Module, cfg: AdapterConfig) -> None:
    n = num_blocks(model)
    if cfg.train_top_blocks > n:
        raise AdapterError(f"adapter.train_top_blocks: {cfg.train_top_blocks} is more than the model's {n} blocks")
    model.requires_grad_(False)
    first = n - cfg.train_top_blocks
    for name, p in model.named_parameters():
        idx = block_index(name)
        if idx is not None and idx >= first:
            p.requires_grad_(True)
    decoder = model.get_decoder()
    if cfg.train_norm and getattr(decoder, "norm", None) is not None:
        decoder.norm.requires_grad_(True)
    if cfg.train_head:
        model.get_output_embeddings().requires_grad_(True)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def param_groups(model: nn.Module, lr: float, layer_decay: float, weight_decay: float) -> list[dict]:
    """One optimizer group per learning rate. Block i of L gets lr * decay**(L-1-i): the layers near
    the output change most. Embeddings get decay**L; the head and final norm get lr."""
    n = num_blocks(model)
    head = base_of(model).get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        idx = block_index(name)
        if idx is not None:
            scale = layer_decay ** (n - 1 - idx)
        elif "embed" in name and id(p) not in head_ids:
            scale = layer_decay ** n
        else:
            scale = 1.0
        # No weight decay on norms and biases (1-D tensors), as is usual for transformers.
        wd = weight_decay if p.ndim >= 2 else 0.0
        group = groups.setdefault((scale, wd), {"params": [], "names": [], "lr": lr * scale,
                                                "lr_scale": scale, "weight_decay": wd})
        group["params"].append(p)
        group["names"].append(name)
    return sorted(groups.values(), key=lambda g: (g["lr_scale"], g["weight_decay"]))

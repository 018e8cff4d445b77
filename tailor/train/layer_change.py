"""How much each layer changed: ‖ΔW‖ / ‖W‖ per transformer block.

Fine-tuning is said to change the layers near the output most; this measures it for every run.
For a block, the changes of all its weights are pooled: sqrt(Σ‖ΔW‖²) / sqrt(Σ‖W‖²) (Frobenius
norms), so a block reads as one number whatever its number of matrices. ΔW is

    LoRA        the merged update of each adapted matrix, B·A·(alpha/r) (PEFT's get_delta_weight)
    full/freeze the trained weight minus the base model's, read tensor by tensor from its
                safetensors files (never a second copy of the model in memory)

Weights outside the blocks are reported apart: embeddings, the final norm, the output head.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from tailor.train.adapters import base_of, block_index


def layer_change(model: nn.Module, base_path: str | Path | None = None) -> dict:
    """{"blocks": [{"block", "relative_change"}...], "other": {name: relative_change}}."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    changed: dict = defaultdict(float)  # group -> Σ‖ΔW‖²
    size: dict = defaultdict(float)  # group -> Σ‖W‖²
    lora = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        if lora:
            for name, module in lora:
                # A QLoRA base holds 4-bit codes: ‖W‖ is of the weights they stand for.
                weight = dequantize_module_weight(module.get_base_layer()).float()
                delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)
                group = _group(name)
                changed[group] += float(delta.pow(2).sum())
                size[group] += float(weight.pow(2).sum())
        else:
            trained = {n: p for n, p in base_of(model).named_parameters() if p.requires_grad}
            for name, before in _base_tensors(base_path, list(trained)):
                after = trained[name].float()
                group = _group(name)
                changed[group] += float((after - before.float()).pow(2).sum())
                size[group] += float(before.float().pow(2).sum())
    blocks = sorted(g for g in changed if isinstance(g, int))
    return {"kind": "lora" if lora else "weights",
            "blocks": [{"block": b, "relative_change": _ratio(changed[b], size[b])} for b in blocks],
            "other": {g: _ratio(changed[g], size[g]) for g in sorted(g for g in changed if not isinstance(g, int))}}


def metrics_row(report: dict, step: int) -> dict:
    """The report as a metrics.jsonl row: block_00 … block_NN, and the other groups."""
    row = {"type": "layer_change", "step": step}
    row.update({f"block_{b['block']:02d}": b["relative_change"] for b in report["blocks"]})
    row.update(report["other"])
    return row


def _group(name: str):
    block = block_index(name)
    if block is not None:
        return block
    if "embed" in name:
        return "embeddings"
    if "lm_head" in name or name.endswith("head.weight"):
        return "head"
    if "norm" in name:
        return "final_norm"
    return "other"


def _ratio(changed: float, size: float) -> float:
    return math.sqrt(changed) / math.sqrt(size) if size else 0.0


def _base_tensors(base_path: str | Path | None, names: list[str]):
    """(name, base tensor) for each trained parameter the base model's safetensors files hold."""
    from safetensors import safe_open

    if base_path is None:
        raise ValueError("layer_change: a model without LoRA needs base_path, the base model's folder")
    files = sorted(Path(base_path).glob("*.safetensors"))
    wanted = set(names)
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in wanted:
                    yield key, f.get_tensor(key)

"""A LoRA linear layer whose forward and backward are one autograd function each.

PEFT's LoRA layer runs the frozen projection, then lora_A and lora_B as modules of their own,
casting their float32 weights to bf16 on every call (autocast), scaling and adding the result in
separate passes: per projection three matmul nodes, two casts and two element-wise passes in the
autograd graph, and as much Python. On a CPU, where a 135M model's step is a few hundred such
projections, that bookkeeping was a tenth of the step. Here the same arithmetic is one function:

    forward   y = x Wᵀ + s (x Aᵀ) Bᵀ            (the LoRA product added in place, in the matmul)
    backward  dx = g W + s (g B) A,  dA = s (g B)ᵀ x,  dB = s gᵀ (x Aᵀ)

with the same roundings as PEFT under autocast (bf16 products, float32 weights and gradients), so
a run trains the same adapter, saved by PEFT in its own format. The layer is PEFT's own LoRA
Linear (registered through LoraConfig's custom-module hook), which keeps merging, saving and
every other case: with dropout, DoRA, several adapters, merged weights or DeepSpeed ZeRO-3 (whose
hooks must see lora_A and lora_B called as modules) it runs PEFT's forward unchanged.

Not done: one product x [W; A]ᵀ for the frozen weight and the down-projection. It needs W and A
in one buffer, which FSDP and the optimizer (A must stay a float32 parameter) do not allow without
a copy of W per step, and the rank-16 product it saves is a small share of the step.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from tailor.train.precision import compute_dtype


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA Linear, with its plain case (one adapter, no dropout) as one autograd function."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._plain_adapter(args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                 self.scaling[adapter])

    def _plain_adapter(self, args, kwargs) -> str | None:
        """The one active adapter when the fused function computes what PEFT's forward would; else None."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        if (adapter not in self.lora_A or adapter in self.lora_variant
                or not isinstance(self.lora_dropout[adapter], nn.Identity)
                or type(self.base_layer) is not nn.Linear or hasattr(self.base_layer.weight, "ds_id")):
            return None
        return adapter


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        dtype = compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        down = x2 @ a.t()  # [tokens, rank]
        y = x2 @ w.t()
        y.addmm_(down, b.t(), alpha=scaling)
        if bias is not None:
            y += bias.to(dtype)
        ctx.save_for_backward(x2, down, w, a, b)
        ctx.scaling, ctx.shape = scaling, shape
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype, lora_a.dtype, lora_b.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, down, w, a, b = ctx.saved_tensors
        x_dtype, w_dtype, bias_dtype, a_dtype, b_dtype = ctx.dtypes
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(x2.dtype)
        g_down = (g @ b) * ctx.scaling  # [tokens, rank]
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = (g @ w).addmm_(g_down, a).view(ctx.shape).to(x_dtype)
        if need_w:
            grad_w = (g.t() @ x2).to(w_dtype)
        if need_bias:
            grad_bias = g.sum(0).to(bias_dtype)
        if need_a:
            grad_a = (g_down.t() @ x2).to(a_dtype)
        if need_b:
            grad_b = ((g.t() @ down) * ctx.scaling).to(b_dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None

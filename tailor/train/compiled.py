"""torch.compile where it pays: every decoder block, whole, forward and backward.

Inductor fuses a block's element-wise work (RMSNorm's float32 round trip, rotary embeddings, SiLU
times the up projection, residual adds, the LoRA layers' casts) and keeps fewer activations for
the backward pass. Attention enters the compiled block as one opaque operator with its own
backward (tailor/train/attention.py), which loops over the examples of each packed row, and
whose element-wise parts are compiled kernels of their own.

Measured with bench/train_throughput.py on a 2-core Zen 4 CPU (the embedded model, LoRA r16, rows
of 512 tokens), two runs each: whole blocks 760 and 708 tokens/s at 2,300 MB peak, against 665
and 701 tokens/s at 2,620-2,730 MB when only the MLP and norms were compiled. The one-time
compile takes about 40 s (20 s more than the parts).
"""

from __future__ import annotations

from torch import nn

from tailor.train.adapters import base_of
from tailor.train.attention import COMPILED_NAME, set_attention


def compile_blocks(model: nn.Module) -> None:
    """Compile every decoder block in place, with the attention that compiles."""
    set_attention(model, COMPILED_NAME)
    for layer in base_of(model).get_decoder().layers:
        # dynamic: rows change length from step to step; one graph serves them all
        layer.compile(dynamic=True)

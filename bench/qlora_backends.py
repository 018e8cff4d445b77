#!/usr/bin/env python
"""Which 4-bit NF4 kernel QLoRA should use on this machine: bitsandbytes' Linear4bit against
torchao's NF4Tensor, with a bf16 linear as the peer, on the shapes of the embedded model's layers.

Each runs what QLoRA's frozen base does in a training step: a forward under bf16 autocast and a
backward to the input (the frozen weight needs no gradient), 4 rows of 512 tokens. Printed: the
time per forward+backward, the bytes of the stored weight, its rounding (mean |W - W_4bit| over
mean |W|), and the kernel's largest difference from a bf16 linear on the rounded weight.

torchao is not a dependency of Tailor (pip install torchao to run this).

    python bench/qlora_backends.py
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {"attention q": (576, 576), "mlp up": (1536, 576), "mlp down": (576, 1536)}  # (out, in), SmolLM2-135M


def timed(fn, x, repeats: int) -> float:
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
        y.float().sum().backward()
    start = time.perf_counter()
    for _ in range(repeats):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
        y.float().sum().backward()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tokens", type=int, default=2048)
    args = p.parse_args(argv)
    import bitsandbytes as bnb

    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
    except ImportError:
        try:
            from torchao.dtypes.nf4tensor import linear_nf4, to_nf4  # torchao before 0.16
        except ImportError:
            raise SystemExit("torchao is not installed: pip install torchao") from None

    torch.manual_seed(0)
    totals = {"bitsandbytes": 0.0, "torchao": 0.0, "bf16": 0.0}
    print(f"{'layer':12s} {'backend':13s} {'ms':>7s} {'weight KB':>10s} {'rounding':>13s} {'kernel':>10s}")
    for name, (n_out, n_in) in SHAPES.items():
        weight = (torch.randn(n_out, n_in) * 0.02).bfloat16()
        x = torch.randn(args.tokens, n_in, requires_grad=True)
        layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=64).to("cpu")
        layer.support_avx512bf16_for_cpu = False  # the training layout (tailor/models/load.py says why)
        nf4 = to_nf4(weight, block_size=64, scaler_block_size=64)  # 256 does not divide 576 x 576 / 64
        backends = {
            "bitsandbytes": (layer, layer.weight.numel(), bnb.functional.dequantize_4bit(
                layer.weight.data, layer.weight.quant_state)),
            "torchao": (lambda x: linear_nf4(x.bfloat16(), nf4), nf4.quantized_data.numel(), nf4.get_original_weight()),
            "bf16": (lambda x: torch.nn.functional.linear(x, weight), weight.numel() * 2, weight),
        }
        for backend, (fn, size, rounded) in backends.items():
            seconds = timed(fn, x, args.repeats)
            totals[backend] += seconds
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                kernel = (fn(x).float() - torch.nn.functional.linear(x, rounded.bfloat16()).float()).abs().max()
            rounding = ((rounded.float() - weight.float()).abs().mean() / weight.float().abs().mean()).item()
            print(f"{name:12s} {backend:13s} {seconds * 1e3:7.2f} {size / 1024:10.0f} {rounding:13.4f} "
                  f"{kernel.item():10.2e}")
    print(f"bitsandbytes/bf16={totals['bitsandbytes'] / totals['bf16']:.2f} "
          f"torchao/bf16={totals['torchao'] / totals['bf16']:.2f} "
          f"torchao/bitsandbytes={totals['torchao'] / totals['bitsandbytes']:.2f}")


if __name__ == "__main__":
    main()

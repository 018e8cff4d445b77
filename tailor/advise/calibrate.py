"""Measure this machine, so that local estimates are measured, not guessed.

A CPU's share of its peak depends on its cores, caches, memory and thread count more than on any
data sheet. The probes measure, in about a minute:

  peak        bf16 (or float32) matrix products at the shapes of a small model's MLP, TFLOP/s
  bandwidth   a large tensor copy, GB/s (AdamW and autocast's weight casts are bound by it)
  utilisation Tailor's own training loop (tailor.train.loop.train, the packed per-example
              attention, the chunked head) on a randomly initialised SmolLM2-135M-shaped model,
              LoRA and full fine-tuning, a few steps each after a warm-up step: the FLOPs the
              estimator counts for those steps, over the time they took, over the peak
  memory      what the allocator holds per byte of activations (probe_activation_factor)
  decoding    seconds per generated token, for the evaluation's share of a run

and stores them (TAILOR_CACHE/calibration.json) under a key made of the CPU model, core count and
thread count: another machine, or the same one with another thread count, is measured anew.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from tailor.advise.estimate import (
    GB,
    Arch,
    Hardware,
    Workload,
    elementwise_per_token,
    memory,
    traffic_bytes_per_step,
    train_flops_per_token,
)

PROBE_ARCH = dict(name="smollm2-135m-shape", layers=30, hidden_size=576, intermediate_size=1536, attention_heads=9,
                  kv_heads=3, vocab_size=49152, tied_embeddings=True)
# Twice as wide, a third as deep: as many FLOPs per token, half the element-wise work per FLOP.
WIDE_PROBE = dict(name="wide", layers=10, hidden_size=1152, intermediate_size=3072, attention_heads=18, kv_heads=6,
                  vocab_size=49152, tied_embeddings=True)
PROBE_SEQ, PROBE_ROWS, PROBE_EXAMPLE = 512, 1, 128  # one packed row of four 128-token examples per step
# The training engine the stored measurements are of. A calibration of another engine is measured
# again: the utilisation and memory probes time Tailor's own loop, whose speed changed (issue 21:
# the head's gradient in the forward pass, fused LoRA layers, fused AdamW).
ENGINE = "2026-12-07"


def calibration_file() -> Path:
    from tailor.models.embedded import cache_root

    return cache_root().parent / "calibration.json"


def machine_key(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} | {os.cpu_count()} cores | {threads} threads"


def memory_gb() -> float:
    """Physical memory: what a CPU run can plan on."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError, AttributeError):
        return 8.0


def local_hardware(threads: int | None = None, path: Path | None = None) -> Hardware:
    """This machine as a Hardware entry: measured if it was calibrated with this thread count, else a
    rough guess marked uncalibrated (calibrated is None)."""
    import torch

    from tailor.models.hardware import cpu_flags, cpu_has_fast_bf16

    threads = threads or torch.get_num_threads()
    stored = load_calibration(threads, path)
    label = f"this machine ({os.cpu_count()} CPU cores, {memory_gb():.0f} GB)"
    avx512 = {"avx512f", "avx512bw"} <= cpu_flags()  # bitsandbytes' fast 4-bit CPU kernels
    if stored:
        return Hardware(name="local-cpu", label=label, kind="cpu", memory_gb=memory_gb(), avx512=avx512,
                        peak_tflops=stored["peak_tflops"], bandwidth_gbs=stored["bandwidth_gbs"], usd_per_hour=0.0,
                        bf16=stored["bf16"], utilisation=stored["utilisation"], calibrated=stored["measured_at"],
                        decode_step_s=stored.get("decode_step_s"), runtime_gb=stored.get("runtime_gb"),
                        elementwise_ns=stored.get("elementwise_ns", 0.0),
                        activation_factor=stored.get("activation_factor", 1.0))
    # Uncalibrated: ~2.5 GHz x 64 bf16 FLOP per cycle and core (AVX512-BF16), 32 in float32 (AVX2 FMA),
    # and the utilisation Tailor's loop reached on the CPUs it was measured on.
    bf16 = cpu_has_fast_bf16()
    peak = threads * 2.5e9 * (64 if bf16 else 32) / 1e12
    return Hardware(name="local-cpu", label=label, kind="cpu", memory_gb=memory_gb(), peak_tflops=peak,
                    bandwidth_gbs=10.0 * threads, usd_per_hour=0.0, bf16=bf16, avx512=avx512,
                    utilisation={"full": 0.3, "lora": 0.3, "freeze": 0.3})


def load_calibration(threads: int, path: Path | None = None) -> dict | None:
    path = path or calibration_file()
    try:
        stored = json.loads(path.read_text(encoding="utf-8")).get(machine_key(threads))
    except (OSError, ValueError):
        return None
    return stored if stored and stored.get("engine") == ENGINE else None


def calibrate(threads: int | None = None, steps: int = 2, path: Path | None = None, say=print,
              fresh_process: bool = True) -> dict:
    """Run the probes and store the result; returns it. fresh_process=False measures memory in
    this process (for tests: a grown allocator reads lower)."""
    import torch

    from tailor.models.hardware import cpu_has_fast_bf16

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    bf16 = cpu_has_fast_bf16()
    dtype = torch.bfloat16 if bf16 else torch.float32
    say(f"calibrating {machine_key(threads)} ({'bf16' if bf16 else 'float32'})")
    peak = matmul_tflops(dtype)
    bandwidth = copy_gbs()
    say(f"  matrix products {peak:.3f} TFLOP/s, memory bandwidth {bandwidth:.1f} GB/s")
    _import_training()
    runtime = rss_gb()  # what a training process holds before its model
    activation_factor = (_in_fresh_process("probe_activation_factor", threads) if fresh_process
                         else probe_activation_factor(dtype))
    say(f"  memory: {runtime:.2f} GB before loading, {activation_factor:.2f} bytes held per byte of activations")
    # Two LoRA probes of different widths separate the matrix products (FLOPs, ~width squared)
    # from the element-wise work (~width): t = FLOPs / (peak x u) + work x ns. Full fine-tuning
    # then shares the element-wise cost and gets its own u.
    probes = {}
    for name, arch_dict, method in (("lora", PROBE_ARCH, "lora"), ("lora-wide", WIDE_PROBE, "lora"),
                                    ("full", PROBE_ARCH, "full")):
        seconds, tokens = probe_step_seconds(method, dtype, steps, arch_dict)
        arch = Arch(**arch_dict)
        w = Workload(method=method, seq_len=PROBE_SEQ, micro_batch=PROBE_ROWS, label_fraction=0.5,
                     example_tokens=PROBE_EXAMPLE, compute_bytes=2 if bf16 else 4)
        traffic = traffic_bytes_per_step(arch, w, 1) / (bandwidth * 1e9)
        probes[name] = (max(seconds - traffic, 1e-6) / tokens, train_flops_per_token(arch, w),
                        elementwise_per_token(arch, w))
        say(f"  {name}: {tokens / seconds:.0f} tokens/s")
    inverse_rate, ns = _split(probes["lora"], probes["lora-wide"], peak * 1e12)
    utilisation = {"lora": round(1 / (inverse_rate * peak * 1e12), 4)}
    t, flops, work = probes["full"]
    utilisation["full"] = round(flops / (max(t - work * ns * 1e-9, 1e-12) * peak * 1e12), 4)
    say(f"  matrix products at {utilisation['lora']:.0%} of the peak in LoRA steps, {utilisation['full']:.0%} in full "
        f"fine-tuning; element-wise work (norms, activations, casts) {ns:.1f} ns per element and block")
    decode = decode_step_seconds(dtype)
    say(f"  generating: {decode['1'] * 1000:.0f} ms per step for 1 answer, {decode['16'] * 1000:.0f} ms for 16")
    result = {"peak_tflops": round(peak, 4), "bandwidth_gbs": round(bandwidth, 2), "bf16": bf16,
              "runtime_gb": round(runtime, 3), "activation_factor": activation_factor,
              "utilisation": utilisation | {"freeze": utilisation["full"]}, "decode_step_s": decode,
              "elementwise_ns": round(ns, 4),
              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "engine": ENGINE}
    _store(machine_key(threads), result, path or calibration_file())
    return result


def _import_training() -> None:
    for module in ("accelerate", "peft", "transformers.models.llama.modeling_llama", "tailor.train.loop",
                   "tailor.train.adapters", "tailor.train.attention"):
        importlib.import_module(module)


def _in_fresh_process(probe: str, threads: int):
    """Run a probe of this module in a new Python process: memory is measured on an allocator no
    other probe has grown, and the probes that follow run on one that this probe has not grown."""
    import subprocess
    import sys

    code = (f"import torch, json; torch.set_num_threads({threads}); from tailor.advise import calibrate as c; "
            f"from tailor.models.hardware import best_dtype; print(json.dumps(c.{probe}(best_dtype())))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"calibration probe {probe} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _split(narrow: tuple[float, float, float], wide: tuple[float, float, float],
           peak: float) -> tuple[float, float]:
    """Solve seconds/token = FLOPs x inverse_rate + work x ns for the two probes; (inverse_rate in
    s/FLOP, ns). The matrix products cannot beat the measured peak: where timing noise says they
    do, they run at the peak and the narrow probe's remaining time is the element-wise work's."""
    (t1, f1, e1), (t2, f2, e2) = narrow, wide
    det = f1 * e2 - f2 * e1
    inverse_rate = (t1 * e2 - t2 * e1) / det if det else t1 / f1
    if inverse_rate < 1 / peak:
        inverse_rate = 1 / peak
    ns = max(0.0, (t1 - f1 * inverse_rate) / e1 * 1e9)
    return inverse_rate, ns


def _store(key: str, result: dict, path: Path) -> None:
    from tailor.files import write_atomic

    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        table = {}
    table[key] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(table, indent=1))


def matmul_tflops(dtype, seconds: float = 1.5) -> float:
    import torch

    a, b = torch.randn(1024, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(5):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 1024 * 576 * 1536 * n / (time.perf_counter() - start) / 1e12


def copy_gbs(mb: int = 256, repeats: int = 5) -> float:
    """Read + write bandwidth of a large copy, the best of a few (bytes moved: 2 x size)."""
    import torch

    src = torch.empty(mb * 2 ** 20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def _probe_model(dtype, a: dict | None = None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    a = a or PROBE_ARCH
    config = LlamaConfig(vocab_size=a["vocab_size"], hidden_size=a["hidden_size"],
                         intermediate_size=a["intermediate_size"], num_hidden_layers=a["layers"],
                         num_attention_heads=a["attention_heads"], num_key_value_heads=a["kv_heads"],
                         tie_word_embeddings=True, max_position_embeddings=PROBE_SEQ, use_cache=False)
    torch.manual_seed(0)
    # Built in its dtype directly: a float32 copy first would leave freed blocks that a model
    # loaded from disk (as training loads it) never makes.
    return LlamaForCausalLM._from_config(config, dtype=dtype)


def decode_step_seconds(dtype, steps: int = 12) -> dict[str, float]:
    """Seconds per generated token for batches of 1 and 16 answers: one token per row through the
    probe model, as a decoding step runs it (the short caches of evaluation add little)."""
    import torch

    model = _probe_model(dtype).eval()
    out = {}
    for batch in (1, 16):
        ids = torch.randint(3, PROBE_ARCH["vocab_size"], (batch, 1))
        times = []
        with torch.no_grad():
            for _ in range(steps + 2):
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                times.append(time.perf_counter() - start)
        out[str(batch)] = round(statistics.median(times[2:]), 5)
    return out


def rss_gb() -> float:
    """This process's resident memory now."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2 ** 20
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


class PeakRSS:
    """Resident memory while the block runs, sampled every 20 ms: the highest (GB), and every
    sample as (time.time(), GB)."""

    def __enter__(self):
        import threading

        self.peak, self.samples, self._stop = rss_gb(), [], threading.Event()

        def sample():
            while not self._stop.wait(0.02):
                now = rss_gb()
                self.samples.append((time.time(), now))
                self.peak = max(self.peak, now)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_gb())


def probe_step_seconds(method: str, dtype, steps: int, arch: dict | None = None) -> tuple[float, int]:
    """(median seconds per step after the first, tokens per step) of Tailor's loop training a random
    model of `arch` (SmolLM2-135M's shape) on one packed row of four 128-token synthetic examples."""
    n = (steps + 1) * PROBE_ROWS * (PROBE_SEQ // PROBE_EXAMPLE)
    seconds, _ = _train_probe(arch or PROBE_ARCH, method, dtype, [PROBE_EXAMPLE] * n, PROBE_ROWS, steps + 1)
    return seconds, PROBE_SEQ * PROBE_ROWS


def probe_activation_factor(dtype, steps: int = 8) -> float:
    """Bytes the allocator holds per byte of saved activations, over a run long enough to show it.

    glibc keeps freed blocks for reuse, and rows of varying length (as packed data has) leave
    blocks that do not fit the next request: resident memory grows over the first dozen steps and
    levels off about 1.5-2.5x above the tensors alive. So the probe packs examples of random
    length (48-400 tokens) into rows of 512, two rows a step, and compares the peak with the
    estimator's activations for that model (weights and optimizer states, which are exact, taken
    off). The model is the 135M shape itself: smaller shapes fragment differently (6 or 12 blocks
    read 3.2-4.3 where real runs hold 2.4-3.1). About 30 s; it runs in a fresh process (calibrate)."""
    import random

    rng = random.Random(0)
    lengths = [rng.randint(48, 400) for _ in range(steps * 2 * 2)]
    _import_training()  # the libraries' own memory is the runtime, not the allocator's
    before = rss_gb()
    _, peak = _train_probe(PROBE_ARCH, "lora", dtype, lengths, 2, steps)
    arch = Arch(**PROBE_ARCH)
    w = Workload(method="lora", seq_len=PROBE_SEQ, micro_batch=2, compute_bytes=2 if dtype.itemsize == 2 else 4)
    m = memory(arch, w, "cpu")
    held = (peak - before) * GB - m.weights - m.gradients - m.optimizer
    return round(max(1.0, held / m.activations), 3)


def _train_probe(arch: dict, method: str, dtype, lengths: list[int], micro: int,
                 steps: int) -> tuple[float, float]:
    """Tailor's loop on a random model of `arch` and synthetic examples of `lengths` tokens (the
    second half of each is the answer): (median seconds of the steps after the first, peak
    resident GB while it ran)."""
    import torch
    from accelerate import Accelerator

    from tailor.runs import Run
    from tailor.train.adapters import AdapterConfig, apply_adapter
    from tailor.train.attention import NAME as PACKED_ATTENTION
    from tailor.train.attention import set_attention
    from tailor.train.encode import IGNORE, Encoded
    from tailor.train.loop import TrainSettings, train
    from tailor.train.packing import make_rows

    g = torch.Generator().manual_seed(0)
    examples = []
    for n in lengths:
        ids = torch.randint(3, arch["vocab_size"], (n,), generator=g).tolist()
        examples.append(Encoded(ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    settings = TrainSettings(learning_rate=1e-4, max_steps=steps, batch_size=micro, log_every=1, save_every=0,
                             warmup_ratio=0.0, bf16_autocast=dtype == torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as rss:
        model = apply_adapter(_probe_model(dtype, arch), AdapterConfig(kind=method, rank=16, alpha=32, dropout=0.0))
        set_attention(model, PACKED_ATTENTION)
        train(model, examples, make_rows(examples, PROBE_SEQ, packing=True), [], [], settings, Run(tmp),
              Accelerator(cpu=True), pad_id=0, show_progress=False)
        metrics = [r for r in Run(tmp).metrics() if r["type"] == "train"]
    times = ([r["tokens"] / r["tokens_per_s"] for r in metrics[1:]]
             or [metrics[0]["tokens"] / metrics[0]["tokens_per_s"]])
    return statistics.median(times), rss.peak

"""Memory, time and money of a fine-tuning run, worked out before anything runs.

    memory = weights + gradients + optimizer states + activations + runtime, per device
             (DDP: the whole model on each; FSDP, ZeRO: shares of it; CPU offload: the shares in host memory)
    time   = training FLOPs / (peak FLOP/s x utilisation)
             + optimizer and weight-cast traffic / memory bandwidth (+ host traffic when offloaded)
    cost   = hours x price per device-hour x devices

The formulas follow what Tailor's training loop actually keeps and computes (tailor/train/):
frozen weights in the compute dtype and trainable ones in float32 with AdamW's two float32 states;
activations under bf16 autocast; attention per packed example, recomputed in the backward pass;
the output head and cross-entropy only at label positions, in chunks recomputed in the backward
pass. Each term is a function of its own, so the tests can hold them against hand-computed values.

Utilisation is the one number that cannot be derived: on this machine `tailor advise --calibrate`
measures it (tailor/advise/calibrate.py); for GPUs the hardware table carries typical values.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

Method = Literal["full", "lora", "qlora", "freeze"]
Strategy = Literal["ddp", "fsdp", "deepspeed"]

GB = 1024 ** 3
HEAD_CHUNK = 256  # label positions per head + cross-entropy chunk (tailor.train.loss.CHUNK)
NF4_BYTES = 4.127 / 8  # QLoRA: 4-bit NormalFloat plus double-quantized block scales (64 per block)
NF4_BYTES_PLAIN = 4.5 / 8  # without double quantization: a float32 scale per block of 64
# Gradient checkpointing: what a step holds beside the block inputs, in blocks' worth of saved
# activations (activation_bytes says why it is more than one).
RECOMPUTED_BLOCKS = 5
PCIE_GBS = 25.0  # host <-> device, per process (PCIe 4.0 x16 in practice): what CPU offload moves through
USABLE_MEMORY = 0.9  # share of a device's memory a run can plan on (allocator slack, fragmentation)
RUNTIME_GB = {"cpu": 0.45, "gpu": 1.0}  # Python + torch + transformers resident; CUDA context + workspaces
GPU_UTILISATION = {"full": 0.40, "lora": 0.35, "qlora": 0.25, "freeze": 0.35}
MULTI_DEVICE_EFFICIENCY = 0.9  # data parallel: gradient all-reduce and stragglers


# ---- what is being trained ---------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """The shape of a dense decoder: all the estimator needs of a model."""

    name: str
    layers: int
    hidden_size: int
    intermediate_size: int
    attention_heads: int
    kv_heads: int
    vocab_size: int
    tied_embeddings: bool
    head_dim: int | None = None
    qkv_bias: bool = False

    @property
    def q_width(self) -> int:
        return self.attention_heads * (self.head_dim or self.hidden_size // self.attention_heads)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden_size // self.attention_heads)

    @property
    def block_params(self) -> int:
        """One transformer block: q, k, v, o (and q/k/v biases), gate, up, down, two norms."""
        h, q, kv = self.hidden_size, self.q_width, self.kv_width
        attention = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate_size + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        head = 0 if self.tied_embeddings else self.embedding_params
        return self.embedding_params + head + self.layers * self.block_params + self.hidden_size

    def lora_params(self, rank: int) -> int:
        """LoRA on every linear projection of one block: rank x (in + out) each."""
        h, q, kv, i = self.hidden_size, self.q_width, self.kv_width, self.intermediate_size
        return rank * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))

    @classmethod
    def of(cls, model) -> "Arch":
        """From a catalog entry (tailor.models.catalog.CatalogModel)."""
        return cls(model.name, model.layers, model.hidden_size, model.intermediate_size, model.attention_heads,
                   model.kv_heads, model.vocab_size, model.tied_embeddings, model.head_dim, model.qkv_bias)


@dataclass(frozen=True)
class Workload:
    """How a run trains: the method and the shape of each micro-step."""

    method: Method = "lora"
    seq_len: int = 512  # tokens per packed row
    micro_batch: int = 4  # rows per micro-step
    lora_rank: int = 16
    lora_dropout: float = 0.0
    lora_top_blocks: int | None = None  # LoRA only in the top N blocks
    train_top_blocks: int = 2  # freeze: blocks that train
    train_head: bool = False  # freeze: the output head trains too
    checkpointing: bool = False  # gradient checkpointing: keep only block inputs, recompute the rest
    strategy: Strategy = "ddp"  # how several processes share the model (distributed.strategy)
    zero_stage: int = 3  # deepspeed: 2 shards gradients and optimizer states, 3 the weights too
    cpu_offload: bool = False  # fsdp, deepspeed: the shares live in host memory
    double_quant: bool = True  # qlora: the 4-bit weights' block scales quantized too
    label_fraction: float = 0.5  # share of row tokens that carry a label (the answer)
    example_tokens: float = 256.0  # mean tokens per example: the span attention runs over
    compute_bytes: int = 2  # bf16/fp16 activations and frozen weights; 4 for float32


def trainable_params(arch: Arch, w: Workload) -> int:
    if w.method == "full":
        return arch.params
    if w.method == "freeze":
        head = arch.embedding_params if w.train_head else 0
        return w.train_top_blocks * arch.block_params + arch.hidden_size + head
    return _lora_blocks(arch, w) * arch.lora_params(w.lora_rank)


def _lora_blocks(arch: Arch, w: Workload) -> int:
    return min(w.lora_top_blocks or arch.layers, arch.layers)


def _blocks_with_grad(arch: Arch, w: Workload) -> int:
    """Blocks the backward pass runs through: from the lowest block with a trainable weight up."""
    if w.method == "full":
        return arch.layers
    if w.method == "freeze":
        return min(w.train_top_blocks, arch.layers)
    return _lora_blocks(arch, w)


# ---- memory --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Memory:
    weights: float  # bytes
    gradients: float
    optimizer: float
    activations: float
    runtime: float
    offloaded: float = 0.0  # bytes each process keeps in host memory (cpu_offload); not in total

    @property
    def total(self) -> float:
        """On the device."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.runtime

    def as_gb(self) -> dict[str, float]:
        return {k: round(v / GB, 2) for k, v in
                {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                 "activations": self.activations, "runtime": self.runtime, "total": self.total,
                 "offloaded": self.offloaded}.items()}


def weight_bytes(arch: Arch, w: Workload) -> float:
    """Frozen weights in the compute dtype (4-bit for QLoRA's blocks); trainable ones in float32,
    plus (full, freeze) the bf16 copy autocast makes of each for the step."""
    n, t = arch.params, trainable_params(arch, w)
    if w.method == "qlora":
        nf4 = NF4_BYTES if w.double_quant else NF4_BYTES_PLAIN
        frozen = arch.layers * arch.block_params * nf4 + (n - arch.layers * arch.block_params) * w.compute_bytes
        return frozen + 4 * t
    if w.method == "lora":
        return n * w.compute_bytes + 4 * t
    autocast_copy = t * w.compute_bytes if w.compute_bytes < 4 else 0
    return (n - t) * w.compute_bytes + 4 * t + autocast_copy


def activation_bytes_per_token(arch: Arch, w: Workload) -> float:
    """What autograd keeps for the backward pass, per token and block, in a Llama-style block:
    each RMSNorm its float32 input and bf16 output; attention its q, k, v (the scores are
    recomputed) and the o projection's input; the MLP gate and up outputs, SiLU's output and the
    product the down projection reads; LoRA its rank-wide intermediates (and dropout's copies)."""
    a, h, i = w.compute_bytes, arch.hidden_size, arch.intermediate_size
    per_block = 2 * (4 * h + a * h) + a * (2 * arch.q_width + 2 * arch.kv_width) + 4 * a * i
    if w.method in ("lora", "qlora"):
        per_block += 7 * a * w.lora_rank
        if w.lora_dropout > 0:  # a dropped-out copy of each LoRA input, and its mask
            per_block += (a + 1) * (5 * h + arch.q_width + i)
    return per_block


def activation_bytes(arch: Arch, w: Workload) -> float:
    tokens = w.seq_len * w.micro_batch
    blocks = _blocks_with_grad(arch, w)
    per_block = activation_bytes_per_token(arch, w)
    if w.checkpointing:
        # Every block's input is kept through the step. In the backward pass each block is computed
        # again, and while its backward runs, its activations, their gradients and the temporaries
        # of the recomputation (the norms' float32 copies, each example's attention scores) are
        # alive at once, in memory the allocator keeps for the next block. One block's worth read
        # 19-42 % under the peaks measured on a 2-core Zen 4 (SmolLM2-135M, LoRA r16, 2 rows of
        # 512, 1,024 and 2,048 tokens: 1.5, 2.1-2.4 and 2.4 GB); RECOMPUTED_BLOCKS = 5 reads from
        # 22 % under to 7 % over (tests/test_advise.py holds it there).
        # Checkpointing a few trainable blocks (freeze) saves little: never more than their own.
        recomputed = min(RECOMPUTED_BLOCKS, blocks)
        stored = tokens * (blocks * w.compute_bytes * arch.hidden_size + recomputed * per_block)
    else:
        stored = tokens * blocks * per_block
    # Head + cross-entropy chunk: bf16 logits, their float32 copy and its gradient.
    head = HEAD_CHUNK * arch.vocab_size * (w.compute_bytes + 8)
    label_states = tokens * w.label_fraction * arch.hidden_size * w.compute_bytes * 2
    return stored + head + label_states


def memory(arch: Arch, w: Workload, kind: str = "gpu", activation_factor: float = 1.0,
           runtime_gb: float | None = None, devices: int = 1) -> Memory:
    """Memory per device when `devices` processes train together as w.strategy says.
    activation_factor: what the allocator holds per byte of saved tensors (on a CPU, glibc keeps
    freed blocks for reuse; calibration measures it); runtime_gb: measured resident memory before
    the model loads."""
    t = trainable_params(arch, w)
    # AdamW (foreach) also makes one float32 temporary per weight while it steps.
    whole = Memory(weights=weight_bytes(arch, w), gradients=4 * t, optimizer=12 * t,
                   activations=activation_bytes(arch, w) * activation_factor,
                   runtime=(runtime_gb or RUNTIME_GB[kind]) * GB)
    return per_device(whole, arch, w, devices)


def per_device(m: Memory, arch: Arch, w: Workload, devices: int) -> Memory:
    """What each of `devices` processes holds of the model's memory `m`, by w.strategy.

    ddp: the whole model each. fsdp and ZeRO-3: the weights, gradients and optimizer states divided
    among them, plus the weights gathered whole for the computation at hand: one block's, and the
    embeddings' and head's, which stay gathered from the forward to the backward pass. ZeRO-2:
    gradients and optimizer states divided, the weights whole. cpu_offload: the divided parts live
    in host memory (offloaded), the gathered weights on the device. Activations and the runtime are
    each process's own. One process shares nothing."""
    if w.strategy == "ddp" or devices == 1:
        return m
    shard_weights = w.strategy == "fsdp" or w.zero_stage == 3
    weights = m.weights / devices if shard_weights else m.weights
    gathered = (arch.block_params + arch.params - arch.layers * arch.block_params) * w.compute_bytes
    gradients, optimizer = m.gradients / devices, m.optimizer / devices
    if w.cpu_offload:
        host = (weights if shard_weights else 0.0) + gradients + optimizer
        return Memory(gathered if shard_weights else weights, 0.0, 0.0, m.activations, m.runtime, offloaded=host)
    return Memory(weights + (gathered if shard_weights else 0.0), gradients, optimizer, m.activations, m.runtime)


# ---- time ------------------------------------------------------------------------------------------

def _forward_terms(arch: Arch, w: Workload) -> tuple[float, float, float]:
    """Forward matrix-multiply FLOPs per row token: one block's projections, one block's attention
    (scores and weighted sum over the example), and the head at label positions."""
    linear = 2 * (arch.block_params - 2 * arch.hidden_size)
    attention = 4 * arch.q_width * w.example_tokens
    head = 2 * arch.vocab_size * arch.hidden_size * w.label_fraction
    return linear, attention, head


def forward_flops_per_token(arch: Arch, w: Workload) -> float:
    """A no-grad forward pass (validation loss, perplexity, prompt prefill), per row token."""
    linear, attention, head = _forward_terms(arch, w)
    return arch.layers * (linear + attention) + head


def train_flops_per_token(arch: Arch, w: Workload) -> float:
    """Matrix-multiply FLOPs per row token of one training step (forward and backward).

    forward: 2 x parameters for every block; attention 2 x 2 x q_width x example length (scores
    and weighted sum); the head 2 x vocab x hidden at label positions only. Backward: the input
    gradient costs as much as the forward, the weight gradient as much again (full, freeze's
    blocks); blocks below the lowest trainable one run forward only. Attention and the head
    chunks are recomputed in the backward pass (one more forward each)."""
    linear, attention, head = _forward_terms(arch, w)
    with_grad = _blocks_with_grad(arch, w)
    forward_only = arch.layers - with_grad
    weight_grad = w.method in ("full", "freeze")
    block_factor = 3 if weight_grad else 2
    if w.checkpointing:
        block_factor += 1
    flops = forward_only * (linear + attention)
    flops += with_grad * (block_factor * linear + 4 * attention)
    flops += head * (4 if (w.method == "full" or w.train_head and w.method == "freeze") else 3)
    if w.method in ("lora", "qlora"):
        flops += 3 * 2 * _lora_blocks(arch, w) * arch.lora_params(w.lora_rank)
    return flops


def elementwise_per_token(arch: Arch, w: Workload) -> float:
    """Element-wise work per row token of a training step, in units of 'one element of one block':
    norms, rotary, SiLU, residual and LoRA adds scale with the widths (2 x hidden + MLP width) per
    block, not with their square as the matrix products do. On a CPU this part is about a third of
    a small model's step, and shrinks as models widen; calibration measures its cost per unit
    (Hardware.elementwise_ns). Blocks below the lowest trainable one run forward only (1 of 3)."""
    with_grad = _blocks_with_grad(arch, w)
    return elementwise_per_block(arch) * (with_grad + (arch.layers - with_grad) / 3)


def elementwise_per_block(arch: Arch) -> float:
    """One block's element-wise work per token in a forward pass: its widths (2 x hidden + MLP)."""
    return 2 * arch.hidden_size + arch.intermediate_size


def traffic_bytes_per_step(arch: Arch, w: Workload, micro_steps: int, devices: int = 1) -> float:
    """Memory traffic that is not matrix products: AdamW reads and writes each trainable weight, its
    gradient and two states (~28 bytes); autocast casts each float32 trainable weight to bf16 once
    per micro-step (6 bytes). Small for LoRA; for full fine-tuning of a small model on a CPU it is
    a fifth of the step. Sharded (fsdp, deepspeed), each device steps its share of the states only;
    offloaded, the CPU does (offload_bytes_per_step)."""
    t = trainable_params(arch, w)
    cast = 6 * t * micro_steps if w.method in ("full", "freeze") and w.compute_bytes < 4 else 0
    if w.cpu_offload and devices > 1:
        return cast
    return 28 * t / (devices if w.strategy != "ddp" else 1) + cast


def offload_bytes_per_step(arch: Arch, w: Workload, micro_steps: int, devices: int) -> float:
    """cpu_offload: what each process moves between host and device per optimizer step: its share
    of the weights in for the forward and again for the backward, and its share of the gradients
    out, every micro-step; then AdamW runs on the CPU over its share of the states (28 bytes a
    weight, as in traffic_bytes_per_step). Bound by PCIE_GBS."""
    if not w.cpu_offload:
        return 0.0
    t = trainable_params(arch, w)
    per_micro_step = 2 * arch.params * w.compute_bytes + 4 * t
    return (per_micro_step * micro_steps + 28 * t) / devices


# ---- hardware ----------------------------------------------------------------------------------

class Hardware(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    label: str
    kind: Literal["gpu", "cpu"] = "gpu"
    memory_gb: float = Field(gt=0)
    peak_tflops: float = Field(gt=0, description="Dense bf16 (or fp16) matrix-multiply peak, TFLOP/s.")
    bandwidth_gbs: float = Field(gt=0, description="Memory bandwidth, GB/s.")
    usd_per_hour: float = Field(ge=0, description="Price per device-hour; 0 for a machine you own.")
    bf16: bool = True
    utilisation: dict[Method, float] = Field(default_factory=lambda: dict(GPU_UTILISATION))
    calibrated: str | None = Field(None, description="When utilisation was measured on this machine, if it was.")
    runtime_gb: float | None = Field(None, description="Resident memory before the model loads (measured on this "
                                     "machine).")
    elementwise_ns: float = Field(
        0.0, ge=0, description="Nanoseconds per unit of element-wise work (elementwise_per_token), measured on this "
        "machine; 0 where the utilisation already covers it (GPUs).")
    activation_factor: float = Field(
        1.0, gt=0, description="Memory the allocator holds per byte of saved activations (measured on this machine).")
    decode_step_s: dict[str, float] | None = Field(
        None, description="Measured seconds per generated token of the probe model, by batch size ('1', '16').")
    avx512: bool | None = Field(
        None, description="CPU: whether it has AVX-512, which bitsandbytes' fast 4-bit kernels (QLoRA) need; "
        "null for GPUs.")

    def util(self, method: str) -> float:
        u = self.utilisation
        return u.get(method) or u.get("lora" if method == "qlora" else "full") or GPU_UTILISATION[method]


HARDWARE_FILE = Path(__file__).with_name("hardware.yaml")


@functools.cache
def hardware_table(path: Path = HARDWARE_FILE) -> dict[str, Hardware]:
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {e["name"]: Hardware.model_validate(e) for e in entries}


def with_overrides(table: dict[str, Hardware], overrides: Path | None = None,
                   prices: dict[str, float] | None = None) -> dict[str, Hardware]:
    """The table with a user's file (whole entries, or just some keys of a known one) and prices."""
    table = dict(table)
    if overrides is not None:
        for entry in yaml.safe_load(Path(overrides).read_text(encoding="utf-8")) or []:
            known = table.get(entry.get("name"))
            merged = {**known.model_dump(), **entry} if known else entry
            table[merged["name"]] = Hardware.model_validate(merged)
    for name, price in (prices or {}).items():
        if name not in table:
            raise KeyError(f"--price {name}={price}: no hardware named {name!r}; known: {', '.join(table)}")
        table[name] = table[name].model_copy(update={"usd_per_hour": price})
    return table


# ---- the estimate of a whole run -----------------------------------------------------------------

@dataclass(frozen=True)
class RunSize:
    """How much data one run goes through."""

    train_tokens: int  # tokens per epoch (real tokens, packing fills rows)
    epochs: float = 3.0
    grad_accum: int = 1
    packing_fill: float = 0.95  # share of each packed row that is not padding


@dataclass(frozen=True)
class Estimate:
    method: str
    hardware: str
    devices: int
    memory: Memory
    fits: bool
    trainable: int
    steps: int
    seconds: float
    usd: float
    tflops_total: float
    notes: tuple[str, ...] = field(default=())
    workload: Workload = field(default_factory=Workload)  # what was estimated

    @property
    def setup(self) -> str:
        """How the devices run it, beyond the method: "FSDP over 4 devices, gradient checkpointing"
        ("" for one device as it is)."""
        w, parts = self.workload, []
        if self.devices > 1:
            name = {"ddp": "DDP", "fsdp": "FSDP", "deepspeed": f"DeepSpeed ZeRO-{w.zero_stage}"}[w.strategy]
            parts.append(f"{name} over {self.devices} devices" + (" with CPU offload" if w.cpu_offload else ""))
        if w.checkpointing:
            parts.append("gradient checkpointing")
        return ", ".join(parts)

    def as_dict(self) -> dict:
        w = self.workload
        return {"method": self.method, "hardware": self.hardware, "devices": self.devices, "setup": self.setup,
                "strategy": w.strategy, "gradient_checkpointing": w.checkpointing, "cpu_offload": w.cpu_offload,
                "rows_per_micro_step": w.micro_batch,
                "memory_gb": self.memory.as_gb(), "fits": self.fits, "trainable_parameters": self.trainable,
                "optimizer_steps": self.steps, "seconds": round(self.seconds, 1), "usd": round(self.usd, 2),
                "training_pflop": round(self.tflops_total / 1000, 3), "notes": list(self.notes)}


def estimate(arch: Arch, w: Workload, size: RunSize, hw: Hardware, devices: int = 1) -> Estimate:
    """Memory per device, wall time and cost of training `arch` with `w` on `devices` x `hw`."""
    notes = []
    if w.method == "qlora" and hw.kind == "cpu" and hw.avx512 is False:
        notes.append("this CPU has no AVX-512: bitsandbytes' 4-bit kernels take a slow path here, slower than "
                     "estimated")
    if not hw.bf16:
        notes.append(f"{hw.label} has no bf16: Tailor trains in float32 there (model.dtype auto), twice the "
                     "weight and activation memory of bf16")
    # What the engine does (tailor.models.hardware.best_dtype): bf16 where the device has it, else
    # float32 (it has no fp16 loss-scaling path).
    w = replace(w, compute_bytes=2 if hw.bf16 else 4)
    mem = memory(arch, w, hw.kind, hw.activation_factor, hw.runtime_gb, devices)
    if mem.offloaded:
        notes.append(f"≈ {mem.offloaded / GB:.0f} GB of host memory per process for the offloaded states")
    fits = mem.total <= hw.memory_gb * GB * USABLE_MEMORY
    rows = math.ceil(size.train_tokens / (w.seq_len * size.packing_fill))
    rows_per_step = w.micro_batch * size.grad_accum * devices
    steps = math.ceil(size.epochs * math.ceil(rows / rows_per_step))
    # Every position of a packed row runs through the model, its padding too.
    computed_tokens = size.epochs * size.train_tokens / size.packing_fill
    flops = computed_tokens * train_flops_per_token(arch, w)
    scale = devices * (MULTI_DEVICE_EFFICIENCY if devices > 1 else 1.0)
    compute_s = flops / (hw.peak_tflops * 1e12 * hw.util(w.method) * scale)
    compute_s += computed_tokens * elementwise_per_token(arch, w) * hw.elementwise_ns * 1e-9 / scale
    micro_steps = size.grad_accum
    traffic_s = steps * traffic_bytes_per_step(arch, w, micro_steps, devices) / (hw.bandwidth_gbs * 1e9)
    traffic_s += steps * offload_bytes_per_step(arch, w, micro_steps, devices) / (PCIE_GBS * 1e9)
    seconds = compute_s + traffic_s
    usd = seconds / 3600 * hw.usd_per_hour * devices
    return Estimate(w.method, hw.name, devices, mem, fits, trainable_params(arch, w), steps, seconds, usd,
                    flops / 1e12, tuple(notes), w)


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


"""Which base model, which technique, which starting hyperparameters — each with its reason.

Models: every catalog entry is checked against the hard needs (a licence that allows the use,
the languages, a context that holds the longest examples, memory on the chosen hardware, the
deadline and the budget, and, on a machine that cannot download, being here already); of those
that pass, the ones in the size band the use case calls for come first. Memory is met by the
first way of training that fits (ways(): LoRA as it is, then with gradient checkpointing, sharded
across several devices, with a 4-bit base), and that way is what the starter job runs. On a GPU the
largest comes first (more capacity, while it still meets every constraint), then the newest. On a
CPU time is what is scarce: the models that train within the deadline (or CPU_BUDGET_HOURS) come
first, those already on the machine before those that need a download, each the largest first.
Everything excluded says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from tailor.advise.answers import Answers
from tailor.advise.estimate import (
    GB,
    USABLE_MEMORY,
    Arch,
    Estimate,
    Hardware,
    RunSize,
    Workload,
    estimate,
    fmt_duration,
    memory,
)
from tailor.advise.profile import DataProfile
from tailor.models.catalog import CatalogModel, size_label
from tailor.models.local import Found, LocalModels, download_gb, fmt_gb
from tailor.train import auto

# Parameter band (billions) each use case calls for: a tone is learnt by a small model; a
# language or a field's knowledge needs capacity.
SIZE_BAND = {"voice": (0.1, 8), "moderation": (0.1, 8), "accuracy": (0.1, 8), "compliance": (0.5, 14),
             "jargon": (0.5, 14), "localization": (1.5, 32), "general": (3, 72)}

CPU_HOURS = 24  # without a deadline, a CPU run longer than a day is not worth recommending
# Without a deadline, the models a CPU trains within an hour rank first. A first fine-tune is run
# again and again (the data fixed, a setting changed): runs that fit a lunch break can be repeated
# within a working day; longer ones belong on a GPU (tailor advise --gpu shows what one costs).
CPU_BUDGET_HOURS = 1.0


@dataclass
class Candidate:
    model: CatalogModel
    tried: list[Estimate]  # the ways of training tried, in order; the last fits, unless none did
    in_band: bool
    why: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    over_limits: bool = False  # excluded by the deadline, the budget or a download this machine cannot make only
    here: Found | None = None  # where it is on this machine; None: it needs a download
    download_blocked: bool = False  # excluded only because it needs a download and the machine is offline

    @property
    def plan(self) -> Estimate:
        """How it trains: the first way that fits (or, if none does, the last tried)."""
        return self.tried[-1]

    @property
    def eligible(self) -> bool:
        return not self.excluded

    @property
    def local(self) -> bool:
        return self.here is not None

    @property
    def download_gb(self) -> float:
        """The download it needs before training here (0: none)."""
        return 0.0 if self.local else download_gb(self.model)

    @property
    def weights(self) -> str:
        """Where its weights come from, for the report: "here (embedded)", "download ≈ 15 GB"."""
        return f"here ({self.here.label})" if self.here else f"download ≈ {fmt_gb(self.download_gb)}"

    @property
    def meets_needs(self) -> bool:
        """Licence, languages, context and memory are fine (time, money or a download may not be)."""
        return self.eligible or self.over_limits


def lora_workload(a: Answers, data: DataProfile, hw: Hardware, seq_len: int, rank: int) -> Workload:
    return Workload(method="lora", seq_len=seq_len, micro_batch=micro_batch(hw), lora_rank=rank,
                    example_tokens=min(data.mean_tokens, seq_len), label_fraction=data.label_fraction)


# ---- how a model fits the devices -----------------------------------------------------------------

def ways(method: str, devices: int) -> list[dict]:
    """The ways of training with `method` (an answer: auto, lora, qlora, full, freeze), in the order
    they are tried: each gives up more than the one before, so it is only worth it where those
    before do not fit. Gradient checkpointing computes each block again (a third more compute, the
    same result); FSDP divides the model among the devices (communication); QLoRA stores the frozen
    weights in 4-bit (a little precision and slower matmuls; each process holds the whole 4-bit
    base, so it runs DDP); CPU offload moves the shares to host memory (far slower). Sharding needs
    several devices: one process has nothing to share with."""
    if method == "auto":  # LoRA while some way of it fits without offloading, then a 4-bit base
        lora = ways("lora", devices)
        return [w for w in lora if not w.get("cpu_offload")] + ways("qlora", devices) + \
            [w for w in lora if w.get("cpu_offload")]
    if method == "qlora":
        return [{"method": "qlora"}, {"method": "qlora", "checkpointing": True}]
    out = [{}, {"checkpointing": True}]
    if devices > 1:
        out += [{"strategy": "fsdp"}, {"strategy": "fsdp", "checkpointing": True},
                {"strategy": "deepspeed", "zero_stage": 3, "cpu_offload": True, "checkpointing": True}]
    return [{"method": method, **w} for w in out]


def fit(arch: Arch, w: Workload, size: RunSize, hw: Hardware, devices: int, tries: list[dict]) -> list[Estimate]:
    """Each way of `tries` in turn, each with fewer rows per micro-step (more accumulation: the same
    compute) until it fits. Returns, for each way that did not fit, its estimate at one row (the
    least it needs), and then the first that fits, if one does."""
    tried = []
    for way in tries:
        for micro in range(w.micro_batch, 0, -1):
            est = estimate(arch, replace(w, micro_batch=micro, **way), size, hw, devices)
            if est.fits:
                return tried + [est]
        tried.append(est)
    return tried


def fit_model(a: Answers, data: DataProfile, m: CatalogModel, hw: Hardware, epochs: float) -> list[Estimate]:
    """The ways tried for model m with the answers' method (fit())."""
    w = lora_workload(a, data, hw, seq_len_for(data, m.context_length), lora_rank(a, data, m.params))
    size = RunSize(train_tokens=max(1, data.train_tokens), epochs=epochs)
    return fit(Arch.of(m), w, size, hw, a.compute.devices, ways(a.method, a.compute.devices))


METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA", "full": "full fine-tuning", "freeze": "the top blocks (freeze)"}


def way_of(e: Estimate) -> str:
    """'QLoRA with gradient checkpointing', 'full fine-tuning with FSDP over 4 devices'."""
    return METHOD_NAMES[e.method] + (f" with {e.setup}" if e.setup else "")


def rank_models(a: Answers, data: DataProfile, hw: Hardware, catalog, epochs: float,
                local: LocalModels = LocalModels()) -> list[Candidate]:
    low, high = SIZE_BAND[a.use_case]
    out = []
    for m in catalog:
        c = Candidate(m, fit_model(a, data, m, hw, epochs), low <= m.billions <= high, here=local.found.get(m.name))
        _check(c, a, data, hw, local.offline)
        out.append(c)
    eligible = [c for c in out if c.eligible]
    if hw.kind == "cpu":
        budget_s = cpu_budget_s(a)
        eligible.sort(key=lambda c: _cpu_order(c, low, budget_s))
        _say_why_on_cpu(eligible, [c for c in out if c.in_band and (c.eligible or c.download_blocked)], a, budget_s)
    else:
        eligible.sort(key=lambda c: _gpu_order(c, low, high))
    return eligible + sorted((c for c in out if not c.eligible), key=lambda c: c.model.params)


def cpu_budget_s(a: Answers) -> float:
    """The training time a CPU run should keep within: the deadline, or CPU_BUDGET_HOURS."""
    return (a.deadline_hours or CPU_BUDGET_HOURS) * 3600


def _released(c: Candidate) -> int:
    return int(c.model.released.replace("-", ""))


def _gpu_order(c: Candidate, low: float, high: float) -> tuple:
    """In the band, those that fit without 4-bit weights or CPU offload first (QLoRA costs a little
    quality and time, offload much time: they make a model fit, they do not make it the better
    choice), the largest first; outside it, the closest to the band; then the newest."""
    b, w = c.model.billions, c.plan.workload
    return (not c.in_band, w.method == "qlora" or w.cpu_offload,
            -min(b, high) if c.in_band else abs(math.log(b / low)), -_released(c))


def _cpu_order(c: Candidate, low: float, budget_s: float) -> tuple:
    """In the band: those that train within the budget (here before a download, then the largest),
    then those over it (here first, then the quickest). Outside the band, as on a GPU."""
    if not c.in_band:
        return (True, False, False, abs(math.log(c.model.billions / low)), -_released(c))
    fits = c.plan.seconds <= budget_s
    return (False, not fits, not c.local, -c.model.billions if fits else c.plan.seconds, -_released(c))


def _say_why_on_cpu(ranked: list[Candidate], in_band: list[Candidate], a: Answers, budget_s: float) -> None:
    """Each model's time and download first (the table shows the first reason); for the first model,
    what the largest in the band would cost instead (a GPU's first choice), even when being offline
    rules it out."""
    limit = f"the {a.deadline_hours:g} h deadline" if a.deadline_hours else f"the {CPU_BUDGET_HOURS:g} h budget"
    for c in ranked:
        over = f", over {limit}" if c.plan.seconds > budget_s else ""
        where = f"here already ({c.here.label})" if c.here else f"a download of ≈ {fmt_gb(c.download_gb)}"
        c.why.insert(0, f"on this CPU: trains in {fmt_duration(c.plan.seconds)}{over}; {where}")
    if not ranked or not ranked[0].in_band:
        return
    top, largest = ranked[0], max(in_band, key=lambda c: (c.model.params, -c.plan.seconds))
    if largest.model.params <= top.model.params:
        return
    cost = f"would take {fmt_duration(largest.plan.seconds)}" + (
        "" if largest.local else f" and a download of ≈ {fmt_gb(largest.download_gb)}")
    top.why[0] = f"{top.why[0]}; {largest.model.name} ({size_label(largest.model.params)}) {cost}"


def _check(c: Candidate, a: Answers, data: DataProfile, hw: Hardware, offline: str | None = None) -> None:
    m, low_high = c.model, SIZE_BAND[a.use_case]
    if a.commercial and not m.commercial_use:
        c.excluded.append(f"licence {m.license} does not allow commercial use")
    missing = [lang for lang in a.languages if lang not in m.languages]
    if missing:
        c.excluded.append(f"does not list {', '.join(missing)} among its languages")
    if m.context_length < data.p99_tokens:
        c.excluded.append(f"context {m.context_length:,} tokens is shorter than your long examples "
                          f"({data.p99_tokens:,})")
    plan, per = c.plan, " per device" if c.plan.devices > 1 else ""
    need = plan.memory.total / GB
    if not plan.fits:
        first = c.tried[0]
        c.excluded.append(f"needs {first.memory.total / GB:.1f} GB{per} with {way_of(first)}"
                          + (f", {need:.1f} GB even with {way_of(plan)}" if plan is not first else "")
                          + f"; {hw.label} has {hw.memory_gb:.0f} GB")
    needs_met = not c.excluded
    if a.deadline_hours is not None and plan.seconds > a.deadline_hours * 3600:
        c.excluded.append(f"training takes {fmt_duration(plan.seconds)}, past the {a.deadline_hours:g} h deadline")
    elif a.deadline_hours is None and hw.kind == "cpu" and plan.seconds > CPU_HOURS * 3600:
        c.excluded.append(f"training takes {fmt_duration(plan.seconds)} on this CPU, more than a day "
                          "(set deadline_hours to allow longer)")
    if a.budget_usd is not None and plan.usd > a.budget_usd:
        c.excluded.append(f"costs ${plan.usd:,.2f}, above the ${a.budget_usd:,.2f} budget")
    if offline and not c.local and not c.excluded:
        # The starter job must load its model: one it cannot fetch would fail at the first step.
        c.excluded.append(f"needs a download of ≈ {fmt_gb(c.download_gb)}; {offline}")
        c.download_blocked = True
    c.over_limits = needs_met and bool(c.excluded)
    if c.excluded:
        return
    size = size_label(m.params)
    if c.in_band:
        c.why.append(f"{size} is in the {low_high[0]:g}-{low_high[1]:g}B band for {a.use_case}")
    else:
        c.why.append(f"{size} is outside the {low_high[0]:g}-{low_high[1]:g}B band for {a.use_case}")
    c.why.append(f"{way_of(plan)} fits: {need:.1f} of {hw.memory_gb:.0f} GB{per}; {fmt_duration(plan.seconds)}"
                 + (f", ${plan.usd:,.2f}" if hw.usd_per_hour else ""))
    c.why.append(f"{m.license}" + (f" ({m.license_note})" if m.license_note else "")
                 + (", gated: accept the licence on the hub first" if m.gated else ""))
    if a.languages != ["en"]:
        c.why.append("speaks " + ", ".join(a.languages))
    c.why.append(f"context {m.context_length:,} tokens")


# ---- technique -------------------------------------------------------------------------------

TECHNIQUES = {
    "task": ("task-specific fine-tuning", "a model tuned tightly to one job; expect it to be no better (and possibly "
             "worse) at everything else, which the general-skills check in the evaluation measures"),
    "transfer": ("transfer learning", "reuses what the model knows and trains only its upper layers (after a pass "
                 "over your documents): cheap and good with little data, less precise for a highly specialized task"),
    "multitask": ("multi-task learning", "one model for several related tasks that share what they learn; the "
                  "balance between tasks needs care (task sampling and per-task scores in the report)"),
    "sequential": ("sequential fine-tuning", "stages that each build on the last, with a check that earlier skills "
                   "hold; costs more compute and planning than one stage"),
    "behavioral": ("behavioral fine-tuning", "demonstrations, then preferences between better and worse answers, "
                   "teach a way of behaving; the behaviour needs watching over time (feedback, re-tuning)"),
}


@dataclass(frozen=True)
class TechniqueChoice:
    name: str
    why: str
    alternatives: tuple[str, ...] = ()


def choose_technique(a: Answers, data: DataProfile) -> TechniqueChoice:
    if data.preference_pairs and data.examples:
        return TechniqueChoice("behavioral", f"you have {data.preference_pairs:,} preference pairs beside "
                               "demonstrations, and the goal is a behaviour (tone, rules), which pairs teach best",
                               ("task on the demonstrations alone, if the pairs are few or noisy",))
    if data.n_tasks > 1 and a.data.staged:
        return TechniqueChoice("sequential", f"{data.n_tasks} tasks that build on each other: one stage each, "
                               "with a regression check after every stage", ("multitask, if order does not matter",))
    if data.n_tasks > 1:
        return TechniqueChoice("multitask", f"{data.n_tasks} related tasks trained together in one model",
                               ("one task-specific model per task, if one task matters most",))
    # The profile's count: the answers' own, or the plain-text records found in the data. Transfer
    # keeps the lower blocks as they are, which full fine-tuning does not.
    if data.domain_text_tokens and a.use_case in ("jargon", "localization", "compliance") and a.method != "full":
        return TechniqueChoice("transfer", f"{data.domain_text_tokens:,} tokens of your documents teach the "
                               "vocabulary first; only the upper layers then adapt to the task",
                               ("task, if the documents add little beyond the examples",))
    return TechniqueChoice("task", "one task with examples of the answers you want",
                           ("transfer, once you have manuals or policies to read first",))


# ---- hyperparameters ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    key: str  # the job-file key
    value: object  # for the recommended model
    why: str
    auto: bool = False  # the job says `auto`: the rule is applied again to the model that is trained

    @classmethod
    def auto_from(cls, c: auto.Choice) -> Setting:
        """A rule's choice for the advised model, written `auto` in the job."""
        return cls(c.key, c.value, c.why, auto=True)


def micro_batch(hw: Hardware) -> int:
    return auto.batch_size("cpu" if hw.kind == "cpu" else "cuda").value


def seq_len_for(data: DataProfile, context: int) -> int:
    """The next power of two that holds 99 % of the examples, 256 at least, within the context."""
    return min(context, 4096, max(256, 2 ** math.ceil(math.log2(max(1, data.p99_tokens)))))


# Use cases whose rank is their own: knowledge or a language needs capacity whatever the model's
# size. For a tone, a format or one narrow task the model's size decides (tailor/train/auto.py).
RANK_BY_USE_CASE = {"compliance": 16, "jargon": 16, "localization": 32, "general": 16}


def lora_rank(a: Answers, data: DataProfile, params: int = 0) -> int:
    base = RANK_BY_USE_CASE.get(a.use_case)
    if base is None:
        return auto.lora_rank(params, data.examples).value if params else 8
    return base * 2 if data.examples >= 10_000 else base


def epochs_for(data: DataProfile) -> float:
    return auto.epochs(data.examples).value


def hyperparameters(a: Answers, data: DataProfile, m: CatalogModel, hw: Hardware, technique: str,
                    tried: list[Estimate]) -> list[Setting]:
    """The starting settings for model m, trained the way tried[-1] says (fit()). Those that are
    rules of the model's size and the data are written `auto` in the job: shown here for m, chosen
    again at the start of training for the model actually trained (a `--set model.base=...` changes
    them too)."""
    plan = tried[-1]
    kind, micro = plan.method, plan.workload.micro_batch
    seq = seq_len_for(data, m.context_length)
    rows = max(1, math.ceil(data.train_tokens / (seq * 0.95)))
    out = [Setting("adapter.kind", kind, _kind_why(a, tried, hw))]
    if kind in ("lora", "qlora"):
        out += _lora_settings(a, data, m)
    out += fitting_settings(Arch.of(m), hw, tried)
    lr = auto.learning_rate(m.params, kind, "preference" if technique == "preference" else "task")
    out += [
        Setting.auto_from(lr),
        Setting.auto_from(auto.epochs(data.examples)),
        Setting("training.max_seq_len", seq, f"holds 99 % of your examples ({data.p99_tokens:,} tokens)"),
        Setting("training.batch_size", micro, "rows per micro-step: the most that fit the memory")
        if micro < micro_batch(hw) else Setting.auto_from(auto.batch_size("cpu" if hw.kind == "cpu" else "cuda")),
        Setting.auto_from(auto.grad_accum(rows, micro, plan.devices)),
        Setting("training.early_stopping_patience", 2, "stop after two validations without improvement; the best "
                "checkpoint is kept"),
    ]
    decay = 0.9 if technique in ("transfer", "sequential") and m.layers >= 24 else 1.0
    out.append(Setting("training.layer_lr_decay", decay, "each lower block learns 0.9x as fast as the one above: the "
                       "general features near the input change least" if decay < 1 else
                       "one learning rate for every block" + (": LoRA's updates are small already"
                                                             if kind in ("lora", "qlora") else "")))
    if technique == "transfer":
        top = max(1, m.layers // 2)
        key = "adapter.train_top_blocks" if kind == "freeze" else "adapter.lora_top_blocks"
        out.append(Setting(key, top, f"transfer learning: the lower {m.layers - top} of {m.layers} blocks (general "
                           f"features) stay frozen; the upper {top} adapt"))
    elif kind in ("lora", "qlora"):
        out.append(Setting("adapter.target_modules", "all-linear", "every projection of every block: the best "
                           "quality per trained weight"))
    if technique == "behavioral":
        out.append(Setting("preference.beta", 0.1, "how far preferences may pull the model from its demonstrations"))
    return out


def _lora_settings(a: Answers, data: DataProfile, m: CatalogModel) -> list[Setting]:
    if a.use_case in RANK_BY_USE_CASE:
        rank = lora_rank(a, data, m.params)
        rank_setting = Setting("adapter.rank", rank, f"{a.use_case} with {data.examples:,} examples: knowledge or "
                               "a language needs more capacity" + ("; doubled for 10,000+ examples"
                                                                   if data.examples >= 10_000 else ""))
    else:
        rank_setting = Setting.auto_from(auto.lora_rank(m.params, data.examples))
    return [rank_setting, Setting.auto_from(auto.lora_alpha(rank_setting.value))]


def _kind_why(a: Answers, tried: list[Estimate], hw: Hardware) -> str:
    plan = tried[-1]
    if a.method == plan.method:
        return f"as you asked (method {a.method}): " + {
            "lora": "small low-rank matrices beside the frozen weights",
            "qlora": "LoRA on a base whose linear layers are stored in 4-bit NF4 (bitsandbytes)",
            "full": "every weight trains; the most memory (weights, gradients and two AdamW states in float32)",
            "freeze": "only the top blocks train"}[a.method]
    if plan.method == "qlora":
        lora = [e for e in tried if e.method == "lora"]
        per = " per device" if plan.devices > 1 else ""
        return (f"LoRA needs ≈ {_gb(lora[0])}{per}" + (f" (≈ {_gb(lora[-1])} with {lora[-1].setup})"
                                                       if len(lora) > 1 else "")
                + f" on {hw.label}, {hw.memory_gb * USABLE_MEMORY:.1f} GB of which a run can use; QLoRA ≈ "
                f"{_gb(plan)}: the frozen weights in 4-bit NF4 (bitsandbytes), for some speed and a little "
                "precision; the adapter is a LoRA adapter like any other")
    return ("LoRA trains ~1 % of the weights: a fraction of full fine-tuning's memory, little forgetting, and an "
            "adapter of a few MB to serve")


def fitting_settings(arch: Arch, hw: Hardware, tried: list[Estimate]) -> list[Setting]:
    """The settings that make the plan fit the device (fit()), each with the memory per device it
    saves: double quantization of a 4-bit base, gradient checkpointing, the distributed strategy."""
    plan = tried[-1]
    w, n, out = plan.workload, plan.devices, []
    per = " per device" if n > 1 else ""

    def without(**change) -> str:  # the plan's memory per device with a setting changed back
        m = memory(arch, replace(w, **change), hw.kind, hw.activation_factor, hw.runtime_gb, n)
        return f"{m.total / GB:.1f} GB"

    if w.method == "qlora":
        out.append(Setting("adapter.double_quant", True, f"the 4-bit weights' scales quantized too: "
                           f"≈ {without(double_quant=False)} → {_gb(plan)}{per}"))
    if w.checkpointing:
        out.append(Setting("training.gradient_checkpointing", True, "keeps only each block's input for the backward "
                           f"pass: ≈ {without(checkpointing=False)} → {_gb(plan)}{per}, for about a third more "
                           "compute per step"))
    def least(strategy: str) -> str:  # the least memory per device a strategy tried needs (fit(): at one row)
        return _gb(min((e for e in tried if e.workload.strategy == strategy), key=lambda e: e.memory.total))

    if n > 1 and w.strategy == "ddp":
        out.append(Setting("distributed.strategy", "ddp", f"each of the {n} devices holds the whole model "
                           f"({_gb(plan)}) and a share of each batch: the fastest while it fits"))
    elif w.strategy == "fsdp":
        out.append(Setting("distributed.strategy", "fsdp", f"each of the {n} devices holds 1/{n} of the weights, "
                           f"gradients and optimizer states: DDP (a whole copy each) needs ≈ {least('ddp')} per "
                           f"device at least, FSDP ≈ {_gb(plan)}"))
    elif w.strategy == "deepspeed":
        out += [Setting("distributed.strategy", "deepspeed", f"even sharded by FSDP it needs ≈ {least('fsdp')} per "
                        f"device at least; DeepSpeed ZeRO-{w.zero_stage} with CPU offload ≈ {_gb(plan)}, far slower"),
                Setting("distributed.zero_stage", w.zero_stage, "the weights sharded too, not only the gradients and "
                        "optimizer states"),
                Setting("distributed.cpu_offload", w.cpu_offload, f"the shares live in host memory: ≈ "
                        f"{plan.memory.offloaded / GB:.0f} GB of it per process")]
    return out


def _gb(e: Estimate) -> str:
    return f"{e.memory.total / GB:.1f} GB"

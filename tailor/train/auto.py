"""`auto` settings: the learning rate, LoRA rank and alpha, epochs and batch that a job leaves to
Tailor are chosen at the start of training from the model that is actually trained and the data
it trains on, and each choice says why.

The same rules make the advisor's starting settings (tailor/advise/choose.py), so a job the
advisor wrote keeps fitting when its model changes (`--set model.base=...`): a learning rate
chosen for a 7B model is too timid for a 135M one, and the other way round it diverges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tailor.models.catalog import size_label

AUTO = "auto"
KEYS = ("adapter.rank", "adapter.alpha", "training.learning_rate", "training.epochs", "training.batch_size",
        "training.grad_accum")  # the job keys that may be auto
ROWS_PER_STEP_MAX = 16  # rows per optimizer step at most: beyond it, more steps help more than bigger ones
STEPS_PER_EPOCH_MIN = 10  # so that an epoch gives the scheduler and early stopping something to work with


@dataclass(frozen=True)
class Choice:
    key: str  # the job key, e.g. training.learning_rate
    value: float | int
    why: str

    def as_dict(self) -> dict:
        return {"key": self.key, "value": self.value, "why": self.why}


def learning_rate(params: int, kind: str, technique: str = "task") -> Choice:
    """Peak learning rate by the model's size: smaller models take larger steps."""
    b = params / 1e9
    if kind in ("lora", "qlora"):
        lr = 5e-4 if b < 0.5 else 2e-4 if b <= 3 else 1e-4 if b <= 14 else 5e-5
        why = f"LoRA on a {size_label(params)} model: smaller models take larger steps; halve it if the validation " \
              "loss jumps"
    elif kind == "freeze":
        lr = 1e-4 if b < 1 else 5e-5
        why = f"the top blocks' own weights of a {size_label(params)} model train: a tenth of LoRA's rate or less"
    else:
        lr = 5e-5 if b < 0.5 else 2e-5 if b <= 3 else 1e-5
        why = f"every weight of a {size_label(params)} model trains: small steps keep what it knows"
    if technique == "preference":
        lr, why = lr / 20, f"a twentieth of the supervised rate ({why.split(':')[0]}): preference losses need " \
                           "far smaller steps, or the model starts repeating itself"
    return Choice("training.learning_rate", lr, why)


def lora_rank(params: int, examples: int) -> Choice:
    """A small model's layers are narrow, so a rank of 16 costs little; from 1B, 8 holds a task."""
    rank = 16 if params < 1e9 else 8
    why = (f"a {size_label(params)} model has narrow layers: rank 16 adds capacity at little cost" if rank == 16
           else f"a {size_label(params)} model: rank 8 holds a task or a style")
    if examples >= 10_000:
        rank, why = rank * 2, why + f"; doubled for {examples:,} examples"
    return Choice("adapter.rank", rank, why)


def lora_alpha(rank: int) -> Choice:
    return Choice("adapter.alpha", 2 * rank, "alpha = 2 x rank keeps the update's scale steady across ranks")


def epochs(examples: int) -> Choice:
    n = 4.0 if examples < 300 else 3.0 if examples < 2_000 else 2.0 if examples < 20_000 else 1.0
    return Choice("training.epochs", n, f"{examples:,} training examples: fewer examples need more passes; early "
                  "stopping keeps the best validation")


def batch_size(device: str) -> Choice:
    if device == "cpu":
        return Choice("training.batch_size", 2, "rows per micro-step: a CPU gains nothing from more")
    return Choice("training.batch_size", 4, "rows per micro-step: enough to keep a GPU busy")


def grad_accum(rows: int, micro: int, processes: int = 1) -> Choice:
    per_step = max(1, min(ROWS_PER_STEP_MAX, rows // STEPS_PER_EPOCH_MIN))
    accum = max(1, math.ceil(per_step / (micro * processes)))
    return Choice("training.grad_accum", accum, f"{micro * processes * accum} rows per optimizer step: about "
                  f"{STEPS_PER_EPOCH_MIN} steps or more per epoch on {rows:,} rows")


def resolve(values: dict[str, object], *, params: int, kind: str, technique: str, examples: int, rows: int,
            device: str, processes: int) -> list[Choice]:
    """The choices for the keys of `values` ({job key: its value}) that are "auto", in order."""
    out: list[Choice] = []

    def want(key: str) -> bool:
        return values.get(key) == AUTO

    if want("adapter.rank"):
        out.append(lora_rank(params, examples))
    if want("adapter.alpha"):
        rank = out[-1].value if want("adapter.rank") else values["adapter.rank"]
        out.append(lora_alpha(int(rank)))
    if want("training.learning_rate"):
        out.append(learning_rate(params, kind, technique))
    if want("training.epochs"):
        out.append(epochs(examples))
    micro = values.get("training.batch_size")
    if want("training.batch_size"):
        out.append(batch_size(device))
        micro = out[-1].value
    if want("training.grad_accum"):
        out.append(grad_accum(rows, int(micro), processes))
    return out


def values_of(job) -> dict[str, object]:
    """{job key: its value} for KEYS."""
    return {key: getattr(getattr(job, key.split(".")[0]), key.split(".")[1]) for key in KEYS}


def choose(job, *, params: int, examples: int, rows: int, device: str, processes: int = 1) -> list[Choice]:
    """resolve() for a Job."""
    return resolve(values_of(job), params=params, kind=job.adapter.kind, technique=job.technique,
                   examples=examples, rows=rows, device=device, processes=processes)


def applied(job, choices: list[Choice]):
    """The job with the chosen values in place of `auto`, validated again."""
    updates: dict[str, dict] = {}
    for c in choices:
        section, key = c.key.split(".")
        updates.setdefault(section, {})[key] = c.value
    return job.model_copy(update={section: type(getattr(job, section)).model_validate(
        getattr(job, section).model_dump() | keys) for section, keys in updates.items()})

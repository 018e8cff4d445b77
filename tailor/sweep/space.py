"""The search space of a sweep: which job keys vary, and how.

space.yaml maps job keys (as `--set` writes them) to one distribution each:

    training.learning_rate: {log_uniform: [1.0e-4, 3.0e-3]}
    training.epochs: {int: [1, 4]}
    training.warmup_ratio: {uniform: [0.0, 0.2]}
    adapter.rank: {categorical: [8, 16, 32]}
    adapter.lora_top_blocks: {int: [4, 30], step: 2}

Every key is checked against the job schema (a misspelt one is named with the closest valid key),
and each bound or choice is checked as a value of that key on the sweep's own job, so a space that
would make an invalid job fails before the first trial, not in the middle of the night.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from tailor.errors import TailorError
from tailor.spec import SpecError, describe_fields, load_job

KINDS = ("log_uniform", "uniform", "int", "categorical")
EXAMPLE = "training.learning_rate: {log_uniform: [1.0e-4, 3.0e-3]}"


class SpaceError(TailorError, ValueError):
    """A space file that cannot be searched: it names the file, the key and the fix."""


@dataclass(frozen=True)
class Param:
    key: str  # a job key, e.g. training.learning_rate
    kind: str  # one of KINDS
    low: float | None = None
    high: float | None = None
    step: int | None = None  # int only
    log: bool = False  # int only (log_uniform is log for floats)
    choices: tuple = ()  # categorical only

    def suggest(self, trial):
        """This parameter's value for an Optuna trial."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log_uniform")

    def holds(self, value) -> bool:
        """Whether `value` is one this parameter can take (the job's own value, enqueued as the first trial)."""
        if self.kind == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int":
            return (float(value).is_integer() and self.low <= value <= self.high
                    and (int(value) - int(self.low)) % (self.step or 1) == 0)
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"one of {', '.join(map(str, self.choices))}"
        scale = " (log)" if self.kind == "log_uniform" or self.log else ""
        return f"{self.kind} {self.low:g} … {self.high:g}{scale}"


def read_space(path: str | Path, job_file: str | Path) -> list[Param]:
    """The parameters of space.yaml, each checked against the job schema and the job `job_file`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpaceError(f"{path}: file not found; write a space.yaml with one line per job key, e.g. "
                         f"{EXAMPLE} (tailor advise writes one beside its job.yaml)") from None
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"{path}: expected a mapping of job keys to distributions, e.g. {EXAMPLE}")
    problems, params = [], []
    valid = [key for key, *_ in describe_fields()]
    for key, dist in raw.items():
        key = str(key)
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            problems.append(f"{key}: not a job key; " + (f"did you mean '{close[0]}'?" if close else
                                                         "`tailor spec` lists every key"))
            continue
        try:
            params.append(_param(key, dist))
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    problems += [p for param in params for p in _invalid_values(param, job_file)]  # every problem at once
    if problems:
        raise SpaceError(f"{path}: " + "; ".join(problems))
    return params


def _param(key: str, dist) -> Param:
    if not isinstance(dist, dict) or not (set(dist) & set(KINDS)):
        raise ValueError(f"expected one of {', '.join(KINDS)}, e.g. {{log_uniform: [1.0e-4, 3.0e-3]}}, got {dist!r}")
    kind = next(k for k in KINDS if k in dist)
    extra = set(dist) - {kind} - ({"step", "log"} if kind == "int" else set())
    if extra:
        raise ValueError(f"{kind}: unknown option(s) {', '.join(sorted(map(str, extra)))}"
                         + ("; int takes step and log" if kind == "int" else ""))
    values = dist[kind]
    if kind == "categorical":
        if not isinstance(values, list) or not values:
            raise ValueError("categorical: give a non-empty list of values, e.g. {categorical: [8, 16, 32]}")
        if len(set(map(repr, values))) < len(values):
            raise ValueError(f"categorical: {values} repeats a value")
        return Param(key, kind, choices=tuple(values))
    if (not isinstance(values, list) or len(values) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values)):
        raise ValueError(f"{kind}: give [low, high] as two numbers, got {values!r}")
    low, high = (float(v) for v in values)
    if not low < high:
        raise ValueError(f"{kind}: low {low:g} must be below high {high:g}")
    if kind == "log_uniform" and low <= 0:
        raise ValueError(f"log_uniform: low must be above 0, got {low:g}; use uniform for a range from 0")
    if kind == "int":
        step, log = dist.get("step", 1), dist.get("log", False)
        if not (low.is_integer() and high.is_integer()):
            raise ValueError(f"int: bounds must be whole numbers, got [{low:g}, {high:g}]")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"int: step must be a whole number from 1, got {step!r}")
        if not isinstance(log, bool) or (log and (step != 1 or low < 1)):
            raise ValueError("int: log: true needs step 1 and a low bound from 1")
        return Param(key, kind, low, high, step=step, log=log)
    return Param(key, kind, low, high)


def _invalid_values(param: Param, job_file) -> list[str]:
    """Each extreme or choice of `param` set on the job: what the schema says of the ones it refuses."""
    values = list(param.choices) if param.kind == "categorical" else [param.low, param.high]
    if param.kind == "int":
        values = [int(v) for v in values]
    problems = []
    for value in values:
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
        try:
            load_job(job_file, [f"{param.key}={text}"])
        except SpecError as exc:
            problems.append(f"{param.key} = {value!r} is not a valid value ({'; '.join(exc.problems)})")
    return problems


def around(start: dict) -> dict:
    """A space centred on starting settings ({job key: value}, the advisor's): the learning rate from
    a third to three times, an epoch less and more, half and double the LoRA rank and alpha, the
    trained top blocks two fewer to two more, a layer-wise decay below 1 from 0.1 lower to 1."""
    space: dict = {}
    lr = start.get("training.learning_rate")
    if _number(lr):
        space["training.learning_rate"] = {"log_uniform": [_round(lr / 3), _round(lr * 3)]}
    epochs = start.get("training.epochs")
    if _number(epochs) and not start.get("training.max_steps"):
        e = max(1, round(epochs))
        space["training.epochs"] = {"int": [max(1, e - 1), e + 1]}
    if start.get("adapter.kind") in ("lora", "qlora"):
        for key in ("adapter.rank", "adapter.alpha"):
            v = start.get(key)
            if _number(v) and v >= 2:
                space[key] = {"categorical": [int(v // 2), int(v), int(v * 2)]}
    for key in ("adapter.lora_top_blocks", "adapter.train_top_blocks"):
        k = start.get(key)
        if _number(k) and k >= 1:
            space[key] = {"int": [max(1, int(k) - 2), int(k) + 2]}
    decay = start.get("training.layer_lr_decay")
    if _number(decay) and decay < 1:
        space["training.layer_lr_decay"] = {"uniform": [round(max(0.5, decay - 0.1), 2), 1.0]}
    return space


def space_yaml(space: dict) -> str:
    """A space as space.yaml writes it: one line per key."""
    return "".join(f"{key}: {yaml.safe_dump(dist, default_flow_style=True).strip()}\n" for key, dist in space.items())


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _round(x: float) -> float:
    """Two significant digits: a bound a person would write."""
    return float(f"{x:.2g}") if x > 0 and math.isfinite(x) else x

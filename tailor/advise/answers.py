"""The advisor's questions and a user's answers: typed, defaulted, unknown keys rejected, like a job file.

The same answers come from a YAML file (`tailor advise --answers answers.yaml`), from flags, or
from the questions asked in a terminal (tailor/cli.py asks them in the order of QUESTIONS).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tailor.spec import SpecError

UseCase = Literal["jargon", "localization", "voice", "compliance", "moderation", "accuracy", "general"]
Stage = Literal["exploration", "market-test", "pilot", "production"]
Expertise = Literal["none", "some", "expert"]
MethodAnswer = Literal["auto", "lora", "qlora", "full", "freeze"]

USE_CASES = {
    "jargon": "domain jargon: the model must understand and use an industry's terms (legal, medical, finance, "
              "a product line)",
    "localization": "language localization: a language, dialect or regional usage the model should master",
    "voice": "brand voice or response style: answers in a set tone, format and length",
    "compliance": "compliance: answers that follow rules (what may be said, privacy, disclaimers)",
    "moderation": "content moderation: flag or classify user content against a policy",
    "accuracy": "accuracy on one well-defined task (extraction, classification, routing)",
    "general": "a general assistant: broad questions, no specialization",
}
STAGES = {
    "exploration": "exploring where AI could help; no defined task yet",
    "market-test": "a quick test of an idea in the market",
    "pilot": "a pilot or proof of concept with a short life",
    "production": "a product or process that will run for a long time",
}


class DataAnswers(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="Data files, a folder of them, or a prepared folder (profiled with "
                             "tailor prepare).")
    examples: int | None = Field(None, ge=0, description="Without a path: how many training examples (conversations) "
                                 "you have.")
    tokens_per_example: float = Field(256, gt=0, description="Without a path: typical length of one example, in tokens "
                                      "(~0.75 words each).")
    preference_pairs: int = Field(0, ge=0, description="Pairs of a better and a worse answer to the same prompt.")
    tasks: int = Field(1, ge=1, description="Distinct tasks in the data (routing, answering, summarizing …).")
    staged: bool = Field(False, description="The tasks build on each other and should be learnt one after another.")
    domain_text_tokens: int = Field(0, ge=0, description="Unlabelled domain documents (manuals, policies), in tokens.")
    base_score: float | None = Field(
        None, ge=0, le=1, description="The base model's score on a validation sample of your task (0-1; tailor eval "
        "prints it), if you measured it.")


class ComputeAnswers(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field("local", description="'local' (this machine, measured) or a GPU from the hardware table "
                        "(t4, l4, a10g, rtx-4090, l40s, a100-40gb, a100-80gb, h100-80gb, h200, b200).")
    count: int = Field(1, ge=1, description="How many of them on each machine.")
    nodes: int = Field(1, ge=1, description="How many machines (each with `count` of them), launched together "
                       "with torchrun.")

    @property
    def devices(self) -> int:
        """Every device of every machine: the processes a run has."""
        return self.count * self.nodes


class Answers(BaseModel):
    model_config = ConfigDict(extra="forbid")

    use_case: UseCase = Field("voice", description="What the model is for: " + "; ".join(
        f"{k} = {v}" for k, v in USE_CASES.items()))
    goal: str = Field("", description="One sentence on what the model should do, for the report.")
    languages: list[str] = Field(["en"], min_length=1, description="Languages the model must read and write "
                                 "(ISO 639-1 codes).")
    data: DataAnswers = Field(default_factory=DataAnswers)
    compute: ComputeAnswers = Field(default_factory=ComputeAnswers)
    offline: bool | None = Field(None, description="true: the machine that trains cannot download models: only those "
                                 "already here are recommended; false: it can; null: find out when it is this machine "
                                 "(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set, or the hub not answering within 2 s).")
    local_models: list[str] = Field([], description="Model folders on this machine (config.json, *.safetensors): each "
                                    "counts as the catalog model of its shape, here without a download.")
    budget_usd: float | None = Field(None, ge=0, description="Money for compute, in US dollars (null: no limit given).")
    deadline_hours: float | None = Field(None, gt=0, description="Hours the training may take at most "
                                         "(null: no deadline).")
    expertise: Expertise = Field("some", description="In-house machine-learning expertise: none, some, expert.")
    stage: Stage = Field("production", description="Project stage: " + "; ".join(
        f"{k} = {v}" for k, v in STAGES.items()))
    commercial: bool = Field(True, description="The model will be used commercially (its licence must allow that).")
    method: MethodAnswer = Field(
        "auto", description="What trains. auto: LoRA, with a 4-bit base (QLoRA) where LoRA does not fit the "
        "devices; lora, qlora, full (every weight: sharded across several devices where one cannot hold it) or "
        "freeze (the top blocks).")

    @model_validator(mode="after")
    def _data_given(self):
        if self.data.path is None and self.data.examples is None:
            raise ValueError("data: give data.path (files or a prepared folder) or data.examples (how many you have)")
        return self


def load_answers(path: str | Path | None = None, overrides: dict | None = None) -> Answers:
    """Answers from a YAML file, with flag values on top; every problem named with its key."""
    raw: dict = {}
    source = str(path) if path else "answers"
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise SpecError(source, [f"cannot read the answers file: {e.strerror}"]) from e
        except yaml.YAMLError as e:
            raise SpecError(source, [f"not valid YAML: {e}"]) from e
        if not isinstance(raw, dict):
            raise SpecError(source, [f"expected a mapping of answers, got {type(raw).__name__}"])
        data = raw.get("data")
        if isinstance(data, dict) and isinstance(data.get("path"), str) and not Path(data["path"]).is_absolute():
            data["path"] = str(Path(path).parent / data["path"])  # relative to the answers file, as in job files
        if isinstance(raw.get("local_models"), list):
            raw["local_models"] = [str(Path(path).parent / p) if isinstance(p, str) else p for p in raw["local_models"]]
    for key, value in (overrides or {}).items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    try:
        return Answers.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(answers)"
            problems.append(f"{key}: {err['msg']}" + (f" (got {err['input']!r})" if err["type"] != "missing" and
                                                       not isinstance(err["input"], dict) else ""))
        raise SpecError(source, problems) from e

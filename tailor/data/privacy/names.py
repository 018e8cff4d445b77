"""Names in short texts: when a PERSON finding of NER stands, and when it is an ordinary word.

spaCy's small English NER reads a name off the word and its context. A short text (five words or
fewer: a one-line answer, a label, a title) gives it no context, and there its capitals say
nothing: the first word of any text is capitalized, and so is every word of a title. So it tags
ordinary words as people: on the trivia of the ChatterBot corpus, "Brown" (the rarest M&M
colour), "Parent Trap", "Carbon Dioxide" and "Kindergarten Teacher" became `<PERSON>`, and 46 of
260 answers were nothing but that placeholder. In a short text, then, a PERSON finding stands only
where something beyond NER says it is a name (_says_a_name):
  - a cue just before it: "I'm", "my name is", "this is", "call me", "Dear", "Hi", "Thanks,",
    "Regards,", "Mr.", "Dr." (_CUE);
  - the text before it in the record (the question it answers) asks for a person: it opens with
    who, whom or whose, or asks for a name ("What name is the booking under?" / "Priya Nair");
  - a capital that means something: a capitalized word that does not start the text, in a text
    that is not title-cased ("ask Will");
  - a capitalized word that is no ordinary English word: rarer than once per million words in
    wordfreq's English list (Zipf < 3: "Nair", "Okafor", "Vermeer", "Groening"). An ordinary word
    ("Brown", "Grace", "Hamlet", "Nixon") may be a name, but then the text does not say so.
A finding written in lower case in a short text has neither a capital nor context: only a cue or
the question keeps it. Longer texts give NER context, and its findings there stand as they are.

The cost, measured on tests/data/names_labelled.jsonl (bench/names_precision.py, docs/data.md): a
full name of ordinary words standing alone, with no question before it ("Wei Zhang", "Bill
Clinton"), is no longer found, nor a lone ordinary first name ("Grace").
"""

from __future__ import annotations

import functools
import re

from tailor.data.privacy.spans import _Span

SHORT_TEXT_WORDS = 5  # a text of this many words or fewer gives NER no context to read a name from
COMMON_ZIPF = 3.0  # wordfreq's Zipf scale: 3 = once per million words, the usual edge of "rare"

# Words that may stay lower case in a title ("Girl with a Pearl Earring", "Leonardo da Vinci").
_MINOR = frozenset("a an the and or of in on at to for with by from vs de da di del van von la le".split())
_WORD = re.compile(r"[^\W\d_]+")
# A person is named right after these, at the end of what precedes the finding.
_CUE = re.compile(
    r"\b(?:mr|mrs|ms|miss|mx|dr|prof|sir|madam|dame|hi|hello|hey|dear|thanks|thank you|cheers|regards|best|"
    r"wishes|sincerely|yours|i['’]?m|i am|my name is|name['’]?s|name is|this is|call me)[\s.,:;!-]*$",
    re.IGNORECASE)
# A question for a person: who/whom/whose opening it (or after a preposition: "To whom"), or a name.
# Not "who" inside a clause: "What do you call someone who makes bread?" asks for a word.
_ASKS_FOR_A_PERSON = re.compile(r"(?:^|[.?!:]\s+|\b(?:to|by|for|with|from|of|about)\s+)(?:who|whom|whose)\b|\bname\b",
                                re.IGNORECASE)


def _plausible_names(text: str, spans: list[_Span], before: str | None = None) -> list[_Span]:
    """`spans` without the PERSON findings of a short text that nothing but NER calls a name (the
    module doc); `before` is the text before this one in its record (the question it answers)."""
    if not spans or len(text.split()) > SHORT_TEXT_WORDS:
        return spans
    if before is not None and _ASKS_FOR_A_PERSON.search(before):
        return spans
    title_cased = _title_cased(text)
    return [s for s in spans if s.entity != "PERSON" or _says_a_name(text, s, title_cased)]


def _says_a_name(text: str, span: _Span, title_cased: bool) -> bool:
    if _CUE.search(text[:span.start]):
        return True
    first = _WORD.search(text)
    for m in _WORD.finditer(text, span.start, span.end):
        word = m.group()
        if not word[0].isupper():
            continue  # no capital: it says nothing either way
        if not title_cased and m.start() != first.start():
            return True  # capitalized where an ordinary word would not be
        if _zipf(word.lower()) < COMMON_ZIPF:
            return True  # not an ordinary English word
    return False


def _title_cased(text: str) -> bool:
    """Every word capitalized but the small ones titles leave in lower case ("Parent Trap")."""
    return all(w[0].isupper() or w.lower() in _MINOR for w in _WORD.findall(text))


@functools.lru_cache(maxsize=65536)
def _zipf(word: str) -> float:
    from wordfreq import zipf_frequency  # its English list loads on first use

    return zipf_frequency(word, "en")

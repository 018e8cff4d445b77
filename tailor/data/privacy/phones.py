"""Phone numbers, last (the batch path).

libphonenumber scans a text once per region, the costly part of the pattern path
(docs/performance.md). The batch path looks for phone numbers after the other types, scanning only
the regions where a number could still change the output:
- all the digits of a number lie in one run (_PHONE_RUN), and each region's numbers have a
  fewest number of digits (_fewest_phone_digits): where the longest run has fewer than six
  (order numbers, postcodes, years), only a German number can be;
- a run inside a span already found, with at least a phone number's confidence (a card, an
  IBAN), cannot add one: a number there merges into that span, which is as long or longer and
  as sure or surer (_merge_overlaps keeps its type), unless the number could begin before the
  span or run on past it (_may_reach_past).
anonymize() runs the full scan on every text; the tests compare the two paths.
"""

from __future__ import annotations

import functools
import re

from tailor.data.privacy.engine import _phone_recognizer, _phone_regions_all, _presidio_extensions
from tailor.data.privacy.spans import _Span

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


def _phones(text: str, found: list[_Span], language: str, score_threshold: float) -> list:
    """Presidio's phone-number results in `text`, from the regions that could change the output
    once the spans `found` are in it (module doc)."""
    covering = [s for s in found if s.score >= _presidio_extensions().ValidPhoneRecognizer.SCORE]
    regions = _phone_regions(_phone_regions_all(), _longest_phone_run(text, covering))
    if not regions:
        return []
    results = _phone_recognizer(language, regions).analyze(text, ["PHONE_NUMBER"])
    return [r for r in results if r.score >= score_threshold]


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

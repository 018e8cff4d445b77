"""A finding as a span of the text, and one span per group of overlapping findings."""

from __future__ import annotations

from typing import NamedTuple


class _Span(NamedTuple):
    start: int
    end: int
    entity: str
    score: float


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

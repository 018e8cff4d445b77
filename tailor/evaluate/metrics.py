"""Scores of generated answers against references.

Text overlap comes from the libraries the field reports with: ROUGE-L from `rouge-score` (with a
tokenizer that keeps every script's letters; its default drops all but a-z and scores Greek or
Chinese 0), chrF and BLEU from `sacrebleu` (corpus-level, its default tokenization). Exact match
and the label metrics are definitions short enough to state here. All scores are 0-1 (BLEU and
chrF divided by 100), so gains read alike whatever the metric.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

_WORD = re.compile(r"\w+")
# Answers from a small label set ("refund", "shipping", "yes") are classified, not written: they
# get accuracy and macro-F1 when the references hold at most this many distinct values of at most
# MAX_LABEL_WORDS words, and each label is seen at least twice on average.
MAX_LABELS = 20
MAX_LABEL_WORDS = 3


def normalize(text: str) -> str:
    """Lower case, NFKC, punctuation dropped, white space collapsed: "The answer: Paris!" and
    "the answer paris" compare equal."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return 0.0
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(references)


class _Words:
    """rouge-score's tokenizer interface: lower-cased words of any script."""

    def tokenize(self, text: str) -> list[str]:
        return normalize(text).split()


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference (longest common subsequence of
    words)."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], tokenizer=_Words())
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def chrf(predictions: list[str], references: list[str]) -> float:
    """Corpus chrF (character n-gram F-score), 0-1."""
    import sacrebleu

    return sacrebleu.corpus_chrf(predictions, [references]).score / 100 if references else 0.0


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU with sacrebleu's standard tokenization, 0-1. With effective order: n-gram orders
    that no answer is long enough to have are left out, so one-word answers that are all right
    score 1, not 0 (answers of four words or more score as plain BLEU)."""
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True).corpus_score(predictions, [references]).score / 100 if references else 0.0


def is_label_set(references: list[str]) -> bool:
    labels = {normalize(r) for r in references}
    return (0 < len(labels) <= MAX_LABELS and len(references) >= 2 * len(labels)
            and all(0 < len(label.split()) <= MAX_LABEL_WORDS for label in labels))


def label_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over the reference labels (normalized). A prediction that is no
    label at all counts as wrong for its reference's class and as a false positive for none."""
    refs = [normalize(r) for r in references]
    preds = [normalize(p) for p in predictions]
    labels = sorted(set(refs))
    true_pos, predicted, actual = Counter(), Counter(preds), Counter(refs)
    for p, r in zip(preds, refs):
        if p == r:
            true_pos[r] += 1
    f1s = []
    for label in labels:
        precision = true_pos[label] / predicted[label] if predicted[label] else 0.0
        recall = true_pos[label] / actual[label]
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {"label_accuracy": sum(true_pos.values()) / len(refs) if refs else 0.0,
            "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}


def text_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Every generation metric that applies: exact match, ROUGE-L, chrF and BLEU always; accuracy
    and macro-F1 when the references are labels."""
    scores = {"exact_match": exact_match(predictions, references),
              "rouge_l": _mean(rouge_l(predictions, references)),
              "chrf": chrf(predictions, references),
              "bleu": bleu(predictions, references)}
    if is_label_set(references):
        scores.update(label_scores(predictions, references))
    return scores


def contains_answer(reply: str, answers: list[str]) -> bool:
    """Whether any accepted answer occurs in the reply as whole words ("paris" in "It is Paris.",
    not "56" in "560")."""
    padded = f" {normalize(reply)} "
    return any(f" {normalize(a)} " in padded for a in answers if normalize(a))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0

"""The gate: whether a tuned model is good enough to ship, from the evaluation's numbers.

Each configured threshold is one check; the verdict passes when every check that could be made
passes. A check that could not be made (retention off, a label metric on free text) is listed as
skipped with the reason, never silently passed.
"""

from __future__ import annotations

from tailor.spec import GateSpec

_EPS = 1e-9  # a gain of exactly min_gain passes, whatever the rounding


def verdict(base: dict, tuned: dict, retention: dict | None, gate: GateSpec) -> dict:
    checks = []
    if gate.min_gain is not None:
        m = gate.metric
        if m not in base or m not in tuned:
            checks.append(_skipped(f"gain on {m}", f"{m} was not measured: it needs test answers from a small "
                                   "label set; set eval.gate.metric to rouge_l, chrf, bleu, exact_match or "
                                   "token_accuracy"))
        else:
            gain = tuned[m] - base[m]
            checks.append(_check(f"gain on {m}", gain, f"≥ {gate.min_gain:+.3f}", gain >= gate.min_gain - _EPS,
                                 f"{m} {base[m]:.3f} → {tuned[m]:.3f} ({gain:+.3f})"))
    if gate.max_retention_drop is not None:
        if retention is None:
            checks.append(_skipped("general-question drop", "eval.retention is false"))
        else:
            drop = retention["qa_drop"]
            checks.append(_check("general-question drop", drop, f"≤ {gate.max_retention_drop:.3f}",
                                 drop <= gate.max_retention_drop + _EPS,
                                 f"general questions {retention['base']['qa_accuracy']:.1%} → "
                                 f"{retention['tuned']['qa_accuracy']:.1%}"))
    if gate.max_perplexity_increase is not None:
        if retention is None:
            checks.append(_skipped("general-text perplexity rise", "eval.retention is false"))
        else:
            rise = retention["perplexity_increase"]
            checks.append(_check("general-text perplexity rise", rise, f"≤ {gate.max_perplexity_increase:+.1%}",
                                 rise <= gate.max_perplexity_increase + _EPS,
                                 f"perplexity {retention['base']['text_perplexity']:.2f} → "
                                 f"{retention['tuned']['text_perplexity']:.2f} ({rise:+.1%})"))
    failed = [c for c in checks if c["passed"] is False]
    return {"passed": not failed, "checks": checks,
            "reasons": [f"{c['name']}: {c['detail']}, needs {c['threshold']}" for c in failed]}


def _check(name: str, value: float, threshold: str, passed: bool, detail: str) -> dict:
    return {"name": name, "value": value, "threshold": threshold, "passed": bool(passed), "detail": detail}


def _skipped(name: str, why: str) -> dict:
    return {"name": name, "value": None, "threshold": None, "passed": None, "detail": f"skipped: {why}"}

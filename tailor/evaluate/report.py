"""The evaluation summary as people read it: a table in the terminal."""

from __future__ import annotations

from rich.table import Table

# Higher is better for all but these.
LOWER_IS_BETTER = {"loss", "perplexity"}
LABELS = {"loss": "answer loss", "perplexity": "answer perplexity", "token_accuracy": "token accuracy",
          "exact_match": "exact match", "rouge_l": "ROUGE-L", "chrf": "chrF", "bleu": "BLEU",
          "label_accuracy": "label accuracy", "macro_f1": "macro-F1"}


def summary_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """(measure, base, tuned, change) rows: the task metrics, then retention."""
    rows = []
    base, tuned = summary["base"], summary["tuned"]
    for key in tuned:
        if base.get(key) is None or tuned.get(key) is None:
            continue
        change = tuned[key] - base[key]
        rows.append((LABELS.get(key, key), f"{base[key]:.3f}", f"{tuned[key]:.3f}", f"{change:+.3f}"))
    r = summary.get("retention")
    if r:
        rows.append(("general questions", f"{r['base']['qa_accuracy']:.1%}", f"{r['tuned']['qa_accuracy']:.1%}",
                     f"{-r['qa_drop'] * 100:+.1f} pts"))
        rows.append(("general-text perplexity", f"{r['base']['text_perplexity']:.2f}",
                     f"{r['tuned']['text_perplexity']:.2f}", f"{r['perplexity_increase']:+.1%}"))
    return rows


def gate_lines(summary: dict) -> list[str]:
    gate = summary["gate"]
    lines = [f"gate: {'PASSED' if gate['passed'] else 'FAILED'}"]
    for c in gate["checks"]:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[c["passed"]]
        lines.append(f"  {mark} {c['name']}: {c['detail']}" + (f" (needs {c['threshold']})" if c["threshold"] else ""))
    return lines


def summary_table(summary: dict) -> Table:
    table = Table(title=f"{summary['data']['examples']} test conversations, greedy decoding, "
                        f"≤ {summary['decoding']['max_new_tokens']} new tokens")
    for col, justify in (("measure", "left"), ("base", "right"), ("tuned", "right"), ("change", "right")):
        table.add_column(col, justify=justify)
    for row in summary_rows(summary):
        table.add_row(*row)
    return table

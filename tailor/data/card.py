"""The data card: what went in, what came out, and whether it is worth fine-tuning on.

card.json is for programs (the advisor reads it), card.md for people and pull requests, card.html
for a browser (Plotly charts with their JavaScript embedded: no network needed). The card renders
what prepare measured (counts, the base model's perplexity) and what it reads off the kept records
itself (lengths, languages, vocabulary); it never loads a model.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from tailor.data.clean import texts_of
from tailor.data.store import column, from_row

_WORD = re.compile(r"[a-z][a-z'-]{2,}")
_PLACEHOLDER = re.compile(r"<[A-Z_]+>")
TERM_SAMPLE = 10_000  # records scanned for distinctive terms
LANGUAGE_SAMPLE = 2_000  # records whose language is detected: enough for the shares, 200 µs each
# Above this share of answers changed by anonymization, the verdict warns: the model learns to write
# the placeholder where those answers had a name. In trivia the names are the answers, mostly public
# ones and words NER mistook for names (11 % of the ChatterBot trivia answers, 20 % before short
# answers were checked); in the bundled support chat, agents greet customers by name (11 %).
CHANGED_ANSWERS_WARNING = 0.05


def write_card(folder: Path, ds, split_of: list[str], stats: dict, spec, model: str) -> dict:
    card = build_card(ds, split_of, stats, spec, model)
    (folder / "card.json").write_text(json.dumps(card, indent=1, ensure_ascii=False), encoding="utf-8")
    (folder / "card.md").write_text(card_markdown(card), encoding="utf-8")
    if spec.card.html:
        (folder / "card.html").write_text(card_html(card), encoding="utf-8")
    return card


def build_card(ds, split_of: list[str], stats: dict, spec, model: str) -> dict:
    tokens, turns = column(ds, "n_tokens"), column(ds, "n_turns")
    train_idx = [i for i, s in enumerate(split_of) if s == "train"]
    counts = {k: stats[k] for k in ("read", "kept", "rejected", "filtered")}
    counts["duplicates"] = sum(stats["duplicates"].values())
    counts["adds_up"] = (counts["read"]
                         == counts["kept"] + counts["rejected"] + counts["duplicates"] + counts["filtered"])
    clusters = stats.get("cluster_examples", [])  # previews of anonymized records
    card = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "sources": stats["sources"],
        "counts": counts,
        "filter_reasons": stats["filter_reasons"],
        "rejects_by_stage": stats["rejects_by_stage"],
        "duplicates": {**stats["duplicates"], "near_threshold": spec.dedup.threshold, "clusters": clusters},
        "privacy": stats.get("privacy", {"enabled": False}),
        "splits": _splits(ds, split_of, tokens),
        "kinds": dict(Counter(column(ds, "kind")).most_common()),
        "tasks": dict(Counter(t or "(none)" for t in column(ds, "task")).most_common()),
        "languages": languages(ds),
        "tokens": _distribution(tokens),
        "turns": {str(k): v for k, v in sorted(Counter(turns).items())},
        "training_tokens_per_epoch": sum(tokens[i] for i in train_idx),
        "leakage": stats["leakage"],
        "relevance": distinctive_terms(ds),
        "perplexity": stats.get("perplexity"),  # measured by prepare (tailor/data/perplexity.py)
        "seconds": stats["seconds"],  # wall time per stage, the card's own excluded
    }
    card["verdict"] = verdict(card)
    warning = privacy_warning(card["privacy"])
    if warning:
        card["verdict"]["privacy"] = warning
    return card


def _splits(ds, split_of: list[str], tokens: list[int]) -> dict:
    tasks = column(ds, "task")
    out = {}
    for name in ("train", "validation", "test"):
        idx = [i for i, s in enumerate(split_of) if s == name]
        out[name] = {"records": len(idx), "tokens": sum(tokens[i] for i in idx),
                     "tasks": dict(Counter(tasks[i] or "(none)" for i in idx).most_common())}
    return out


def _distribution(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pct(p):
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    edges = _edges(ordered[-1])
    hist = [0] * (len(edges) - 1)
    for v in values:
        hist[min(len(hist) - 1, max(0, _bucket(edges, v)))] += 1
    return {"count": len(values), "mean": round(statistics.fmean(values), 1), "min": ordered[0], "p50": pct(0.5),
            "p90": pct(0.9), "p99": pct(0.99), "max": ordered[-1], "histogram": {"edges": edges, "counts": hist}}


def _edges(top: int, bins: int = 20) -> list[int]:
    width = max(1, math.ceil((top + 1) / bins))
    return [i * width for i in range(bins + 1)]


def _bucket(edges: list[int], v: int) -> int:
    return v // (edges[1] - edges[0])


def _spread(ds, size: int):
    """Up to `size` records spread over the whole data, not the first file's."""
    step = max(1, -(-len(ds) // size))
    return ds.select(range(0, len(ds), step))


def languages(ds) -> dict:
    """Records per detected language (py3langid, offline), on up to LANGUAGE_SAMPLE records."""
    import py3langid

    counts: Counter = Counter()
    for row in _spread(ds, LANGUAGE_SAMPLE):
        body = "\n".join(texts_of(from_row(row)))
        counts[py3langid.classify(body[:2000])[0] if body.strip() else "(empty)"] += 1
    return dict(counts.most_common(10))


def distinctive_terms(ds, top: int = 20) -> dict:
    """Words this data uses far more often than general English does (wordfreq's frequencies):
    the domain's jargon, which a fine-tune can teach and a base model may not know."""
    from wordfreq import zipf_frequency

    counts: Counter = Counter()
    sample = _spread(ds, TERM_SAMPLE)
    n = len(sample)
    for row in sample:
        for text in texts_of(from_row(row)):
            counts.update(_WORD.findall(_PLACEHOLDER.sub(" ", text).lower()))
    total = sum(counts.values())
    if not total:
        return {"terms": [], "words": 0}
    floor = max(3, n // 1000)
    scored = []
    for word, c in counts.items():
        if c < floor:
            continue
        per_million = c / total * 1e6
        general = 10 ** (zipf_frequency(word, "en") - 3)  # Zipf = log10(occurrences per billion words)
        scored.append((math.log2((per_million + 1) / (general + 1)), word, c, general))
    scored.sort(reverse=True)
    terms = [{"term": w, "count": c, "per_million": round(c / total * 1e6, 1), "general_per_million": round(g, 2),
              "ratio": round(2 ** s, 1)} for s, w, c, g in scored[:top] if s >= 3]
    share = sum(t["count"] for t in terms) / total
    return {"terms": terms, "words": total, "records_scanned": n, "distinctive_share": round(share, 4)}


def verdict(card: dict) -> dict:
    """Plain sentences on sufficiency and relevance, from the numbers above."""
    n = card["splits"]["train"]["records"]
    c = card["counts"]
    if n < 50:
        sufficient = (f"Too few: {n} training records. Below about 50 a fine-tune mostly memorizes; collect "
                      "more, or try prompting with a few examples first.")
    elif n < 500:
        sufficient = (f"Enough to teach a format, a tone or a narrow behaviour ({n} training records); for new "
                      "knowledge or a broad task, aim for thousands.")
    else:
        sufficient = f"Enough for a task-specific fine-tune ({n:,} training records)."
    dup_share = c["duplicates"] / c["read"] if c["read"] else 0
    if dup_share >= 0.2:
        sufficient += f" {dup_share:.0%} of the input was duplicated: the unique data is smaller than it looked."

    relevant = []
    terms = card["relevance"]["terms"]
    if terms:
        relevant.append("The data has its own vocabulary: " + ", ".join(t["term"] for t in terms[:8]) + ".")
    else:
        relevant.append("No distinctive vocabulary: the text reads like general English; a fine-tune would teach "
                        "format and tone rather than domain knowledge.")
    ppl = card["perplexity"]
    if ppl:
        p = ppl["perplexity"]
        if p < 4:
            relevant.append(f"The base model already predicts these answers well (perplexity {p}): try prompting "
                            "or retrieval before fine-tuning.")
        elif p > 15:
            relevant.append(f"The base model finds these answers surprising (perplexity {p}): fine-tuning has "
                            "a lot to teach.")
        else:
            relevant.append(f"The base model half-knows these answers (perplexity {p}): fine-tuning should sharpen "
                            "them.")
    langs = card["languages"]
    total = sum(langs.values())
    if total and max(langs.values()) / total < 0.9:
        relevant.append("Several languages: " + ", ".join(f"{k} {v / total:.0%}" for k, v in list(langs.items())[:4])
                        + "; pick a base model that speaks all of them.")
    return {"sufficient": sufficient, "relevant": " ".join(relevant)}


def privacy_warning(p: dict) -> str | None:
    """A sentence for the verdict when anonymization changed more than CHANGED_ANSWERS_WARNING of
    the answers (assistant turns trained on): what the model will learn from them, and the fix for
    public values (trivia: names of public figures, words taken for names) and for private ones
    (support chat: customers' names); None otherwise."""
    answers, changed = p.get("answers"), p.get("answers_changed", 0)
    if not answers or changed / answers <= CHANGED_ANSWERS_WARNING:
        return None
    text = f"Personal data was found in {changed:,} of {answers:,} answers ({changed / answers:.0%})"
    if p["strategy"] == "drop":
        text += ", and their records dropped (privacy.strategy: drop)."
    else:
        learns = "fake names" if p["strategy"] == "pseudonym" else "to write '<PERSON>'"
        text += f": the model learns {learns} where those answers had a name"
        if p.get("answers_emptied"):
            fate = "kept (privacy.keep_emptied_answers)" if p.get("emptied_kept") else "their records left out"
            text += f"; {p['answers_emptied']:,} answers became nothing but placeholders, {fate}"
        text += "."
    text += (" If they are public (trivia and encyclopedic answers: public figures, titles, words taken for names), "
             "keep them: edit the review file `tailor prepare` writes beside the prepared folder and prepare again "
             "with --allow-from it, or list them in privacy.allow; or narrow privacy.entities; or set "
             "privacy.ner: false for data with no private people in it.")
    if p["strategy"] != "pseudonym":
        text += " If they are private (your customers'), privacy.strategy: pseudonym puts consistent fake names there."
    return text


def summary_lines(card: dict) -> list[str]:
    """The few lines `tailor prepare` and the quickstart print."""
    c, s = card["counts"], card["splits"]
    lines = [
        f"records: {c['read']:,} read = {c['kept']:,} kept + {c['rejected']:,} rejected + {c['duplicates']:,} "
        f"duplicates ({card['duplicates'].get('exact', 0):,} exact, {card['duplicates'].get('near', 0):,} near) "
        f"+ {c['filtered']:,} filtered",
        f"splits: train {s['train']['records']:,} · validation {s['validation']['records']:,} · "
        f"test {s['test']['records']:,}; leakage: {card['leakage']['shared_prompts']} shared prompts, "
        f"{card['leakage']['near_duplicates_across_splits']} near duplicates across splits",
    ]
    p = card["privacy"]
    if p.get("entities") is not None:
        found = ", ".join(f"{k} {v}" for k, v in p["entities"].items()) or "none found"
        answers = (f"; {p['answers_changed']:,} of {p['answers']:,} answers changed, {p['answers_emptied']:,} "
                   "left as nothing but placeholders" if "answers" in p else "")
        lines.append(f"personal data ({p['strategy']}): {p['records_with_pii']:,} records; {found}{answers}")
    t = card["tokens"]
    if t.get("count"):
        lines.append(f"tokens per record: median {t['p50']}, p90 {t['p90']}, max {t['max']}; "
                     f"{card['training_tokens_per_epoch']:,} training tokens per epoch")
    if card["perplexity"]:
        lines.append(f"base model perplexity on {card['perplexity']['records']} training answers: "
                     f"{card['perplexity']['perplexity']}")
    lines.append("sufficient? " + card["verdict"]["sufficient"])
    lines.append("relevant? " + card["verdict"]["relevant"])
    if card["verdict"].get("privacy"):
        lines.append("personal data? " + card["verdict"]["privacy"])
    return lines


def card_markdown(card: dict) -> str:
    c = card["counts"]
    out = ["# Data card", "", f"Prepared {card['created']} for `{card['model']}`.", "",
           "## Verdict", "", f"- **Sufficient?** {card['verdict']['sufficient']}",
           f"- **Relevant?** {card['verdict']['relevant']}",
           *([f"- **Personal data?** {card['verdict']['privacy']}"] if card["verdict"].get("privacy") else []), "",
           "## Counts", "", "| stage | records |", "|---|---:|", f"| read | {c['read']:,} |",
           f"| rejected (unreadable or invalid) | {c['rejected']:,} |",
           f"| filtered | {c['filtered']:,} |",
           f"| exact duplicates removed | {card['duplicates'].get('exact', 0):,} |",
           f"| near duplicates removed | {card['duplicates'].get('near', 0):,} |",
           f"| **kept** | **{c['kept']:,}** |", "",
           f"The counts add up: {'yes' if c['adds_up'] else 'NO'} (read = kept + rejected + duplicates + filtered). "
           "Every record not kept is in `rejects.jsonl` with its source line and the reason.", ""]
    if card["filter_reasons"]:
        out += ["Filtered because: " + "; ".join(f"{k} ({v})" for k, v in card["filter_reasons"].items()), ""]
    out += ["## Splits", "", "| split | records | tokens | tasks |", "|---|---:|---:|---|"]
    for name, s in card["splits"].items():
        out.append(f"| {name} | {s['records']:,} | {s['tokens']:,} | "
                   + ", ".join(f"{k} {v}" for k, v in s["tasks"].items()) + " |")
    lk = card["leakage"]
    out += ["", f"Leakage check: {lk['shared_prompts']} prompts shared between splits, "
            f"{lk['near_duplicates_across_splits']} validation/test records near-duplicating a training record.", ""]
    p = card["privacy"]
    out += ["## Personal data", ""]
    if p.get("entities") is None:
        out += ["Anonymization was off (`data.privacy.enabled: false`).", ""]
    else:
        out += [f"Strategy `{p['strategy']}`, names {'on' if p['ner'] else 'off'}; "
                f"{p['records_with_pii']:,} records had personal data. Per record details (types and counts, never "
                "values): `pii_audit.jsonl`.", ""]
        if "answers" in p:
            fate = ("kept (`privacy.keep_emptied_answers`)" if p["emptied_kept"]
                    else "left out: `rejects.jsonl`, stage privacy")
            out += [f"Answers changed: {p['answers_changed']:,} of {p['answers']:,}; left as nothing but "
                    f"placeholders: {p['answers_emptied']:,}, in {p['records_emptied']:,} records, {fate}.", ""]
        out += [f"- {k}: {v:,}" for k, v in p["entities"].items()] + [""]
    t = card["tokens"]
    if t.get("count"):
        out += ["## Lengths", "", f"Tokens per record (`{card['model']}` tokenizer): mean {t['mean']}, "
                f"median {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']}. Training tokens per epoch: "
                f"{card['training_tokens_per_epoch']:,}.", "",
                "User turns per record: " + ", ".join(f"{k}: {v}" for k, v in card["turns"].items()), ""]
    out += ["## Languages", "", ", ".join(f"{k} {v:,}" for k, v in card["languages"].items()), "",
            "## Distinctive terms", "", "Words used far more often here than in general English:", "",
            "| term | count | per million here | per million in English |", "|---|---:|---:|---:|"]
    out += [f"| {t['term']} | {t['count']:,} | {t['per_million']:,} | {t['general_per_million']} |"
            for t in card["relevance"]["terms"]]
    if card["perplexity"]:
        pp = card["perplexity"]
        out += ["", f"Base model perplexity on the answers of {pp['records']} training records: **{pp['perplexity']}** "
                f"(loss {pp['loss']})."]
    if card["duplicates"]["clusters"]:
        out += ["", "## Near-duplicate clusters (largest)", ""]
        for cl in card["duplicates"]["clusters"]:
            out.append(f"- {cl['size']} records, e.g. " + " | ".join(f"`{t}`" for t in cl["texts"]))
    return "\n".join(out) + "\n"


def card_html(card: dict) -> str:
    import plotly.graph_objects as go
    from plotly.io import to_html

    figures = []
    hist = card["tokens"].get("histogram")
    if hist:
        figures.append(go.Figure(go.Bar(x=[f"{a}–{b - 1}" for a, b in zip(hist["edges"], hist["edges"][1:])],
                                        y=hist["counts"]), layout={"title": "Tokens per record",
                                                                   "xaxis_title": "tokens", "yaxis_title": "records"}))
    c = card["counts"]
    figures.append(go.Figure(go.Bar(
        x=["read", "rejected", "filtered", "duplicates", "kept"],
        y=[c["read"], c["rejected"], c["filtered"], c["duplicates"], c["kept"]]),
        layout={"title": "Records at each stage"}))
    figures.append(go.Figure(go.Bar(x=list(card["turns"]), y=list(card["turns"].values())),
                             layout={"title": "User turns per record", "xaxis_title": "turns"}))
    figures.append(go.Figure(go.Bar(x=list(card["languages"]), y=list(card["languages"].values())),
                             layout={"title": "Languages"}))
    terms = card["relevance"]["terms"]
    if terms:
        figures.append(go.Figure(go.Bar(x=[t["ratio"] for t in terms][::-1], y=[t["term"] for t in terms][::-1],
                                        orientation="h"),
                                 layout={"title": "Distinctive terms (× their frequency in general English)",
                                         "height": 500}))
    if card["privacy"].get("entities"):
        e = card["privacy"]["entities"]
        figures.append(go.Figure(go.Bar(x=list(e), y=list(e.values())), layout={"title": "Personal data replaced"}))
    parts = [to_html(f, full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figures)]
    import html

    v = card["verdict"]
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Data card</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em}</style>"
            "</head><body><h1>Data card</h1>"
            f"<p><b>Sufficient?</b> {html.escape(v['sufficient'])}</p>"
            f"<p><b>Relevant?</b> {html.escape(v['relevant'])}</p>"
            + (f"<p><b>Personal data?</b> {html.escape(v['privacy'])}</p>" if v.get("privacy") else "")
            + "".join(parts) + "</body></html>")

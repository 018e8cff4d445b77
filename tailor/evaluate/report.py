"""The evaluation as people read it: a table in the terminal, and report.html in the run folder."""

from __future__ import annotations

import html
from pathlib import Path

from rich.table import Table

from tailor.evaluate.ladder import overrides
from tailor.files import read_json
from tailor.runs import Run

# Higher is better for all but these.
LOWER_IS_BETTER = {"loss", "perplexity"}
LABELS = {"loss": "answer loss", "perplexity": "answer perplexity", "token_accuracy": "token accuracy",
          "exact_match": "exact match", "rouge_l": "ROUGE-L", "chrf": "chrF", "bleu": "BLEU",
          "label_accuracy": "label accuracy", "macro_f1": "macro-F1", "preferred_style": "preferred style"}
# Validation numbers that are not shares in [0, 1]: charted on their own.
REWARDS = ("val_reward_margin", "val_chosen_reward", "val_rejected_reward")


def summary_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """(measure, base, tuned, change) rows: the task metrics, then retention."""
    rows = []
    base, tuned = summary["base"], summary["tuned"]
    for key in tuned:
        if base.get(key) is None or tuned.get(key) is None:
            continue
        change = tuned[key] - base[key]
        rows.append((LABELS.get(key, key), f"{base[key]:.3f}", f"{tuned[key]:.3f}", f"{change:+.3f}"))
    judge = summary.get("judge") or {}
    for criterion in judge.get("criteria", {}):
        b, t = judge["base"][criterion], judge["tuned"][criterion]
        rows.append((f"judge: {criterion} (1-5, a model's opinion)", _opt(b), _opt(t),
                     f"{t - b:+.2f}" if b is not None and t is not None else "–"))
    r = summary.get("retention")
    if r:
        rows.append(("general questions", f"{r['base']['qa_accuracy']:.1%}", f"{r['tuned']['qa_accuracy']:.1%}",
                     f"{-r['qa_drop'] * 100:+.1f} pts"))
        rows.append(("general-text perplexity", f"{r['base']['text_perplexity']:.2f}",
                     f"{r['tuned']['text_perplexity']:.2f}", f"{r['perplexity_increase']:+.1%}"))
    return rows


def _opt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def gate_lines(summary: dict) -> list[str]:
    gate = summary["gate"]
    lines = [f"gate: {'PASSED' if gate['passed'] else 'FAILED'}"]
    for c in gate["checks"]:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[c["passed"]]
        lines.append(f"  {mark} {c['name']}: {c['detail']}" + (f" (needs {c['threshold']})" if c["threshold"] else ""))
    if gate.get("next"):
        step = gate["next"]
        lines.append(f"  likely cause: {step['cause']}")
        lines.append(f"  next try: {step['why']}: " + " ".join(f"--set {o}" for o in overrides(step["set"]))
                     + " (or tailor train JOB --until-gate-passes 3 follows these steps itself)")
    return lines


def summary_table(summary: dict) -> Table:
    table = Table(title=f"{summary['data']['examples']} test conversations, greedy decoding, "
                        f"≤ {summary['decoding']['max_new_tokens']} new tokens")
    for col, justify in (("measure", "left"), ("base", "right"), ("tuned", "right"), ("change", "right")):
        table.add_column(col, justify=justify)
    for row in summary_rows(summary):
        table.add_row(*row)
    return table


# --- report.html ---------------------------------------------------------------------------------


def write_report(run: Run | Path) -> Path:
    """RUN/report.html from what the run folder holds: metrics.jsonl (curves), eval/ (base vs
    tuned, retention, sample answers). Self-contained: Plotly's script is embedded, so it opens
    from disk with no server and no network."""
    run = Run(run)
    manifest = read_json(run.manifest_file) or {}  # as written: the report shows what it can of any run
    return run.write_report(report_html(run.metrics(), run.eval_summary(), run.eval_examples(), manifest, run.id,
                                        run.layer_change(), run.stages_record()))


def report_html(rows: list[dict], summary: dict | None, examples: list[dict], manifest: dict, title: str,
                layers: dict | None = None, stages: dict | None = None) -> str:
    from plotly.io import to_html

    figures = (_curves(rows) + _task_curves(rows) + _reward_curves(rows) + (_layer_chart(layers) if layers else [])
               + (_comparison(summary) if summary else []))
    _mark_stages(figures, rows)
    charts = [f"<section class='chart' id='{name}'>" + to_html(fig, full_html=False, include_plotlyjs=(i == 0),
                                                              config={"displaylogo": False}) + "</section>"
              for i, (name, fig) in enumerate(figures)]
    head = (f"<h1>Run {html.escape(title)}</h1><p>{html.escape(manifest.get('name', ''))} · "
            f"{html.escape(str(manifest.get('technique', '')))} · base model "
            f"{html.escape(str(manifest.get('model', {}).get('source', '')))}</p>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Tailor run " + html.escape(title) + "</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;width:100%;font-size:0.9em}td,th{border:1px solid #ccc;padding:6px;"
            "vertical-align:top;text-align:left}th{background:#f4f4f4}.pass{color:#1a7f37}.fail{color:#cf222e}"
            ".num{text-align:right;font-variant-numeric:tabular-nums}</style></head><body>"
            + head + (_verdict_html(summary) if summary else "<p>Not evaluated yet: <code>tailor eval RUN</code>.</p>")
            + _stages_html(stages) + "".join(charts) + (_scores_html(summary) if summary else "")
            + _tasks_html(summary) + _judge_html(summary)
            + _examples_html(examples)
            + "</body></html>")


def _curves(rows: list[dict]) -> list[tuple[str, object]]:
    import plotly.graph_objects as go

    train = [r for r in rows if r.get("type") == "train"]
    val = [r for r in rows if r.get("type") == "eval" and r.get("val_loss") is not None]
    figures = []
    if train or val:
        for x, name, title in (("step", "loss-steps", "optimizer step"), ("epoch", "loss-epochs", "epoch")):
            fig = go.Figure(layout={"title": f"Loss over {x}s", "xaxis_title": title, "yaxis_title": "loss"})
            # a staged run: one line per stage, since each stage validates on its own data
            for stage, part in _by_stage(train).items():
                fig.add_scatter(x=[r[x] for r in part], y=[r["loss"] for r in part], name=_named("train", stage),
                                mode="lines")
            for stage, part in _by_stage(val).items():
                fig.add_scatter(x=[r[x] for r in part], y=[r["val_loss"] for r in part],
                                name=_named("validation", stage), mode="lines+markers")
            figures.append((name, fig))
    if train:
        figures.append(("learning-rate", go.Figure(
            go.Scatter(x=[r["step"] for r in train], y=[r["lr"] for r in train], mode="lines", name="learning rate"),
            layout={"title": "Learning rate", "xaxis_title": "optimizer step"})))
    metric_keys = sorted({k for r in val for k in r if k.startswith("val_") and "/" not in k
                          and k not in ("val_loss", "val_perplexity") + REWARDS})
    if metric_keys:
        fig = go.Figure(layout={"title": "Validation metrics", "xaxis_title": "optimizer step", "yaxis_range": [0, 1],
                                "showlegend": True})
        for k in metric_keys:
            points = [r for r in val if r.get(k) is not None]
            fig.add_scatter(x=[r["step"] for r in points], y=[r[k] for r in points], name=k.removeprefix("val_"),
                            mode="lines+markers")
        figures.append(("validation-metrics", fig))
    return figures


def _by_stage(rows: list[dict]) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault(r.get("stage"), []).append(r)
    return groups


def _named(what: str, stage: str | None) -> str:
    return what if stage is None else f"{what} · {stage}"


def _task_curves(rows: list[dict]) -> list[tuple[str, object]]:
    """Multi-task runs: each task's validation loss and token accuracy (val_loss/TASK …)."""
    import plotly.graph_objects as go

    val = [r for r in rows if r.get("type") == "eval"]
    tasks = sorted({k.split("/", 1)[1] for r in val for k in r if k.startswith("val_loss/")})
    if not tasks:
        return []
    figures = []
    for key, title in (("val_loss", "Validation loss by task"),
                       ("val_token_accuracy", "Validation token accuracy by task")):
        fig = go.Figure(layout={"title": title, "xaxis_title": "optimizer step", "showlegend": True})
        for task in tasks:
            points = [r for r in val if r.get(f"{key}/{task}") is not None]
            fig.add_scatter(x=[r["step"] for r in points], y=[r[f"{key}/{task}"] for r in points], name=task,
                            mode="lines+markers")
        figures.append((f"tasks-{key.removeprefix('val_').replace('_', '-')}", fig))
    return figures


def _reward_curves(rows: list[dict]) -> list[tuple[str, object]]:
    """Preference training: the implicit rewards of chosen and rejected answers and their margin."""
    import plotly.graph_objects as go

    val = [r for r in rows if r.get("type") == "eval" and r.get("val_reward_margin") is not None]
    if not val:
        return []
    fig = go.Figure(layout={"title": "Preference rewards on held-out pairs (margin > 0: chosen preferred)",
                            "xaxis_title": "optimizer step", "showlegend": True})
    for key in REWARDS:
        fig.add_scatter(x=[r["step"] for r in val], y=[r[key] for r in val], name=key.removeprefix("val_"),
                        mode="lines+markers")
    return [("preference-rewards", fig)]


def _mark_stages(figures: list, rows: list[dict]) -> None:
    """Staged runs: a dashed line where each stage after the first begins, on the step charts."""
    starts, seen = [], set()
    for r in rows:
        if r.get("stage") and r["stage"] not in seen:
            seen.add(r["stage"])
            starts.append((r["step"] - r.get("stage_step", r["step"]), r["stage"]))
    if len(starts) < 2:
        return
    for _, fig in figures:
        if fig.layout.xaxis.title.text == "optimizer step":
            for step, name in starts[1:]:
                fig.add_vline(x=step, line_dash="dash", line_color="#888", annotation_text=name)


def _stages_html(stages: dict | None) -> str:
    """The stages and the gate between them: each stage's validation loss after every later stage."""
    if not stages or not stages.get("stages"):
        return ""
    names = [s["name"] for s in stages["stages"]]
    head = ("<tr><th>after stage</th>" + "".join(f"<th>{html.escape(n)} validation loss</th>" for n in names)
            + "<th>gate</th></tr>")
    body = ""
    for s in stages["stages"]:
        cells = "".join(f"<td class='num'>{_opt(s['losses'].get(n))}</td>" for n in names)
        gate = ("<span class='fail'>" + html.escape("; ".join(f"{r['stage']} {r['rise']:+.1%}"
                                                              for r in s["regressions"]))
                + "</span>") if s["regressions"] else "<span class='pass'>ok</span>"
        body += f"<tr><td>{html.escape(s['name'])}</td>{cells}<td>{gate}</td></tr>"
    outcome = ""
    if stages.get("stopped_at"):
        outcome = (f"<p class='fail'>The gate stopped the run at stage {html.escape(stages['stopped_at'])}; the "
                   f"result is the stage before it, stages/{html.escape(stages['result_of'])}.</p>")
    return "<h2>Stages</h2><table id='stages'>" + head + body + "</table>" + outcome


def _tasks_html(summary: dict | None) -> str:
    tasks = (summary or {}).get("tasks")
    if not tasks:
        return ""
    keys = list(dict.fromkeys(k for v in tasks.values() for k, x in v["tuned"].items() if x is not None))
    head = "<tr><th>task</th><th>examples</th>" + "".join(f"<th>{html.escape(LABELS.get(k, k))} base → tuned</th>"
                                                        for k in keys) + "</tr>"
    body = "".join(f"<tr><td>{html.escape(t)}</td><td class='num'>{v['examples']}</td>"
                   + "".join(f"<td class='num'>{_opt(v['base'].get(k))} → {_opt(v['tuned'].get(k))}</td>" for k in keys)
                   + "</tr>" for t, v in tasks.items())
    return "<h2>By task</h2><table id='tasks'>" + head + body + "</table>"


def _layer_chart(layers: dict) -> list[tuple[str, object]]:
    import plotly.graph_objects as go

    names = [f"block {b['block']}" for b in layers["blocks"]] + list(layers["other"])
    values = [b["relative_change"] for b in layers["blocks"]] + list(layers["other"].values())
    what = "the merged LoRA update" if layers["kind"] == "lora" else "trained minus base weights"
    return [("layer-change", go.Figure(go.Bar(x=names, y=values),
                                       layout={"title": f"How much each block changed: ‖ΔW‖ / ‖W‖ ({what})",
                                               "yaxis_title": "relative change", "xaxis_title": "input → output"}))]


def _comparison(summary: dict) -> list[tuple[str, object]]:
    import plotly.graph_objects as go

    keys = [k for k in summary["tuned"] if k not in LOWER_IS_BETTER and summary["base"].get(k) is not None]
    names = [LABELS.get(k, k) for k in keys]
    fig = go.Figure(layout={"title": "Base vs tuned on the test split (higher is better)", "barmode": "group",
                            "yaxis_range": [0, 1]})
    fig.add_bar(x=names, y=[summary["base"][k] for k in keys], name="base")
    fig.add_bar(x=names, y=[summary["tuned"][k] for k in keys], name="tuned")
    figures = [("base-vs-tuned", fig)]
    r = summary.get("retention")
    if r:
        skills = list(r["base"]["by_skill"])
        ret = go.Figure(layout={"title": f"Retention: general questions answered, by skill "
                                         f"({r['questions']} questions)",
                                "barmode": "group", "yaxis_range": [0, 1]})
        ret.add_bar(x=["all"] + skills, y=[r["base"]["qa_accuracy"]] + [r["base"]["by_skill"][s] for s in skills],
                    name="base")
        ret.add_bar(x=["all"] + skills, y=[r["tuned"]["qa_accuracy"]] + [r["tuned"]["by_skill"][s] for s in skills],
                    name="tuned")
        figures.append(("retention", ret))
    return figures


def _verdict_html(summary: dict) -> str:
    gate = summary["gate"]
    items = "".join(f"<li>{'✔' if c['passed'] else ('✘' if c['passed'] is False else '–')} "
                    f"{html.escape(c['name'])}: {html.escape(c['detail'])}"
                    + (f" (needs {html.escape(c['threshold'])})" if c["threshold"] else "") + "</li>"
                    for c in gate["checks"])
    cls, word = ("pass", "passed") if gate["passed"] else ("fail", "FAILED")
    return f"<h2 class='{cls}'>Gate {word}</h2><ul>{items}</ul>"


def _scores_html(summary: dict) -> str:
    body = "".join(f"<tr><td>{html.escape(m)}</td><td class='num'>{html.escape(b)}</td><td class='num'>"
                   f"{html.escape(t)}</td><td class='num'>{html.escape(c)}</td></tr>"
                   for m, b, t, c in summary_rows(summary))
    return ("<h2>Scores</h2><table id='scores'><tr><th>measure</th><th>base</th><th>tuned</th><th>change</th></tr>"
            + body + "</table>")


def _judge_html(summary: dict | None) -> str:
    judge = (summary or {}).get("judge")
    if not judge:
        return ""
    if "error" in judge:
        return f"<h2>Judge</h2><p>Not judged: {html.escape(judge['error'])}</p>"
    body = "".join(f"<tr><td>{html.escape(c)}</td><td>{html.escape(text)}</td><td class='num'>{_opt(judge['base'][c])}"
                   f"</td><td class='num'>{_opt(judge['tuned'][c])}</td></tr>" for c, text in judge["criteria"].items())
    return (f"<h2>Judge: {html.escape(judge['model'])}</h2><p><em>These are {html.escape(judge['note'])}, on "
            f"{judge['examples']} test answers.</em></p><table id='judge'><tr><th>criterion</th><th>rubric</th>"
            "<th>base (1-5)</th><th>tuned (1-5)</th></tr>" + body + "</table>")


def _examples_html(examples: list[dict], limit: int = 50) -> str:
    if not examples:
        return ""
    body = "".join(f"<tr><td>{html.escape(e['question'])}</td><td>{html.escape(e['reference'])}</td>"
                   f"<td>{html.escape(e['base'])}</td><td>{html.escape(e['tuned'])}</td></tr>"
                   for e in examples[:limit])
    return (f"<h2>Sample answers ({min(limit, len(examples))} of {len(examples)})</h2><table id='samples'>"
            "<tr><th>question</th><th>reference</th><th>base</th><th>tuned</th></tr>" + body + "</table>")

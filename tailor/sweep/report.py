"""SWEEP/sweep.html: every trial in a table, and Optuna's own charts — optimization history, the
validations the pruner judged, parallel coordinates and parameter importance — with Plotly's
script embedded once, so the page opens offline like a run's report."""

from __future__ import annotations

import html

STATE_WORDS = {"COMPLETE": "finished", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
               "WAITING": "waiting"}


def sweep_html(study, objective, params: list, folder) -> str:
    from tailor.sweep.study import best_trial

    trials = study.trials
    figures = _figures(study, objective, params)
    from plotly.io import to_html

    charts = [f"<section class='chart' id='{name}'>" + to_html(fig, full_html=False, include_plotlyjs=(i == 0),
                                                              config={"displaylogo": False}) + "</section>"
              for i, (name, fig) in enumerate(figures)]
    best = best_trial(study)
    head = (f"<h1>Sweep {html.escape(folder.path.name)}</h1><p>{len(trials)} trial(s); objective: the validation "
            f"<b>{html.escape(objective.metric)}</b> gain over the base model ({objective.base:.3f}); a trial over a "
            "retention limit of the gate ranks below every trial within them.</p>"
            + (f"<p class='pass'>Best: trial {best.number} ({best.user_attrs.get('gain', 0):+.3f}) → "
               f"<code>{html.escape(str(folder.best_job_file))}</code></p>" if best else ""))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Tailor sweep "
            + html.escape(folder.path.name) + "</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;width:100%;font-size:0.85em}td,th{border:1px solid #ccc;padding:4px 6px;"
            "text-align:left;white-space:nowrap}th{background:#f4f4f4}.pass{color:#1a7f37}.fail{color:#cf222e}"
            ".num{text-align:right;font-variant-numeric:tabular-nums}tr.best{background:#eaf7ee}</style></head><body>"
            + head + _table(trials, objective, params, best) + "".join(charts) + "</body></html>")


def _table(trials, objective, params: list, best) -> str:
    cols = ["#", "state"] + [p.key for p in params] + [f"val {objective.metric}", "gain", "general questions",
                                                       "retention", "steps", "seconds", "run"]
    rows = []
    for t in trials:
        a = t.user_attrs
        retention = {True: "<span class='pass'>kept</span>", False: "<span class='fail'>over the limit</span>",
                     None: "—"}[a.get("retention_passed")]
        state = STATE_WORDS.get(t.state.name, t.state.name.lower())
        if t.state.name == "PRUNED" and t.intermediate_values:
            step = max(t.intermediate_values)
            state += f" at step {step}"
        if a.get("error"):
            state += f": {html.escape(a['error'][:200])}"
        if a.get("resumes") is not None:
            state += f" (continues {a['resumes']})"
        settings = [html.escape(_fmt(t.params[p.key]) if p.key in t.params else "") for p in params]
        cells = [str(t.number), state] + settings + [
            _num(a.get("val"), "{:.3f}"), _num(a.get("gain"), "{:+.3f}"),
            _num(-a["qa_drop"] * 100 if a.get("qa_drop") is not None else None, "{:+.1f} pts"), retention,
            str(a.get("steps") or (max(t.intermediate_values) if t.intermediate_values else "")),
            _num(a.get("seconds"), "{:.0f}"), html.escape(a.get("name", ""))]
        cls = " class='best'" if best is not None and t.number == best.number else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<h2>Trials</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
            + "".join(rows) + "</table>")


def _figures(study, objective, params: list) -> list:
    """Optuna's charts that this study can draw (importance needs two finished trials that differ)."""
    import optuna.visualization as vis

    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    figures = []
    if done:
        figures.append(("history", vis.plot_optimization_history(study, target_name=f"{objective.metric} gain")))
    if any(t.intermediate_values for t in study.trials):
        figures.append(("validations", vis.plot_intermediate_values(study)))
    if len(done) >= 2:
        figures.append(("parallel", vis.plot_parallel_coordinate(study, target_name=f"{objective.metric} gain")))
        varied = [p.key for p in params if len({repr(t.params.get(p.key)) for t in done}) > 1]
        if varied:
            # PED-ANOVA: Optuna's own, no scikit-learn (fANOVA's forest needs it)
            from optuna.importance import PedAnovaImportanceEvaluator

            figures.append(("importance", vis.plot_param_importances(
                study, evaluator=PedAnovaImportanceEvaluator(), params=varied,
                target_name=f"{objective.metric} gain")))
    for _, fig in figures:
        fig.update_layout(height=420)
    return figures


def _num(value, pattern: str) -> str:
    return "" if value is None else f"<span class='num'>{pattern.format(value)}</span>"


def _fmt(value) -> str:
    if value is None:
        return "null"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


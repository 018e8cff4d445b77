"""Every finished trial of a sweep, best first, from its own run folder: the validation gain (what
the sweep optimized), test ROUGE-L and general questions (what it never saw), and what the sweep
cost; the job as written (trial 0) marked. docs/sweeps.md's tables come from here.

    python bench/sweep/compare.py SWEEP_FOLDER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna

from tailor.sweep.study import SweepFolder, best_trial


def main(path: Path) -> None:
    folder = SweepFolder(path)
    study = optuna.load_study(study_name="sweep", storage=folder.storage_url)
    state = json.loads(folder.state_file.read_text())
    states = [t.state.name for t in study.trials]
    seconds = sum(t.user_attrs.get("seconds", 0) for t in study.trials)
    print(f"{len(study.trials)} trials: {states.count('COMPLETE')} finished, {states.count('PRUNED')} pruned, "
          f"{states.count('FAIL')} failed; {seconds / 60:.1f} min of trials; base validation "
          f"{state.get('base', float('nan')):.3f}")
    best = best_trial(study)
    print("| trial | settings | val gain | test ROUGE-L base → tuned | general questions base → tuned | gate | steps "
          "| seconds |")
    print("|---|---|---:|---|---|---|---:|---:|")
    done = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: (-t.value, t.number))
    for t in done:
        label = str(t.number) + (" (job as written)" if t.user_attrs.get("start") else "") + (
            " **best**" if t.number == best.number else "")
        ev = folder.run_of(t.user_attrs["name"]).eval_summary()
        settings = ", ".join(f"{k.rsplit('.', 1)[-1]} " + (f"{v:.3g}" if isinstance(v, float) else str(v))
                             for k, v in t.params.items())
        r = ev["retention"]
        print(f"| {label} | {settings} | {t.user_attrs['gain']:+.3f} | {ev['base']['rouge_l']:.3f} → "
              f"{ev['tuned']['rouge_l']:.3f} | {r['base']['qa_accuracy']:.1%} → {r['tuned']['qa_accuracy']:.1%} | "
              f"{'passed' if ev['gate']['passed'] else 'failed'} | {t.user_attrs.get('steps')} | "
              f"{t.user_attrs.get('seconds', 0):.0f} |")

if __name__ == "__main__":
    main(Path(sys.argv[1]))

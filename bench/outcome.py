"""The advised path on data no one here tuned on: advise → train → eval, as a new user runs it.

Two public question-answer sets from the ChatterBot corpus (BSD licence, on PyPI as
chatterbot-corpus), written as chat JSONL with a seeded held-out test file:

    trivia   english/trivia.yml: 261 questions with short factual answers ("Brown", "Richard Nixon")
    coding   english/coding.yml: 184 questions with longer answers (explanations, code), 96 distinct

For each set, three runs on the same prepared split, each evaluated on the same held-out file:

    advised             tailor advise --use-case accuracy --data train.jsonl, then its job.yaml as written
                        (model and settings as the advisor chose them on this machine)
    advised, no replay  the same with training.replay.enabled=false (no forgetting protection)
    plain LoRA          the same data with rank 16, lr 3e-4, 3 epochs, no replay, no early stopping

and prints, per run: held-out ROUGE-L base → tuned, general questions base → tuned, the gate.

    python bench/outcome.py --out /tmp/outcome                 # both sets (about 30 min on 2 cores)
    python bench/outcome.py --out /tmp/outcome --sets trivia   # one
    python bench/outcome.py --out /tmp/outcome --model embedded:smollm2-135m-instruct   # force the model
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_data import one_per_question  # noqa: E402

SETS = {"trivia": "trivia.yml", "coding": "coding.yml"}
TEST_SHARE = 0.15
PLAIN_LORA = ["adapter.rank=16", "adapter.alpha=32", "training.learning_rate=3e-4", "training.epochs=3",
              "training.replay.enabled=false", "training.early_stopping_patience=0"]
VARIANTS = {"advised": [], "advised, no replay": ["training.replay.enabled=false"], "plain LoRA": PLAIN_LORA}


def write_set(name: str, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl and test.jsonl of one corpus file, split by a seeded shuffle."""
    import chatterbot_corpus

    source = Path(chatterbot_corpus.__file__).parent / "data" / "english" / SETS[name]
    pairs = one_per_question([c for c in yaml.safe_load(source.read_text(encoding="utf-8"))["conversations"]
                              if len(c) >= 2])
    random.Random(seed).shuffle(pairs)
    n_test = round(len(pairs) * TEST_SHARE)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in (("test", pairs[:n_test]), ("train", pairs[n_test:])):
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": str(q).strip()}, {"role": "assistant", "content": str(a).strip()}]}) + "\n"
            for q, a, *_ in rows), encoding="utf-8")
    return files["train"], files["test"]


def tailor(*args: str, log: Path) -> subprocess.CompletedProcess:
    with log.open("a", encoding="utf-8") as f:
        f.write(f"$ tailor {' '.join(args)}\n")
        f.flush()
        return subprocess.run([sys.executable, "-m", "tailor", *args], stdout=f, stderr=subprocess.STDOUT, text=True)


def latest_run(runs: Path) -> Path:
    return max((p for p in runs.glob("*/*") if (p / "manifest.json").is_file()), key=lambda p: p.stat().st_mtime)


def measure(name: str, out: Path, model: str | None) -> list[dict]:
    folder = out / name
    train, test = write_set(name, folder / "data")
    log = folder / "log.txt"
    advice = folder / "advice"
    tailor("advise", "--use-case", "accuracy", "--data", str(train), "--out", str(advice), log=log)
    rows = []
    for variant, sets in VARIANTS.items():
        overrides = sets + [f"output.dir={folder / 'runs' / variant.replace(' ', '-').replace(',', '')}",
                            "eval.enabled=false"] + ([f"model.base={model}"] if model else [])
        started = time.perf_counter()
        done = tailor("train", str(advice / "job.yaml"), "--no-progress", *[a for o in overrides for a in ("--set", o)],
                      log=log)
        if done.returncode:
            raise SystemExit(f"{name}/{variant}: tailor train failed; see {log}")
        run = latest_run(folder / "runs" / variant.replace(" ", "-").replace(",", ""))
        tailor("eval", str(run), "--data", str(test), log=log)
        summary = json.loads((run / "eval" / "summary.json").read_text(encoding="utf-8"))
        manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
        ran = yaml.safe_load((run / "job.yaml").read_text(encoding="utf-8"))
        r = summary["retention"]
        rows.append({"set": name, "variant": variant, "model": manifest["model"]["source"],
                     "settings": f"rank {ran['adapter']['rank']}, lr {ran['training']['learning_rate']:g}, "
                                 f"{ran['training']['epochs']:g} epochs",
                     "replayed": (manifest.get("replay") or {}).get("examples", 0),
                     "rouge_l": (summary["base"]["rouge_l"], summary["tuned"]["rouge_l"]),
                     "general": (r["base"]["qa_accuracy"], r["tuned"]["qa_accuracy"]),
                     "drop": r["qa_drop"], "gate": summary["gate"]["passed"],
                     "minutes": (time.perf_counter() - started) / 60, "run": str(run)})
        print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict) -> str:
    (rb, rt), (gb, gt) = row["rouge_l"], row["general"]
    return (f"| {row['set']} | {row['variant']} | {row['settings']}" + (f", {row['replayed']} replayed"
                                                                        if row["replayed"] else "")
            + f" | {rb:.3f} → {rt:.3f} | {gb:.1%} → {gt:.1%} ({-row['drop'] * 100:+.1f} pts) | "
            f"{'passed' if row['gate'] else 'FAILED'} | {row['minutes']:.1f} |")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--model", help="model.base for every run (default: as the advisor picks it)")
    args = p.parse_args(argv)
    print("| set | run | settings | held-out ROUGE-L base → tuned | general questions base → tuned | gate | min |")
    print("|---|---|---|---|---|---|---|")
    rows = [row for name in args.sets for row in measure(name, args.out, args.model)]
    (args.out / "outcome.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()

"""Data no one here wrote, for docs/sweeps.md's second measurement: conversations of the public
ChatterBot corpus (PyPI chatterbot-corpus, English small talk, trivia, science …), one per
question, written as chat JSONL beside a job that trains on them as the quickstart job trains on
the shop's logs (same model, settings and gate), and a space like the quickstart's.

    python bench/sweep/corpus.py runs/corpus-sweep
    tailor sweep runs/corpus-sweep/job.yaml --space runs/corpus-sweep/space.yaml --trials 12
    python bench/sweep/compare.py runs/sweeps/corpus
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chat_data import chatterbot_conversations, one_per_question  # noqa: E402

HERE = Path(__file__).resolve().parent
# Half the quickstart's tokens: the corpus's answers (code, lists) run to the generation limit at
# every validation and evaluation, where the shop's stop early, so a trial costs twice as much.
CONVERSATIONS = 120


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    conversations = one_per_question(chatterbot_conversations())
    random.Random(0).shuffle(conversations)
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for turns in conversations[:CONVERSATIONS]:
            roles = ["user", "assistant"] * len(turns)
            f.write(json.dumps({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)][
                :len(turns) // 2 * 2]}) + "\n")
    job = yaml.safe_load((HERE.parents[1] / "tailor" / "quickstart" / "job.yaml").read_text(encoding="utf-8"))
    job["name"] = "corpus"
    job["data"] = {"train": "corpus.jsonl", "prepare": True, "split": {"validation": 0.1, "test": 0.1},
                   "card": {"perplexity_sample": 16}}
    (out / "job.yaml").write_text("# The quickstart job's settings on the ChatterBot corpus (bench/sweep/corpus.py).\n"
                                  + yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    (out / "space.yaml").write_text((HERE / "quickstart-space.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    print(f"{CONVERSATIONS} conversations → {out / 'corpus.jsonl'}; {out / 'job.yaml'}, {out / 'space.yaml'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/corpus-sweep"))

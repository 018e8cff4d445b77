"""Behavioral fine-tuning: steer how the model answers (its guidelines, its tone) in two stages.

1. demonstrations: supervised training on conversations that show the wanted behaviour (and, with
   behavioral.sft_on_chosen, the chosen answers of the preference pairs);
2. preferences: the preference loss (DPO by default) on chosen/rejected pairs, starting from the
   demonstrations stage, which is also the reference the loss compares with.

Both stages train the same adapter; the gate between them (tailor/techniques/stages.py) says when
the preference stage undid the demonstrations. The evaluation then measures how often the tuned
model's answers to held-out prompts are closer to the chosen than to the rejected style, and with
eval.judge a judge model scores them against a written rubric.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from rich.console import Console

from tailor.data import DataError
from tailor.spec import Job
from tailor.techniques import common, preference, task
from tailor.techniques.stages import Stage, run_stages


def run(job: Job, resume: bool = False, console: Console | None = None, show_progress: bool = True) -> Path:
    b = job.behavioral
    stages = []
    if b.demonstration_epochs > 0:
        if not b.sft_on_chosen and not any(ex.kind == "chat" for ex in common.read_data(job)[0]):
            raise DataError(["technique behavioral: data.train has no conversations to demonstrate with and "
                             "behavioral.sft_on_chosen is false; set sft_on_chosen: true, add conversations, or "
                             "set behavioral.demonstration_epochs: 0"])
        stages.append(Stage("demonstrations", job.as_stage("demonstrations", "task",
                                                           training={"epochs": b.demonstration_epochs}),
                            partial(task.run, demonstrations=b.sft_on_chosen),
                            frozenset({"chat", "text", "preference"} if b.sft_on_chosen else {"chat", "text"})))
    # `auto` stays auto: the preference stage then chooses a twentieth of the supervised rate itself.
    lr = b.preference_learning_rate or (job.training.learning_rate / 20 if job.training.learning_rate != "auto"
                                        else "auto")
    stages.append(Stage("preferences", job.as_stage("preferences", "preference",
                                                    training={"epochs": b.preference_epochs, "learning_rate": lr}),
                        preference.run, frozenset({"preference"})))
    return run_stages(job, stages, resume=resume, console=console, show_progress=show_progress)


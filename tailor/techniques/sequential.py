"""Sequential fine-tuning: the job's stages, in order, each starting from the weights (or the
adapter) the stage before it ended with: general conversations, then the domain, then the task;
or one task after another. A gate between stages stops the run when a stage makes the model
forget what an earlier one taught (tailor/techniques/stages.py).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from tailor.spec import Job
from tailor.techniques.stages import Stage, run_stages


def run(job: Job, resume: bool = False, console: Console | None = None, show_progress: bool = True) -> Path:
    # Every stage is a job of its own (its technique, data and training keys over the job's), with
    # the job's model and adapter; the run evaluates once, at the end, on the last stage's result.
    from tailor.techniques import multitask, preference, task

    recipes = {"task": task.run, "multitask": multitask.run, "preference": preference.run}
    stages = [Stage(stage.name, job.stage_job(i), recipes[stage.technique],
                    frozenset({"preference"} if stage.technique == "preference" else {"chat", "text"}))
              for i, stage in enumerate(job.stages)]
    return run_stages(job, stages, resume=resume, console=console, show_progress=show_progress)


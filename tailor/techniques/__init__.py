"""Step 3: fine-tuning techniques, one recipe module each (docs/techniques.md).

task        supervised training on one task (task.py)
transfer    the top blocks only, after optional pre-training on domain text (transfer.py)
multitask   several tasks in one model, sampled by weight, reported per task (multitask.py)
sequential  stages one after the other, gated against forgetting (sequential.py, stages.py)
behavioral  demonstrations, then preference pairs (behavioral.py, preference.py)
preference  the preference phase alone, also a stage of sequential (preference.py)
"""

from __future__ import annotations

from pathlib import Path

# The recipes that train one run from start to end: a sweep can watch their validations and stop
# them early. A staged recipe validates each stage from step 1 again, so it is not pruned.
WATCHABLE = ("task", "multitask", "preference")


def run(job, resume: bool = False, console=None, show_progress: bool = True, watch=None) -> Path:
    """Train `job` with the recipe its `technique:` names. watch: a tracker that gets every metrics
    row (tailor/sweep), for a recipe in WATCHABLE or transfer without domain text."""
    from tailor.techniques import behavioral, multitask, preference, sequential, task, transfer

    recipe = {"task": task.run, "transfer": transfer.run, "multitask": multitask.run, "sequential": sequential.run,
              "behavioral": behavioral.run, "preference": preference.run}[job.technique]
    if watch is None:
        return recipe(job, resume=resume, console=console, show_progress=show_progress)
    if not watchable(job):
        raise ValueError(f"technique {job.technique} runs in stages: it cannot be watched")
    if job.technique == "transfer":
        recipe = task.run  # without domain text, transfer is one run of the task recipe
    return recipe(job, resume=resume, console=console, show_progress=show_progress, watch=watch)


def watchable(job) -> bool:
    """Whether the job trains as one run (not in stages), so its validations can be watched."""
    return job.technique in WATCHABLE or (job.technique == "transfer" and not job.transfer.domain_text)

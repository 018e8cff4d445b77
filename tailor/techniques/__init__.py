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


def run(job, resume: bool = False, console=None, show_progress: bool = True) -> Path:
    """Train `job` with the recipe its `technique:` names."""
    from tailor.techniques import behavioral, multitask, preference, sequential, task, transfer

    recipe = {"task": task.run, "transfer": transfer.run, "multitask": multitask.run, "sequential": sequential.run,
              "behavioral": behavioral.run, "preference": preference.run}[job.technique]
    return recipe(job, resume=resume, console=console, show_progress=show_progress)

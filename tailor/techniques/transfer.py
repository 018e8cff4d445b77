"""Transfer learning: keep what the pre-trained model knows in its lower blocks and adapt the top.

Only the top blocks train (adapter.kind freeze with train_top_blocks, or LoRA with lora_top_blocks;
the job spec refuses full fine-tuning here). With transfer.domain_text, a first stage continues
pre-training on the domain's own documents (loss on every token), so the top blocks learn the
domain's words before the task; the task stage then starts from there (two stages, gated, as in
tailor/techniques/stages.py). Without domain text it is one run of the task recipe.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from tailor.spec import DataSpec, Job
from tailor.techniques import task
from tailor.techniques.stages import Stage, run_stages


def run(job: Job, resume: bool = False, console: Console | None = None, show_progress: bool = True) -> Path:
    t = job.transfer
    if not t.domain_text:
        return task.run(job, resume=resume, console=console, show_progress=show_progress)
    domain = job.as_stage("domain", "task",
                          DataSpec(train=t.domain_text, validation_fraction=job.data.validation_fraction),
                          {"epochs": t.domain_epochs,
                           "learning_rate": t.domain_learning_rate or job.training.learning_rate,
                           "val_generate": 0, "early_stopping_patience": 0})
    the_task = job.as_stage("task", "task")
    return run_stages(job, [Stage("domain", domain, task.run), Stage("task", the_task, task.run)], resume=resume,
                      console=console, show_progress=show_progress)

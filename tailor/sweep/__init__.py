"""Sweeps: search the training settings that matter (learning rate, epochs, LoRA rank and alpha,
which blocks train) for the best gain on the business's task without forgetting (`tailor sweep`).

space.py   the search space file: job keys and their distributions, checked against the schema
study.py   the sweep: Optuna's TPE over trials that are ordinary run folders, pruned, resumable
report.py  SWEEP/sweep.html: the trials and Optuna's charts, offline
"""

"""Several tasks in one run: how often each is drawn, and which rows each optimizer step uses.

Rows never mix tasks (each task is packed on its own), so drawing a row is drawing its task. A
step draws its rows one at a time: first a task by its probability, then that task's next row in
a shuffled order that is reshuffled each time the task runs out. Like Plan, the whole schedule is
a pure function of (rows, probabilities, seed), so a resumed run replays it exactly.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field


def task_probabilities(sizes: dict[str, int], sampling: str, temperature: float = 1.0,
                       weights: dict[str, float] | None = None) -> dict[str, float]:
    """proportional: p ∝ n; temperature: p ∝ n^(1/T); weights: p ∝ the given weight."""
    if sampling == "weights":
        weights = weights or {}
        missing = sorted(set(sizes) - set(weights))
        unknown = sorted(set(weights) - set(sizes))
        if missing or unknown:
            raise ValueError("multitask.weights must name exactly the tasks in the data: "
                             + "; ".join(([f"no weight for {', '.join(missing)}"] if missing else [])
                                         + ([f"no data for {', '.join(unknown)}"] if unknown else [])))
        raw = {t: float(weights[t]) for t in sizes}
    elif sampling == "proportional":
        raw = {t: float(n) for t, n in sizes.items()}
    else:
        raw = {t: float(n) ** (1.0 / temperature) for t, n in sizes.items()}
    total = sum(raw.values())
    return {t: v / total for t, v in raw.items()}


@dataclass
class MixturePlan:
    """Which rows each optimizer step uses when rows are drawn task by task. An epoch is as many
    rows as there are in all tasks together; a heavily weighted small task repeats within it."""

    task_rows: dict[str, list[int]]  # task -> its row indices
    probabilities: dict[str, float]
    rows_per_step: int
    total_steps: int
    steps_per_epoch: int
    seed: int
    _schedule: list[list[int]] = field(default_factory=list, repr=False)

    @classmethod
    def make(cls, task_rows: dict[str, list[int]], probabilities: dict[str, float], settings,
             world: int) -> "MixturePlan":
        per_step = settings.batch_size * settings.grad_accum * world
        n_rows = sum(len(r) for r in task_rows.values())
        per_epoch = math.ceil(n_rows / per_step)
        total = settings.max_steps if settings.max_steps else math.ceil(settings.epochs * per_epoch)
        return cls(task_rows, probabilities, per_step, total, per_epoch, settings.seed)

    def step_rows(self, step: int) -> list[int]:
        if step >= len(self._schedule):
            self._schedule = self._draw(max(self.total_steps, step + 1))
        return self._schedule[step]

    def _draw(self, steps: int) -> list[list[int]]:
        """The first `steps` steps (cheap: one draw per row). Drawn in order from one seeded
        generator, so a longer schedule starts with the shorter one."""
        tasks = [t for t in self.task_rows if self.task_rows[t] and self.probabilities.get(t, 0) > 0]
        cum, acc = [], 0.0
        for t in tasks:
            acc += self.probabilities[t]
            cum.append(acc)
        rng = random.Random(self.seed * 1_000_003 + 7)
        used = {t: 0 for t in tasks}
        orders: dict[str, list[int]] = {}
        schedule = []
        for _ in range(steps):
            step = []
            for _ in range(self.rows_per_step):
                t = tasks[min(bisect.bisect_right(cum, rng.random() * acc), len(tasks) - 1)]
                rows = self.task_rows[t]
                k, i = divmod(used[t], len(rows))
                if i == 0:  # the task's rows ran out: a fresh shuffle, fixed by (seed, task, round)
                    orders[t] = rows[:]
                    random.Random(f"{self.seed}/{t}/{k}").shuffle(orders[t])
                step.append(orders[t][i])
                used[t] += 1
            schedule.append(step)
        return schedule

    def counts(self, steps: int) -> dict[str, int]:
        """Rows drawn from each task in the first `steps` steps."""
        task_of = {r: t for t, rows in self.task_rows.items() for r in rows}
        out = dict.fromkeys(self.task_rows, 0)
        for step in range(steps):
            for r in self.step_rows(step):
                out[task_of[r]] += 1
        return out


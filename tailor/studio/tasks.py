"""Short jobs the studio runs in its own process (prepare, export, the advisor): one at a time in a
background thread, their messages kept for the page that follows them. Training is not one of
them: it runs as its own process through the queue (queue.py), so that it outlives the studio."""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Task:
    id: int
    title: str
    lines: list[str] = field(default_factory=list)
    state: str = "running"  # running, done, failed
    error: str | None = None
    result: object = None
    started: float = field(default_factory=time.time)
    ended: float | None = None

    def say(self, message) -> None:
        self.lines.extend(str(message).splitlines() or [""])


class Tasks:
    """Tasks by id; one runs at a time (they share the CPU with training), the others wait."""

    def __init__(self):
        self._tasks: dict[int, Task] = {}
        self._lock = threading.Lock()
        self._one_at_a_time = threading.Lock()

    def start(self, title: str, work: Callable[[Task], object]) -> Task:
        with self._lock:
            task = Task(len(self._tasks) + 1, title)
            self._tasks[task.id] = task
        threading.Thread(target=self._run, args=(task, work), name=f"studio-task-{task.id}", daemon=True).start()
        return task

    def get(self, task_id: int) -> Task | None:
        return self._tasks.get(task_id)

    def _run(self, task: Task, work) -> None:
        with self._one_at_a_time:
            try:
                task.result = work(task)
                task.state = "done"
            except Exception as exc:  # the page shows it; a TailorError's message says what to do
                from tailor.errors import TailorError

                task.error = str(exc) if isinstance(exc, TailorError) else "".join(
                    traceback.format_exception_only(type(exc), exc)).strip()
                task.state = "failed"
            finally:
                task.ended = time.time()

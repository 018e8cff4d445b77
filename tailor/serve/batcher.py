"""Dynamic batching for the server: requests that wait together are decoded together."""

from __future__ import annotations

import threading
from typing import Callable

from tailor.models.decode import Engine, Request


class Batcher:
    """Dynamic batching: a worker thread takes every waiting request of one engine (up to
    max_batch) and decodes them together; requests that arrive meanwhile form the next batch."""

    def __init__(self, max_batch: int = 8):
        self.max_batch = max_batch
        self.lock = threading.Lock()  # held while decoding and while an adapter loads
        self._waiting: list[tuple[Engine, Request]] = []
        self._wakeup = threading.Condition()
        self._closed = False
        self.batch_sizes: list[int] = []  # observed by the metrics
        self.on_batch: Callable[[int], None] | None = None
        self._thread = threading.Thread(target=self._work, name="tailor-batcher", daemon=True)
        self._thread.start()

    def submit(self, engine: Engine, request: Request) -> None:
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._waiting.append((engine, request))
            self._wakeup.notify()

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join(timeout=60)

    def _next_batch(self) -> tuple[Engine, list[Request]] | None:
        with self._wakeup:
            while not self._waiting and not self._closed:
                self._wakeup.wait()
            if not self._waiting:
                return None
            engine = self._waiting[0][0]  # the oldest request's engine goes first
            batch = [r for e, r in self._waiting if e is engine][:self.max_batch]
            taken = {id(r) for r in batch}
            self._waiting = [(e, r) for e, r in self._waiting if id(r) not in taken]
            return engine, batch

    def _work(self) -> None:
        while (job := self._next_batch()) is not None:
            engine, batch = job
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                with self.lock:
                    engine.run(batch)
            except Exception as exc:  # reported to each request's caller; the worker keeps serving
                for r in batch:
                    if r.finish_reason is None:
                        r.error, r.finish_reason = exc, "error"
            for r in batch:
                if r.on_done is not None:
                    r.on_done(r)

"""Dynamic batching for the server: requests decode together, and new ones join a running batch.

One worker thread decodes. It takes the oldest waiting request's engine and every waiting request
for it (up to max_batch); while that batch decodes, requests that arrive for the same engine join
it before the next token (continuous batching), and a finished answer's row is freed at once. So
throughput grows with the number of clients until max_batch rows decode together.

All torch work of the server runs on that one thread, model loading included (`call`): with
OpenMP, every thread that runs parallel torch ops gets its own team of worker threads, and on
2 cores a second team cost the decoder 30 % of its speed (16.2 → 11.0 tokens/s measured).

One request must not fail the others: when a batch fails, its unfinished requests go on alone, so
only the one that causes the failure gets the error. A request cancelled while it waits (its
client went away, or its deadline passed) is dropped without being decoded.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

from tailor.errors import TailorError
from tailor.models.decode import Engine, Request

T = TypeVar("T")
log = logging.getLogger("tailor.serve")


class Unavailable(TailorError, RuntimeError):
    """The batcher takes no more requests: the server is shutting down, or its decoding thread
    has stopped. The message says which."""


class Batcher:
    def __init__(self, max_batch: int = 8):
        self.max_batch = max_batch
        self._waiting: list[tuple[Engine, Request]] = []
        self._wakeup = threading.Condition()
        self._closed = False
        self._stopped = "the server is shutting down"  # why submit refuses, once closed
        self._paused = threading.Event()  # set while calls wait: no joining, so the running batch ends
        self._calls: list[tuple[Callable, Future]] = []
        self.on_step: Callable[[int], None] | None = None  # rows decoded at each step
        self._thread = threading.Thread(target=self._work, name="tailor-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the decoding thread runs (False once it has stopped: closed, or died of a bug)."""
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Requests waiting for a row (cancelled ones not counted: they are dropped unread)."""
        with self._wakeup:
            return sum(not r.cancelled for _, r in self._waiting)

    def submit(self, engine: Engine, request: Request) -> None:
        with self._wakeup:
            if self._closed or not self.alive:
                raise Unavailable(self._stopped)
            self._waiting.append((engine, request))
            self._wakeup.notify()

    def call(self, fn: Callable[[], T]) -> T:
        """fn() on the worker thread, between two batches (loading a model or an adapter); its
        result or its exception comes back here. Under constant load a batch that others keep
        joining would never end, so joining stops until fn has run."""
        if threading.current_thread() is self._thread:
            return fn()
        done: Future = Future()
        with self._wakeup:
            if self._closed or not self.alive:
                raise Unavailable(self._stopped)
            self._calls.append((fn, done))
            self._paused.set()
            self._wakeup.notify()
        return done.result()

    def close(self) -> None:
        """Stop after the running batch; requests still waiting get an error."""
        self._stop("the server is shutting down")
        self._thread.join(timeout=60)

    def _stop(self, why: str) -> None:
        """Refuse new work; requests and calls still waiting get `why` as their error."""
        with self._wakeup:
            self._closed, self._stopped = True, why
            left, self._waiting = self._waiting, []
            calls, self._calls = self._calls, []
            self._wakeup.notify()
        for _, r in left:
            _fail(r, Unavailable(why))
        for _, done in calls:
            done.set_exception(Unavailable(why))

    def _take(self, engine: Engine, k: int) -> list[Request]:
        """Up to k waiting requests for `engine`, in order of arrival."""
        with self._wakeup:
            if self._paused.is_set() or self._closed:
                return []
            dropped = [r for _, r in self._waiting if r.cancelled]
            taken = [r for e, r in self._waiting if e is engine and not r.cancelled][:k]
            ids = {id(r) for r in taken + dropped}
            self._waiting = [(e, r) for e, r in self._waiting if id(r) not in ids]
        for r in dropped:  # never prefilled: a client that is gone costs no decoding
            _finish(r, "cancelled")
        return taken

    def _next_engine(self) -> Engine | None:
        """Run waiting calls, then return the engine of the oldest waiting request (None: closed)."""
        while True:
            with self._wakeup:
                while not self._waiting and not self._calls and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    return None
                calls, self._calls = self._calls, []
                self._paused.clear()
                if not calls:
                    return self._waiting[0][0]
            for fn, done in calls:
                try:
                    done.set_result(fn())
                except BaseException as exc:  # the caller re-raises it
                    done.set_exception(exc)

    def _work(self) -> None:
        try:
            while (engine := self._next_engine()) is not None:
                self._decode(engine)
        except BaseException:  # a bug in the batcher itself: say so, and leave no request waiting forever
            log.exception("the decoding thread stopped")
            self._stop("the decoding thread has stopped (the server log has the error); restart the server")

    def _decode(self, engine: Engine) -> None:
        """One batch for `engine`, with the requests that join it, to its end."""
        batch = self._take(engine, self.max_batch)
        if not batch:
            return
        served = list(batch)

        def more(k: int) -> list[Request]:
            joining = self._take(engine, k)
            served.extend(joining)
            return joining

        engine.on_step = self.on_step
        try:
            engine.run(batch, more=more, max_batch=self.max_batch)
        except Exception as exc:
            unfinished = [r for r in served if r.finish_reason is None]
            if len(unfinished) == 1:
                _fail(unfinished[0], exc)
            else:
                log.warning("a batch of %d failed (%s: %s); its requests go on one at a time", len(unfinished),
                            type(exc).__name__, exc)
                self._alone(engine, unfinished)

    def _alone(self, engine: Engine, requests: list[Request]) -> None:
        """Each request decoded by itself, from where it was: the one that made the batch fail
        fails again, alone. Slower than a batch, but only after a failure."""
        for r in requests:
            if r.cancelled:
                _finish(r, "cancelled")
                continue
            try:
                engine.run([r])
            except Exception as exc:
                _fail(r, exc)


def _finish(r: Request, reason: str) -> None:
    r.finish_reason = reason
    if r.on_done is not None:
        r.on_done(r)


def _fail(r: Request, exc: BaseException) -> None:
    r.error = exc
    _finish(r, "error")

"""The feedback store: every completion the server answers, and what users said about it.

SQLAlchemy Core over any database URL; the default is a SQLite file in WAL mode (readers never
block the writer, and concurrent writers wait for each other instead of failing), which is enough
for one server. A shared Postgres or MySQL URL serves several.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.pool import StaticPool

DEFAULT_DB = "sqlite:///runs/feedback.db"

metadata = MetaData()
completions = Table(
    "completions", metadata,
    Column("id", String(64), primary_key=True),
    Column("created", Float, nullable=False),
    Column("model", String(256), nullable=False),
    Column("kind", String(16), nullable=False),  # chat | text
    Column("prompt", Text, nullable=False),  # chat: the messages as JSON; text: the prompt
    Column("answer", Text, nullable=False),
    Column("finish_reason", String(16)),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
)
feedback = Table(
    "feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("completion_id", String(64), ForeignKey("completions.id"), nullable=False, index=True),
    Column("created", Float, nullable=False),
    Column("rating", String(8)),  # as given: up | down | 1..5
    Column("score", Float),  # the rating on one scale: 0 (bad) to 1 (good)
    Column("correction", Text),  # the answer the user wanted instead
    Column("comment", Text),
)


def rating_score(rating: str | int | None) -> float | None:
    """Thumbs and stars on one scale: down 0, up 1; 1..5 stars → 0, 0.25, …, 1."""
    if rating is None:
        return None
    if rating in ("up", "down"):
        return 1.0 if rating == "up" else 0.0
    stars = int(rating)
    if not 1 <= stars <= 5:
        raise ValueError(f"rating {rating}: use 'up', 'down' or 1 to 5")
    return (stars - 1) / 4


@dataclass
class Completion:
    id: str
    model: str
    kind: str
    prompt: list | str
    answer: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class FeedbackStore:
    def __init__(self, url: str = DEFAULT_DB):
        self.url = url
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        sqlite = url.startswith("sqlite")
        in_memory = url in ("sqlite://", "sqlite:///:memory:")
        # hide_parameters: a database error's message and the log then show the statement, never the
        # prompt, answer or correction it carried.
        if in_memory:  # one shared connection, or each thread sees its own empty db
            self.engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool,
                                        hide_parameters=True)
        else:
            self.engine = create_engine(url, connect_args={"timeout": 60} if sqlite else {}, hide_parameters=True)
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        # An in-memory database is one shared connection: its transactions must not interleave. A file
        # gets no lock here: SQLite's busy timeout queues its writers, and a lock held across that
        # wait (up to 60 s behind another process's write) would hold up every reader as well.
        self._lock = threading.Lock() if in_memory else contextlib.nullcontext()

    def add_completion(self, c: Completion) -> None:
        prompt = c.prompt if isinstance(c.prompt, str) else json.dumps(c.prompt, ensure_ascii=False)
        with self._lock, self.engine.begin() as conn:
            conn.execute(insert(completions).values(
                id=c.id, created=time.time(), model=c.model, kind=c.kind, prompt=prompt, answer=c.answer,
                finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens))

    def has_completion(self, completion_id: str) -> bool:
        with self._lock, self.engine.connect() as conn:
            return conn.execute(select(completions.c.id).where(completions.c.id == completion_id)).first() is not None

    def add_feedback(self, completion_id: str, rating: str | int | None, correction: str | None,
                     comment: str | None) -> int:
        score = rating_score(rating)
        with self._lock, self.engine.begin() as conn:
            result = conn.execute(insert(feedback).values(
                completion_id=completion_id, created=time.time(), rating=None if rating is None else str(rating),
                score=score, correction=correction, comment=comment))
            return int(result.inserted_primary_key[0])

    def rows(self, model: str | None = None, limit: int | None = None) -> list[dict]:
        """Feedback joined with its completion, newest first."""
        query = (select(feedback, completions.c.model, completions.c.kind, completions.c.prompt,
                        completions.c.answer, completions.c.finish_reason)
                 .join(completions, feedback.c.completion_id == completions.c.id)
                 .order_by(feedback.c.created.desc(), feedback.c.id.desc()))
        if model:
            query = query.where(completions.c.model == model)
        if limit:
            query = query.limit(limit)
        with self._lock, self.engine.connect() as conn:
            out = [dict(row._mapping) for row in conn.execute(query)]
        for row in out:
            if row["kind"] == "chat":
                row["prompt"] = json.loads(row["prompt"])
        return out

    def counts(self) -> dict:
        with self._lock, self.engine.connect() as conn:
            per_model = conn.execute(select(completions.c.model, func.count()).group_by(completions.c.model)).all()
            rated = conn.execute(
                select(completions.c.model, func.count(), func.avg(feedback.c.score),
                       func.count(feedback.c.correction))
                .join(completions, feedback.c.completion_id == completions.c.id)
                .group_by(completions.c.model)).all()
        stats = {m: {"completions": n, "feedback": 0, "mean_score": None, "corrections": 0} for m, n in per_model}
        for m, n, mean, corrected in rated:
            stats[m].update(feedback=n, mean_score=mean, corrections=corrected)
        return stats


class CompletionWriter:
    """The server's completions, written by one background thread: an answer never waits for the
    database, nor fails with it. A write that fails loses that record only: on_error(id, reason)
    hears of it, with a reason that holds no prompt. Feedback for a completion still in the queue
    waits for its write (`wait`) rather than finding nothing."""

    def __init__(self, store: FeedbackStore, on_error=lambda completion_id, reason: None, max_queued: int = 1000):
        self.store, self.on_error = store, on_error
        # Bounded: a database that hangs costs at most max_queued prompts of memory, then drops records.
        self._queue: queue.Queue = queue.Queue(max_queued)
        self._pending: set[str] = set()
        self._changed = threading.Condition()  # guards _pending; never held while the database works
        self._thread = threading.Thread(target=self._run, name="tailor-feedback-writer", daemon=True)
        self._thread.start()

    def put(self, completion: Completion) -> None:
        with self._changed:
            self._pending.add(completion.id)
        try:
            self._queue.put_nowait(completion)
        except queue.Full:
            self._written(completion.id)
            self.on_error(completion.id, f"{self._queue.maxsize} completions were already waiting for the store")

    def wait(self, completion_id: str, timeout: float = 30.0) -> bool:
        """True once the completion's write is over (stored or failed); False if still queued after timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: completion_id not in self._pending, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Writes what is queued, then stops the thread."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return  # the database hangs: the daemon thread dies with the process
        self._thread.join(timeout)

    def _run(self) -> None:
        while (completion := self._queue.get()) is not None:
            try:
                self.store.add_completion(completion)
            except Exception as exc:  # any failure loses this record only: the server goes on
                self.on_error(completion.id, failure_reason(exc))
            finally:
                self._written(completion.id)

    def _written(self, completion_id: str) -> None:
        with self._changed:
            self._pending.discard(completion_id)
            self._changed.notify_all()


def failure_reason(exc: Exception) -> str:
    """What a log may say of a failed write: the error's type and the database's first line ("no such
    table", "database is locked"). Not the rest: a driver's detail lines may quote the row, prompt
    included ("Failing row contains …"), and other exceptions may carry anything."""
    driver = str(getattr(exc, "orig", "") or "").strip()
    return f"{type(exc).__name__}: {driver.splitlines()[0]}" if driver else type(exc).__name__


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()

"""The feedback store: every completion the server answers, and what users said about it.

SQLAlchemy Core over any database URL; the default is a SQLite file in WAL mode (readers never
block the writer, and concurrent writers wait for each other instead of failing), which is enough
for one server. A shared Postgres or MySQL URL serves several.
"""

from __future__ import annotations

import contextlib
import json
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
        if url in ("sqlite://", "sqlite:///:memory:"):  # one shared connection, or each thread sees its own empty db
            self.engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
        else:
            self.engine = create_engine(url, connect_args={"timeout": 60} if sqlite else {})
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        # SQLite takes one writer at a time anyway; queueing them here beats its busy-wait, and an
        # in-memory database (one shared connection) must not interleave transactions at all.
        self._lock = threading.Lock() if sqlite else contextlib.nullcontext()

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


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()

"""The inference log: one append-only row per request, shared by serving and monitoring.

SQLAlchemy Core, so the same code writes SQLite (embedded default) or a Postgres URL.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
)
from sqlalchemy.engine import Engine

metadata = MetaData()

inference_log = Table(
    "inference_log",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("route", String(64), nullable=False),
    Column("model", String(128), nullable=False),
    Column("model_version", String(32)),
    Column("prompt", Text, nullable=False),
    Column("response", Text),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("latency_ms", Float),
    Column("status", Integer, nullable=False),
)


@dataclass
class InferenceRecord:
    route: str
    model: str
    prompt: str
    status: int
    model_version: str | None = None
    response: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (monitoring) never block the writer
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


class InferenceLog:
    """Append and read inference records at a SQLAlchemy URL."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)

    def append(self, record: InferenceRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(inference_log).values(**asdict(record)))

    def recent(self, limit: int, status: int | None = 200) -> list[dict[str, Any]]:
        """Return the newest `limit` rows (newest first), only of `status` when given."""
        query = select(inference_log).order_by(inference_log.c.created_at.desc()).limit(limit)
        if status is not None:
            query = query.where(inference_log.c.status == status)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def count(self) -> int:
        from sqlalchemy import func

        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(inference_log)).scalar_one()

    def close(self) -> None:
        self.engine.dispose()

"""The inference log: one append-only row per request, shared by serving and monitoring.

SQLAlchemy Core, so the same code writes SQLite (embedded default) or a Postgres URL.

    log = InferenceLog(url)
    writer = LogWriter(log, redact=scanner.redact)   # serving: off the request path
    writer.submit(record)                            # returns at once; a thread batches inserts
    log.add_feedback(response_id, score=1.0)         # the quality signal, per response
    log.window(limit=500)                            # monitoring: newest rows, every status
    log.add_embeddings(ids, "model@128", vectors)    # drift: a prompt is embedded once

The one owner of this database: serving, monitoring and drift read and write it through
`InferenceLog`, and nothing else holds SQL over its tables. Tables: `inference_log` (one row
per answer: the served one, and a shadow model's, marked by `arm`), `feedback` (scores per
response id) and `prompt_embedding` (one vector per request and embedder). Rows are never
updated; they are deleted only to erase a person's data (`erase`) or past the retention
period (`expire`), with their feedback and embeddings.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import (
    Column,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    type_coerce,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError

log = logging.getLogger(__name__)

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
    # Added with multi-adapter serving and canaries (older logs get them by ALTER TABLE):
    Column("adapter", String(128)),  # the adapter (model version) that answered, by name
    Column("arm", String(16)),  # champion | challenger (canary share) | shadow (logged, not returned)
    Column("key_id", String(32)),  # which API key asked (its public id, never the key)
    Column("error", Text),  # what went wrong, for status >= 400
    Column("sampling", Text),  # the request's decoding settings (JSON: temperature, seed, stop …); null: greedy
    Column("guardrail", String(64)),  # what the output guardrails did (comma-separated): pii_redacted …
    Column("prompt_version", String(160)),  # the chat route's prompt version (name/version) that rendered it
    # The chunks retrieved for it (JSON: [{id, source, position, score}], best first), when its prompt
    # version binds a collection; the chunks' text stays in the collection.
    Column("retrieved", Text),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("response_id", String(36), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("score", Float, nullable=False),
    Column("comment", Text),
)

prompt_embedding = Table(
    "prompt_embedding",
    metadata,
    Column("request_id", String(36), primary_key=True),  # inference_log.id
    # The embedder (and its token cut-off): another model gets its own rows, never mixed ones.
    Column("model", String(200), primary_key=True),
    Column("dim", Integer, nullable=False),
    Column("vector", LargeBinary, nullable=False),  # float32, little-endian, dim × 4 bytes
    Column("created_at", DateTime(timezone=True), nullable=False),
)

_ADDED_COLUMNS = ("adapter", "arm", "key_id", "error", "sampling", "guardrail", "prompt_version", "retrieved")
_CHUNK = 500  # ids per IN (...) clause


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
    adapter: str | None = None
    arm: str | None = None
    key_id: str | None = None
    error: str | None = None
    sampling: str | None = None
    guardrail: str | None = None
    prompt_version: str | None = None
    retrieved: str | None = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (monitoring) never block the writer
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


class InferenceLog:
    """Append and read inference records and feedback at a SQLAlchemy URL."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        have = {c["name"] for c in inspect(self.engine).get_columns("inference_log")}
        missing = [c for c in _ADDED_COLUMNS if c not in have]
        if not missing:
            return
        with self.engine.begin() as conn:
            for name in missing:
                col = inference_log.c[name]
                conn.execute(
                    text(f"ALTER TABLE inference_log ADD COLUMN {name} {col.type.compile(dialect=self.engine.dialect)}")
                )

    def append(self, record: InferenceRecord) -> None:
        self.append_many([record])

    def append_many(self, records: Sequence[InferenceRecord]) -> None:
        if records:
            with self.engine.begin() as conn:
                conn.execute(insert(inference_log), [asdict(r) for r in records])

    def usage(self, key_id: str, since: dt.datetime) -> dict[str, dict[str, int]]:
        """Requests and tokens of `key_id` per UTC day since `since` (answered requests only)."""
        day = func.substr(type_coerce(inference_log.c.created_at, String), 1, 10)
        query = (
            select(
                day.label("day"),
                func.count().label("requests"),
                func.coalesce(func.sum(inference_log.c.prompt_tokens), 0).label("prompt_tokens"),
                func.coalesce(func.sum(inference_log.c.completion_tokens), 0).label("completion_tokens"),
            )
            .where(
                inference_log.c.key_id == key_id,
                inference_log.c.created_at >= since,
                inference_log.c.status == 200,
                or_(inference_log.c.arm.is_(None), inference_log.c.arm != "shadow"),
            )
            .group_by(day)
            .order_by(day)
        )
        with self.engine.connect() as conn:
            return {
                r.day: {
                    "requests": int(r.requests),
                    "prompt_tokens": int(r.prompt_tokens),
                    "completion_tokens": int(r.completion_tokens),
                }
                for r in conn.execute(query)
            }

    def window(
        self,
        limit: int | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        arms: Sequence[str | None] | None = None,
    ) -> list[dict[str, Any]]:
        """Rows of every status, newest first: the newest `limit`, and/or those in [since, until)."""
        query = select(inference_log).order_by(inference_log.c.created_at.desc())
        if since is not None:
            query = query.where(inference_log.c.created_at >= since)
        if until is not None:
            query = query.where(inference_log.c.created_at < until)
        if arms is not None:
            named = [a for a in arms if a is not None]
            cond = inference_log.c.arm.in_(named)
            query = query.where(cond | inference_log.c.arm.is_(None) if None in arms else cond)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def get(self, request_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(inference_log).where(inference_log.c.id == request_id)).first()
        return dict(row._mapping) if row else None

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(inference_log)).scalar_one()

    def add_feedback(self, response_id: str, score: float, comment: str | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                insert(feedback).values(
                    response_id=response_id, score=score, comment=comment, created_at=dt.datetime.now(dt.UTC)
                )
            )

    def feedback_for(self, response_ids: Sequence[str]) -> dict[str, float]:
        """Mean feedback score per response id (ids without feedback are absent)."""
        out: dict[str, float] = {}
        ids = list(response_ids)
        with self.engine.connect() as conn:
            for i in range(0, len(ids), _CHUNK):
                query = (
                    select(feedback.c.response_id, func.avg(feedback.c.score))
                    .where(feedback.c.response_id.in_(ids[i : i + _CHUNK]))
                    .group_by(feedback.c.response_id)
                )
                out.update({rid: float(score) for rid, score in conn.execute(query)})
        return out

    # -- monitoring reads: rows as stored, for tasks.drift to parse one by one

    @staticmethod
    def _as_stored():
        # created_at as stored (text on SQLite): one unreadable timestamp must skip its row, not
        # fail the whole read as SQLAlchemy's DateTime conversion would. Shadow answers left out.
        cols = [c if c.name != "created_at" else type_coerce(c, String).label("created_at") for c in inference_log.c]
        return select(*cols).where(or_(inference_log.c.arm.is_(None), inference_log.c.arm != "shadow"))

    def newest_served(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` served rows of every status (newest first), `created_at` as stored."""
        query = self._as_stored().order_by(inference_log.c.created_at.desc(), inference_log.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def first_answers(self, version: str, limit: int) -> list[dict[str, Any]]:
        """The first `limit` answered (status < 400) served rows of a model version, oldest first, as stored."""
        query = (
            self._as_stored()
            .where(inference_log.c.model_version == version, inference_log.c.status < 400)
            .order_by(inference_log.c.created_at, inference_log.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    # -- prompt embeddings: one float32 vector per (request id, embedder)

    def missing_embeddings(self, request_ids: Sequence[str], model: str) -> list[str]:
        """Return the ids (in the given order) that have no embedding by `model`."""
        have: set[str] = set()
        ids = list(request_ids)
        with self.engine.connect() as conn:
            for i in range(0, len(ids), _CHUNK):
                query = select(prompt_embedding.c.request_id).where(
                    prompt_embedding.c.model == model, prompt_embedding.c.request_id.in_(ids[i : i + _CHUNK])
                )
                have.update(conn.scalars(query))
        return [i for i in ids if i not in have]

    def add_embeddings(self, request_ids: Sequence[str], model: str, vectors: np.ndarray) -> None:
        """Store one vector per id; an id stored meanwhile (by another run) is kept as it is."""
        if not len(request_ids):
            return
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        now = dt.datetime.now(dt.UTC)
        rows = [
            {"request_id": rid, "model": model, "dim": vectors.shape[1], "vector": vec.tobytes(), "created_at": now}
            for rid, vec in zip(request_ids, vectors, strict=True)
        ]
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            module = __import__(f"sqlalchemy.dialects.{dialect}", fromlist=["insert"])
            stmt = module.insert(prompt_embedding).on_conflict_do_nothing()
        else:
            stmt = insert(prompt_embedding)
        with self.engine.begin() as conn:
            conn.execute(stmt, rows)

    def embeddings(self, request_ids: Sequence[str], model: str) -> np.ndarray:
        """Return the vectors of `request_ids` in that order; every id must have one."""
        found: dict[str, np.ndarray] = {}
        ids = list(request_ids)
        with self.engine.connect() as conn:
            for i in range(0, len(ids), _CHUNK):
                query = select(prompt_embedding.c.request_id, prompt_embedding.c.dim, prompt_embedding.c.vector).where(
                    prompt_embedding.c.model == model, prompt_embedding.c.request_id.in_(ids[i : i + _CHUNK])
                )
                for rid, dim, blob in conn.execute(query):
                    found[rid] = np.frombuffer(blob, dtype="<f4", count=dim)
        absent = [i for i in ids if i not in found]
        if absent:
            raise KeyError(
                f"{len(absent)} requests have no {model} embedding (first: {absent[0]}): "
                "embed them first (tasks.embeddings.embed_missing)"
            )
        return np.stack([found[i] for i in ids]) if ids else np.zeros((0, 0), dtype=np.float32)

    def embedding_count(self, model: str | None = None) -> int:
        query = select(func.count()).select_from(prompt_embedding)
        if model is not None:
            query = query.where(prompt_embedding.c.model == model)
        with self.engine.connect() as conn:
            return conn.execute(query).scalar_one()

    def erase(self, request_ids: Sequence[str] = (), key_id: str | None = None) -> dict[str, Any]:
        """Delete the requests with these ids and/or every request of `key_id`, with their
        feedback and embeddings. Return the counts and the erased prompts (as stored), so the
        caller can find their copies elsewhere (retraining files, reports)."""
        ids = set(request_ids)
        with self.engine.begin() as conn:
            if key_id is not None:
                ids |= set(conn.scalars(select(inference_log.c.id).where(inference_log.c.key_id == key_id)))
            return self._delete(conn, sorted(ids))

    def expire(self, before: dt.datetime) -> dict[str, Any]:
        """Delete requests (and their feedback and embeddings) logged before `before`, and
        feedback given before it."""
        with self.engine.begin() as conn:
            ids = list(conn.scalars(select(inference_log.c.id).where(inference_log.c.created_at < before)))
            out = self._delete(conn, ids)
            late = conn.execute(delete(feedback).where(feedback.c.created_at < before)).rowcount
            out["feedback"] += late
            return out

    def _delete(self, conn: Any, ids: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": 0, "feedback": 0, "embeddings": 0, "prompts": []}
        for lo in range(0, len(ids), _CHUNK):
            chunk = ids[lo : lo + _CHUNK]
            rows = conn.execute(
                select(inference_log.c.prompt, inference_log.c.response).where(inference_log.c.id.in_(chunk))
            )
            out["prompts"] += [r.prompt for r in rows]
            out["feedback"] += conn.execute(delete(feedback).where(feedback.c.response_id.in_(chunk))).rowcount
            out["embeddings"] += conn.execute(
                delete(prompt_embedding).where(prompt_embedding.c.request_id.in_(chunk))
            ).rowcount
            out["requests"] += conn.execute(delete(inference_log).where(inference_log.c.id.in_(chunk))).rowcount
        return out

    def close(self) -> None:
        self.engine.dispose()


def storable(text: str | None) -> str | None:
    """`text` as every database takes it: a lone surrogate becomes its escape (`\\ud800`), NUL
    becomes `\\x00` (PostgreSQL refuses it in text). Other text is unchanged."""
    if text is None:
        return None
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _fit(column: str, value: str | None) -> str | None:
    """Cut a value to its column's length (PostgreSQL refuses longer ones; SQLite keeps them)."""
    length = getattr(inference_log.c[column].type, "length", None)
    return value[:length] if value is not None and length else value


TEXT_FIELDS = (
    "prompt",
    "response",
    "error",
    "route",
    "model",
    "model_version",
    "adapter",
    "arm",
    "key_id",
    "sampling",
    "guardrail",
    "prompt_version",
    "retrieved",
)


class LogWriter:
    """Writes records from a background thread, in batches, so requests never wait on the database.

    Every text field is escaped (`storable`) and prompts, responses and error texts go through
    `redact` (e.g. `PiiScanner.redact`) in that thread before they are stored. A batch the
    database cannot take now (locked, unreachable: `OperationalError`) is retried until it goes in
    or the writer is closed. A row the database refuses for what it holds is set aside (counted
    in `set_aside`, kept in `rejected` up to 1,000 rows, its text dropped) and never blocks the
    rows after it. `close()` drains the queue first, so records submitted before it are written.
    """

    def __init__(
        self,
        store: InferenceLog,
        redact: Callable[[list[str]], list[str]] | None = None,
        flush_interval_s: float = 0.05,
        max_batch: int = 256,
    ) -> None:
        self.store = store
        self.redact = redact
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self._queue: queue.Queue[InferenceRecord | None] = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self.written = 0
        self.failures = 0
        self.set_aside = 0
        self.rejected: list[dict[str, Any]] = []  # rows the database refused: id, status, the error
        self._thread = threading.Thread(target=self._run, name="inference-log-writer", daemon=True)
        self._thread.start()

    def submit(self, record: InferenceRecord) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(record)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far is written; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout_s)

    def stats(self) -> dict[str, int]:
        with self._idle:
            pending = self._pending
        return {"written": self.written, "pending": pending, "set_aside": self.set_aside, "retries": self.failures}

    def clean(self, texts: list[str]) -> list[str]:
        """Texts as they may be stored: escaped, then redacted (feedback comments go through here too)."""
        safe = [storable(t) or "" for t in texts]
        return self.redact(safe) if self.redact is not None else safe

    def _prepare(self, batch: list[InferenceRecord]) -> list[InferenceRecord]:
        n = len(batch)
        clean = self.clean(
            [r.prompt for r in batch] + [r.response or "" for r in batch] + [r.error or "" for r in batch]
        )
        out = []
        for i, r in enumerate(batch):
            row = {k: _fit(k, storable(v)) if k in TEXT_FIELDS else v for k, v in asdict(r).items()}
            row["prompt"] = clean[i]
            row["response"] = clean[n + i] if r.response is not None else None
            row["error"] = clean[2 * n + i] if r.error is not None else None
            out.append(InferenceRecord(**row))
        return out

    def _append_one(self, row: InferenceRecord) -> None:
        """Insert one row; a row the database refuses for its content is set aside. A database
        that cannot take rows now raises (`OperationalError`): the caller retries."""
        for attempt in range(2):
            try:
                self.store.append(row)
                self.written += 1
                return
            except OperationalError:
                raise
            except IntegrityError as err:  # an id used twice (a client's own x-request-id): a new id
                if attempt:
                    self._set_aside(row, err)
                row.id = str(uuid.uuid4())
            except StatementError as err:
                self._set_aside(row, err)
                return

    def _set_aside(self, row: InferenceRecord, err: Exception) -> None:
        self.set_aside += 1
        log.error("inference log: row %s set aside: %s: %s", row.id, type(err).__name__, str(err)[:300])
        if len(self.rejected) < 1000:
            self.rejected.append({"id": row.id, "status": row.status, "error": type(err).__name__})

    def _prepare_safely(self, batch: list[InferenceRecord]) -> list[InferenceRecord]:
        """Rows ready to store; a row the redactor cannot handle is set aside, not retried forever."""
        try:
            return self._prepare(batch)
        except Exception:  # noqa: BLE001 - find the row that breaks it
            out = []
            for record in batch:
                try:
                    out += self._prepare([record])
                except Exception as err:  # noqa: BLE001
                    self._set_aside(record, err)
            return out

    def _run(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                closing = True
                batch: list[InferenceRecord] = []
            else:
                batch = [first]
            # Gather what arrives within the flush interval, up to max_batch.
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=self.flush_interval_s if not closing else 0.001)
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    continue
                batch.append(item)
            self._write(batch, closing)

    def _write(self, batch: list[InferenceRecord], closing: bool) -> None:
        if not batch:
            return
        rows = self._prepare_safely(batch)
        delay = 0.1
        while rows:
            try:
                try:
                    self.store.append_many(rows)
                    self.written += len(rows)
                    rows = []
                except OperationalError:
                    raise
                except StatementError:  # a row the database refuses (an id used twice, a value): one by one
                    while rows:
                        self._append_one(rows[0])
                        rows.pop(0)
            except Exception:  # a locked or unreachable database: keep the rows, try again
                self.failures += 1
                log.exception("inference log write failed (%d rows kept, retrying)", len(rows))
                if closing and self.failures > 20:
                    log.error("inference log: giving up on %d rows at close", len(rows))
                    break
                threading.Event().wait(delay)
                delay = min(delay * 2, 5.0)
        with self._idle:
            self._pending -= len(batch)
            self._idle.notify_all()

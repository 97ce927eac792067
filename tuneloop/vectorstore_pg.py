"""Collections on a PostgreSQL server with pgvector: the store a team shares (every worker, flow
and gateway replica sees the same chunks; the server keeps the index).

    collections:
      store: postgresql://tuneloop@db.internal:5432/tuneloop   # password: PGPASSWORD or ~/.pgpass

One table lists the collections and what made them (`tuneloop_collections`: name → meta JSON);
each collection is a table of chunks (`chunks_<name>`) with a `vector(dim)` column and an HNSW
index (cosine), built when the table is created and kept up to date by the server on every
write — no rebuild step, unlike the embedded store. A search widens HNSW's candidate list to
`EF_SEARCH`: at 100k chunks pgvector's default (40) found 0.877 of the exact top 5 in 1.4 ms,
100: 0.955, 200: 0.987, 400: 0.998 in 3.8 ms p50 (bench/retrieval.py, BENCHMARKS.md "Retrieval").

The extension must be there or creatable: `infra/mlflow/compose.yaml` runs the `pgvector/pgvector`
image; a managed PostgreSQL (RDS, Cloud SQL, Azure) offers it as `vector`. A lost connection is
opened again on the next call; while the server is down every call raises `CollectionUnavailable`
(the gateway's 503), naming host, port and database, never the password.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from tuneloop.vectorstore import Chunk, CollectionError, CollectionStore, Hit

COLLECTIONS = "tuneloop_collections"
EF_SEARCH = 400  # HNSW candidates per search: recall@5 0.998 at 100k chunks (pgvector's 40: 0.877)
HNSW_M, HNSW_EF = 16, 64  # m and ef_construction  # pgvector's defaults, written out so the DDL says them


class CollectionUnavailable(CollectionError):
    """The server cannot be reached, or has no pgvector: nothing was read or written."""


def server_name(uri: str) -> str:
    """host:port/database of a libpq URI, for messages (never its user's password)."""
    from psycopg2.extensions import parse_dsn

    try:
        dsn = parse_dsn(uri)
    except Exception:  # noqa: BLE001 - a malformed URI: say so without echoing it
        return "the configured server (malformed collections.store URI)"
    return f"{dsn.get('host', 'localhost')}:{dsn.get('port', 5432)}/{dsn.get('dbname', '')}"


def table_name(name: str) -> str:
    """`chunks_<name>`, within PostgreSQL's 63-byte identifiers (a long name ends in a digest of itself)."""
    table = f"chunks_{name}"
    return table if len(table) <= 63 else f"{table[:46]}_{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def _vector(row: np.ndarray) -> str:
    return "[" + ",".join(map(repr, row.tolist())) + "]"  # pgvector's text form; float32 repr round-trips


class _Connection:
    """One libpq connection per store, used under a lock (the gateway searches from threads), opened
    again after the server dropped it; every use is one transaction."""

    def __init__(self, uri: str) -> None:
        self.uri, self._conn, self._lock = uri, None, threading.Lock()

    @contextmanager
    def cursor(self) -> Iterator[Any]:
        import psycopg2

        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg2.connect(self.uri, connect_timeout=5, application_name="tuneloop")
                with self._conn, self._conn.cursor() as cur:  # commit, or roll back on an error
                    yield cur
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as err:
                if self._conn is not None and not self._conn.closed:
                    self._conn.close()
                self._conn = None
                detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise CollectionUnavailable(f"collection server {server_name(self.uri)}: {detail}") from None


def _ensure_schema(db: _Connection) -> None:
    import psycopg2

    try:
        with db.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
            cur.execute(f"CREATE TABLE IF NOT EXISTS {COLLECTIONS} (name text PRIMARY KEY, meta jsonb NOT NULL)")
    except (
        psycopg2.errors.FeatureNotSupported,
        psycopg2.errors.UndefinedFile,
        psycopg2.errors.InsufficientPrivilege,
    ) as err:
        raise CollectionUnavailable(
            f"collection server {server_name(db.uri)} has no pgvector extension, or this user may not create it "
            f"({str(err).strip().splitlines()[0]}): run the pgvector/pgvector image, or CREATE EXTENSION vector "
            "as its owner"
        ) from None


def _read_meta(db: _Connection, name: str) -> dict[str, Any] | None:
    with db.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (COLLECTIONS,))
        if cur.fetchone()[0] is None:
            return None
        cur.execute(f"SELECT meta FROM {COLLECTIONS} WHERE name = %s", (name,))
        row = cur.fetchone()
    return dict(row[0]) if row else None


def list_server_collections(uri: str) -> list[str]:
    db = _Connection(uri)
    with db.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (COLLECTIONS,))
        if cur.fetchone()[0] is None:
            return []
        cur.execute(f"SELECT name FROM {COLLECTIONS} ORDER BY name")
        return [r[0] for r in cur.fetchall()]


class PgVectorStore(CollectionStore):
    def __init__(self, db: _Connection, name: str, meta: dict[str, Any]) -> None:
        self._db, self.name, self.meta = db, name, meta
        self._table = '"' + meta["table"] + '"'

    @classmethod
    def create_or_open(cls, uri: str, name: str, embedder: str, dim: int) -> PgVectorStore:  # type: ignore[override]
        db = _Connection(uri)
        _ensure_schema(db)
        meta = {"name": name, "embedder": embedder, "dim": dim, "table": table_name(name)}
        with db.cursor() as cur:
            # Two ingests creating one collection at once: the first row wins, the second reads it.
            cur.execute(
                f"INSERT INTO {COLLECTIONS} (name, meta) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (name, json.dumps(meta)),
            )
            cur.execute(f"SELECT meta FROM {COLLECTIONS} WHERE name = %s", (name,))
            meta = dict(cur.fetchone()[0])
            table = '"' + meta["table"] + '"'
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY, text text NOT NULL, source text NOT NULL, "
                f"position integer NOT NULL, content_hash text NOT NULL, embedding vector({int(meta['dim'])}) NOT NULL)"
            )
            cur.execute(
                f'CREATE INDEX IF NOT EXISTS "{meta["table"]}_hnsw" ON {table} '
                f"USING hnsw (embedding vector_cosine_ops) WITH (m = {HNSW_M}, ef_construction = {HNSW_EF})"
            )
            cur.execute(f'CREATE INDEX IF NOT EXISTS "{meta["table"]}_source" ON {table} (source)')
        return cls(db, name, meta)

    @classmethod
    def open(cls, uri: str, name: str) -> PgVectorStore:  # type: ignore[override]
        db = _Connection(uri)
        meta = _read_meta(db, name)
        if meta is None:
            known = ", ".join(list_server_collections(uri)) or "none"
            raise CollectionError(
                f"no collection {name!r} on {server_name(uri)} (collections: {known}); "
                "create it with `tuneloop docs ingest`"
            )
        return cls(db, name, meta)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        with self._db.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {self._table}")
            return int(cur.fetchone()[0])

    def hashes(self, sources: Sequence[str] | None = None) -> dict[str, tuple[str, str]]:
        with self._db.cursor() as cur:
            if sources is None:
                cur.execute(f"SELECT id, source, content_hash FROM {self._table}")
            else:
                cur.execute(
                    f"SELECT id, source, content_hash FROM {self._table} WHERE source = ANY(%s)", (list(sources),)
                )
            return {i: (s, h) for i, s, h in cur.fetchall()}

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        if k < 1:
            raise CollectionError(f"k must be at least 1, not {k}")
        query = _vector(np.asarray(vector, dtype=np.float32).ravel())
        with self._db.cursor() as cur:
            cur.execute(  # one round trip: the candidate list for this transaction, then the search
                f"SET LOCAL hnsw.ef_search = {max(EF_SEARCH, int(k))}; "
                f"SELECT id, text, source, position, 1 - (embedding <=> %s::vector) FROM {self._table} "
                "ORDER BY embedding <=> %s::vector LIMIT %s",
                (query, query, k),
            )
            return [Hit(i, t, s, int(p), float(score)) for i, t, s, p, score in cur.fetchall()]

    def texts(self, ids: Sequence[str]) -> dict[str, str]:
        if not ids:
            return {}
        with self._db.cursor() as cur:
            cur.execute(f"SELECT id, text FROM {self._table} WHERE id = ANY(%s)", (list(ids),))
            return dict(cur.fetchall())

    # ------------------------------------------------------------------ writing

    def upsert(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        """One transaction: every chunk of the batch or none."""
        from psycopg2.extras import execute_values

        if not chunks:
            return
        vectors = self._check_vectors(chunks, vectors)
        rows = [
            (c.id, c.text, c.source, c.position, c.content_hash, _vector(v))
            for c, v in zip(chunks, vectors, strict=True)
        ]
        with self._db.cursor() as cur:
            execute_values(
                cur,
                f"INSERT INTO {self._table} (id, text, source, position, content_hash, embedding) VALUES %s "
                "ON CONFLICT (id) DO UPDATE SET text = EXCLUDED.text, source = EXCLUDED.source, "
                "position = EXCLUDED.position, content_hash = EXCLUDED.content_hash, embedding = EXCLUDED.embedding",
                rows,
                template="(%s, %s, %s, %s, %s, %s::vector)",
                page_size=500,
            )

    def delete(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        with self._db.cursor() as cur:
            cur.execute(f"DELETE FROM {self._table} WHERE id = ANY(%s)", (list(ids),))

    def reindex(self) -> bool:
        return False  # the server's HNSW index follows every write

    def record(self, **fields: Any) -> None:
        with self._db.cursor() as cur:
            cur.execute(
                f"UPDATE {COLLECTIONS} SET meta = meta || %s::jsonb WHERE name = %s RETURNING meta",
                (json.dumps(fields), self.name),
            )
            row = cur.fetchone()
        self.meta = dict(row[0]) if row else {**self.meta, **fields}

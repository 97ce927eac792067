"""Document collections: chunks of text and their embeddings in a vector store — the one module
that owns the store (ingestion writes through it, the gateway and evaluation read through it).

    store = CollectionStore.open(location, "handbook")   # a folder, or a postgresql:// server
    store.upsert(chunks, vectors)                  # by chunk id: a changed chunk replaces its row
    hits = store.search(vector, k=4)               # [Hit(id, text, source, position, score)]
    store.version                                  # digest of (id, content hash) pairs and the embedder

Two stores behind the same methods, picked by where the collections live (`collections.store`):

- **LanceDB, embedded** (the default): a folder under the state dir (`collections/<name>/`), no
  server, chosen by measurement against Qdrant's local mode and a numpy scan (bench/retrieval.py,
  BENCHMARKS.md "Retrieval"). Up to `INDEX_MIN_ROWS` chunks a query scans every vector (exact);
  above, LanceDB's IVF-HNSW-SQ index answers (rebuilt when the collection has grown by half),
  searching 3/4 of its partitions and re-ranking `REFINE_FACTOR` × k candidates exactly: at 100k
  chunks recall@5 1.0 against the exact answer at 10 ms, where IVF-PQ with its defaults found 0.23
  (measured; the numbers are in BENCHMARKS.md).
- **pgvector on PostgreSQL** for a team (`postgresql://user@host/db`; tuneloop.vectorstore_pg):
  every worker and replica sees the same collections, the server keeps an HNSW index up to date.

Cosine similarity of unit-norm vectors: `score` 1 is the same direction.

A collection's version names what lineage records (a prompt version bound to it, an evaluation
that retrieved from it): the SHA-256 of its sorted (chunk id, content hash) pairs and its
embedder — the same chunks embedded by the same model, the same version, in either store.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
TABLE = "chunks"
META = "collection.json"
INDEX_MIN_ROWS = 20_000  # below: an exact scan is fast enough (BENCHMARKS.md "Retrieval")
REFINE_FACTOR = 10
SERVER_SCHEMES = ("postgresql://", "postgres://")


class CollectionError(ValueError):
    """A collection that does not exist, a bad name, or chunks that do not fit it."""


@dataclass(frozen=True)
class Chunk:
    id: str  # stable: source and position (the same place in the same file, the same id)
    text: str
    source: str  # file path (or path#line for JSONL rows)
    position: int  # the chunk's index within its source
    content_hash: str  # SHA-256 of `text`: unchanged text is never embedded again


@dataclass(frozen=True)
class Hit:
    id: str
    text: str
    source: str
    position: int
    score: float  # cosine similarity to the query

    def cite(self) -> dict[str, Any]:
        """What a response cites: the chunk by id, where it comes from, how well it matched."""
        return {"id": self.id, "source": self.source, "position": self.position, "score": round(self.score, 4)}


def chunk_id(source: str, position: int) -> str:
    return hashlib.sha256(f"{source}\x00{position}".encode()).hexdigest()[:20]


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise CollectionError(
            f"collection name {name!r}: lower-case letters, digits, - and _, starting with a letter (at most 63)"
        )
    return name


Location = Path | str  # a folder of embedded collections, or a postgresql:// server


def is_server(location: Location) -> bool:
    return isinstance(location, str) and location.startswith(SERVER_SCHEMES)


class CollectionStore(ABC):
    """One collection: its chunks with their vectors, and what made them (`meta`: the embedder, its
    dimension, the chunking settings, the folder it mirrors). Open one with `open` or
    `create_or_open`, which pick the store by the location."""

    meta: dict[str, Any]
    name: str

    # ------------------------------------------------------------------ opening

    @classmethod
    def create_or_open(cls, location: Location, name: str, embedder: str, dim: int) -> CollectionStore:
        """Open the collection, creating it for `embedder` (vectors of `dim`) if it does not exist;
        refuse one built with another embedder (its vectors would not compare)."""
        check_name(name)
        if is_server(location):
            from tuneloop.vectorstore_pg import PgVectorStore

            store: CollectionStore = PgVectorStore.create_or_open(str(location), name, embedder, dim)
        else:
            store = LanceStore.create_or_open(Path(location), name, embedder, dim)
        if store.meta["embedder"] != embedder:
            raise CollectionError(
                f"collection {name!r} holds vectors of {store.meta['embedder']}, not {embedder}: "
                "ingest into a new collection (or delete this one) to change the embedder"
            )
        return store

    @classmethod
    def open(cls, location: Location, name: str) -> CollectionStore:
        check_name(name)
        if is_server(location):
            from tuneloop.vectorstore_pg import PgVectorStore

            return PgVectorStore.open(str(location), name)
        return LanceStore.open(Path(location), name)

    @staticmethod
    def written(location: Location, name: str) -> float:
        """When an ingest last changed the collection's store objects, for a reader that keeps one open
        (the gateway's retriever): an embedded store is files a new ingest may replace, so it is
        reopened when this changes; a server store is always current (0.0)."""
        if is_server(location):
            return 0.0
        try:
            return (Path(location) / name / META).stat().st_mtime
        except OSError:
            return -1.0  # gone (or a bad name): open() says which

    # ------------------------------------------------------------------ the same in every store

    @property
    def version(self) -> str:
        pairs = sorted((i, h) for i, (_, h) in self.hashes().items())
        text = json.dumps([self.meta["embedder"], pairs])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {**self.meta, "chunks": len(self), "version": self.version}

    def _check_vectors(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(chunks), self.meta["dim"]):
            raise CollectionError(
                f"{len(chunks)} chunks need {len(chunks)} vectors of {self.meta['dim']}, not {vectors.shape}"
            )
        return vectors

    # ------------------------------------------------------------------ each store's own

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def hashes(self, sources: Sequence[str] | None = None) -> dict[str, tuple[str, str]]:
        """chunk id → (source, content hash), of every chunk or of the named sources'."""

    @abstractmethod
    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        """The `k` chunks most similar to a unit-norm query vector, best first."""

    @abstractmethod
    def texts(self, ids: Sequence[str]) -> dict[str, str]:
        """chunk id → text, of the ids that exist."""

    @abstractmethod
    def upsert(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        """Insert the chunks, or replace those whose id exists, all or none."""

    @abstractmethod
    def delete(self, ids: Sequence[str]) -> None:
        """Remove the chunks of these ids (those that do not exist are no error)."""

    @abstractmethod
    def reindex(self) -> bool:
        """Build or rebuild the ANN index if the store needs it now; return whether it did."""

    @abstractmethod
    def record(self, **fields: Any) -> None:
        """Keep what made the collection (chunking settings, sources, last ingest) beside it."""


class LanceStore(CollectionStore):
    """One collection on disk: a LanceDB table of chunks and a small JSON file of what made them."""

    def __init__(self, root: Path, name: str, table: Any, meta: dict[str, Any]) -> None:
        self.root, self.name, self._table, self.meta = root, name, table, meta

    @classmethod
    def create_or_open(cls, root: Path, name: str, embedder: str, dim: int) -> LanceStore:  # type: ignore[override]
        import lancedb
        import pyarrow as pa

        path = root / name
        if (path / META).exists():
            return cls.open(root, name)
        path.mkdir(parents=True, exist_ok=True)
        schema = pa.schema(
            [
                pa.field("id", pa.string()),
                pa.field("text", pa.string()),
                pa.field("source", pa.string()),
                pa.field("position", pa.int32()),
                pa.field("content_hash", pa.string()),
                pa.field("vector", pa.list_(pa.float32(), dim)),
            ]
        )
        table = lancedb.connect(str(path)).create_table(TABLE, schema=schema, exist_ok=True)
        meta = {"name": name, "embedder": embedder, "dim": dim, "indexed_rows": 0}
        _write_json(path / META, meta)
        return cls(path, name, table, meta)

    @classmethod
    def open(cls, root: Path, name: str) -> LanceStore:  # type: ignore[override]
        import lancedb

        path = root / name
        try:
            meta = json.loads((path / META).read_text())
        except FileNotFoundError:
            known = ", ".join(list_collections(root)) or "none"
            raise CollectionError(
                f"no collection {name!r} under {root} (collections: {known}); create it with `tuneloop docs ingest`"
            ) from None
        return cls(path, name, lancedb.connect(str(path)).open_table(TABLE), meta)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return int(self._table.count_rows())

    def hashes(self, sources: Sequence[str] | None = None) -> dict[str, tuple[str, str]]:
        rows = self._table.search().select(["id", "source", "content_hash"]).limit(None).to_arrow().to_pylist()
        wanted = set(sources) if sources is not None else None
        return {r["id"]: (r["source"], r["content_hash"]) for r in rows if wanted is None or r["source"] in wanted}

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        if k < 1:
            raise CollectionError(f"k must be at least 1, not {k}")
        query = self._table.search(np.asarray(vector, dtype=np.float32)).distance_type("cosine").limit(k)
        if self.meta.get("indexed_rows"):
            query = query.nprobes(int(self.meta["nprobes"])).refine_factor(REFINE_FACTOR)
        rows = query.select(["id", "text", "source", "position", "_distance"]).to_list()
        return [Hit(r["id"], r["text"], r["source"], int(r["position"]), 1.0 - float(r["_distance"])) for r in rows]

    def texts(self, ids: Sequence[str]) -> dict[str, str]:
        if not ids:
            return {}
        quoted = ", ".join("'" + i.replace("'", "''") + "'" for i in ids)
        rows = self._table.search().where(f"id IN ({quoted})").select(["id", "text"]).limit(None).to_list()
        return {r["id"]: r["text"] for r in rows}

    # ------------------------------------------------------------------ writing

    def upsert(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        """One atomic LanceDB commit."""
        import pyarrow as pa

        if not chunks:
            return
        vectors = self._check_vectors(chunks, vectors)
        rows = pa.table(
            {
                "id": [c.id for c in chunks],
                "text": [c.text for c in chunks],
                "source": [c.source for c in chunks],
                "position": pa.array([c.position for c in chunks], pa.int32()),
                "content_hash": [c.content_hash for c in chunks],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), self.meta["dim"]),
            }
        )
        self._table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(rows)

    def delete(self, ids: Sequence[str]) -> None:
        for i in range(0, len(ids), 500):
            quoted = ", ".join("'" + x.replace("'", "''") + "'" for x in ids[i : i + 500])
            self._table.delete(f"id IN ({quoted})")

    def reindex(self) -> bool:
        """Build (or rebuild) the ANN index once the collection is large enough, or has grown by half
        since the last one; return whether it did."""
        rows = len(self)
        last = int(self.meta.get("indexed_rows") or 0)
        if rows < INDEX_MIN_ROWS or (last and rows < 1.5 * last):
            return False
        partitions = max(8, round(rows**0.5 / 5))
        self._table.create_index(
            metric="cosine",
            vector_column_name="vector",
            index_type="IVF_HNSW_SQ",
            num_partitions=partitions,
            replace=True,
        )
        self.meta["indexed_rows"], self.meta["nprobes"] = rows, max(1, partitions * 3 // 4)
        _write_json(self.root / META, self.meta)
        return True

    def record(self, **fields: Any) -> None:
        self.meta.update(fields)
        _write_json(self.root / META, self.meta)


def list_collections(location: Location) -> list[str]:
    if is_server(location):
        from tuneloop.vectorstore_pg import list_server_collections

        return list_server_collections(str(location))
    root = Path(location)
    return sorted(p.name for p in root.iterdir() if (p / META).exists()) if root.exists() else []


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)  # a reader never sees half a file

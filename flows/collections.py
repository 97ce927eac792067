"""Collection flows: documents into a collection of the embedded vector store, and how well it
answers labelled questions.

    tuneloop docs ingest handbook/ --collection handbook     # CLI
    ingest_collection_flow(cfg, "handbook/", "handbook")
    tuneloop docs evaluate handbook --questions labelled.jsonl -k 5

Runs as a Prefect deployment too (`collection-ingest`: a form with the path and the
collection): the run's artifact says what was added, updated, removed and left, and the
collection's new version.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.retrieval.evaluate import RetrievalResult
from tasks.retrieval.ingest import IngestReport, ingest_documents
from tuneloop.config import TuneloopConfig, check_run_parameters, load_config
from tuneloop.state import collections_location, state_paths
from tuneloop.vectorstore import check_name


@flow(name="collection-ingest-flow")
def ingest_collection_flow(config: TuneloopConfig | None = None, path: str = "", collection: str = "") -> IngestReport:
    """Bring a collection up to date with the documents under `path` (files, or a folder)."""
    cfg = config or load_config()
    check_run_parameters(cfg, paths=[("path", path)])  # a deployment run reads only what the worker allows
    check_name(collection)
    paths = state_paths(cfg).ensure()
    paths.collections.mkdir(parents=True, exist_ok=True)
    report = ingest_documents(cfg.collections, collections_location(cfg), Path(path).expanduser(), collection)
    get_run_logger().info(
        "collection %s version %s: %d chunks (%d embedded, %d removed, %d unchanged)",
        report.collection,
        report.version,
        report.chunks,
        report.embedded,
        report.removed,
        report.unchanged,
    )
    create_markdown_artifact(
        key=f"collection-{collection}".replace("_", "-"),
        markdown=(
            f"# Collection `{collection}` version `{report.version}`\n\n"
            "| documents | chunks | added | updated | removed | unchanged | skipped files |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {report.documents} | {report.chunks} | {report.added} | {report.updated} | {report.removed} | "
            f"{report.unchanged} | {len(report.skipped_files)} |\n\n"
            f"Embedder `{cfg.collections.embedder}`, {cfg.collections.chunk_tokens}-token chunks overlapping by "
            f"{cfg.collections.chunk_overlap}; source `{path}`."
        ),
        description=f"ingest into {collection}",
    )
    return report


@flow(name="collection-evaluation-flow")
def evaluate_collection_flow(
    config: TuneloopConfig | None = None, collection: str = "", questions: str = "", k: int = 5
) -> RetrievalResult:
    """recall@k and MRR of labelled questions against a collection, as an MLflow run with its report."""
    import mlflow

    from tasks.retrieval.evaluate import evaluate_retrieval, read_questions, write_retrieval_report
    from tuneloop.retrieval import Retriever
    from tuneloop.state import tracking_uri

    cfg = config or load_config()
    check_run_parameters(cfg, paths=[("questions", questions)])
    paths = state_paths(cfg).ensure()
    labelled = read_questions(Path(questions).expanduser())
    retriever = Retriever(collections_location(cfg))
    result = evaluate_retrieval(retriever, check_name(collection), labelled, k, cfg.collections.rules)
    report = write_retrieval_report(result, paths.reports / f"retrieval-{collection}-{result.version}.html")
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.collections.experiment)
    with mlflow.start_run(run_name=f"retrieval-{collection}") as run:
        store = retriever.store(collection)
        mlflow.log_params(
            {"collection": collection, "collection_version": result.version, "k": k, "questions": len(labelled)}
        )
        mlflow.log_params({"embedder": store.meta["embedder"], "chunk_tokens": store.meta.get("chunk_tokens")})
        mlflow.log_metrics(result.metrics)
        mlflow.set_tags(
            {"tuneloop.collection": f"{collection}@{result.version}", "tuneloop.passed": str(result.passed)}
        )
        mlflow.log_artifact(str(report))
        mlflow.log_text("\n".join(json.dumps(e) for e in result.examples), "retrieval_examples.jsonl")
        run_id = run.info.run_id
    get_run_logger().info(
        "%s@%s: recall@%d %.3f, MRR %.3f (%s)",
        collection,
        result.version,
        k,
        result.metrics["recall_at_k"],
        result.metrics["mrr"],
        "passed" if result.passed else "failed",
    )
    create_markdown_artifact(
        key=f"retrieval-{collection}".replace("_", "-"),
        markdown=(
            f"# Retrieval `{collection}` version `{result.version}`: {'passed' if result.passed else 'failed'}\n\n"
            + "\n".join(f"- {m}: {v:.3f}" for m, v in result.metrics.items())
            + "".join(f"\n- `{line}`" for line in result.rules)
            + f"\n\nMLflow run `{run_id}` (report, every question)"
        ),
        description=f"retrieval evaluation of {collection}",
    )
    return result
